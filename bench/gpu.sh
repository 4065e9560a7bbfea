#!/usr/bin/env bash
# Ours vs OpenFlamingo 2.0.1 side by side on one GPU at the OpenFlamingo-3B shape (random weights, nothing to
# download there): our shipped training step (train/loop.py's forward_backward after parallelize, as `openflamingo
# train` runs by default, and eager) against the peer's, generation, the levers (one-process FSDP2, frozen weights
# fp32), `openflamingo train` for 30 steps, the largest batch that fits, and a torch.profiler top-10-kernels table
# of our step. The scripts are in bench/gpu/ (bench/README.md). One JSON line per measurement in $OUT/bench.jsonl;
# logs beside it. Under 8 minutes on an H100/H200 (BUDGET_S bounds the total; pieces past it are skipped).
#
# The device machine is bare (python3 3.12 with CUDA torch, transformers 5.x, timm, einops, tensorboard) and reaches
# no registry, so what it lacks travels as wheels in .gpu/whl (git-ignored). Download them once, here:
#   echo /.gpu/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   python3 -m pip download -q $P -d .gpu/whl/ours torchdata==0.11.0 braceexpand==0.1.7
#   python3 -m pip download -q $P -d .gpu/whl/peer open-flamingo==2.0.1 open_clip_torch==2.20.0 einops-exts==0.0.4 \
#     ftfy==6.3.1 wcwidth==0.9.4 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
# then, with the device tool: run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540).
#
# CPU smoke test (under a minute; the peer venv from ../shared/tools/peer/setup.sh, whose torchvision needs a shim):
#   SIZE=tiny PY_OURS=.venv/bin/python PY_PEER=/tmp/peer-venv/bin/python PEER_TOOLS=../shared/tools/peer bash bench/gpu.sh
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
SIZE=${SIZE:-of3b}
OUT=${OUT:-/tmp/bench-out}
WHL=${WHL:-$REPO/.gpu/whl}
PY_OURS=${PY_OURS:-python3}
PY_PEER=${PY_PEER:-python3}
BUDGET_S=${BUDGET_S:-450}
PIECES=${PIECES:-"ours peer levers cli maxbatch"}  # a rerun can take fewer, e.g. PIECES=levers (install and assets always run)
WORK=${WORK:-/tmp/bench}  # assets, installed wheels and the CLI run: large, kept out of $OUT
ASSETS=$WORK/assets RUN=$WORK/run SITE=$WORK/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl LOG=$OUT/bench.log
: > "$JSONL"
: > "$LOG"
rm -rf "$WORK" && mkdir -p "$WORK"
START=$(date +%s)
DEADLINE=$(( START + BUDGET_S ))
RESERVE_S=15  # kept for the summary

# stage NAME CAP_S LOGFILE CMD...: CMD under `timeout` of CAP_S or the time left, whichever is less; skipped when
# under 20 s are left. Sets STAGE_RC and STAGE_S, and records both as a JSON line. STAGE_DEADLINE tells CMD when it
# will be stopped (the batch search in bench/gpu/common.py ends its trials before that).
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$(( DEADLINE - RESERVE_S - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    STAGE_RC=-1 STAGE_S=0
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
  else
    local t0
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)" >> "$LOG"
    STAGE_DEADLINE=$(( t0 + limit - 10 )) timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    STAGE_RC=$? STAGE_S=$(( $(date +%s) - t0 ))
    echo "== $name: rc=$STAGE_RC, ${STAGE_S}s (at $(( $(date +%s) - START ))s)" | tee -a "$LOG"
  fi
  echo "{\"what\": \"stage\", \"stage\": \"$name\", \"rc\": $STAGE_RC, \"wall_s\": $STAGE_S}" >> "$JSONL"
}

want() { [[ " $PIECES " == *" $1 "* ]]; }

missing() {  # missing PYTHON MODULE...: true when PYTHON cannot find one of the modules (nothing is imported)
  "$1" -c 'import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) is None for m in sys.argv[1:]))' "${@:2}"
}

# the carried wheels, exactly as downloaded: "${PIP_TARGET[@]}" TARGET WHEEL...
PIP_TARGET=("$PY_OURS" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target)

{
  echo "size=$SIZE budget=${BUDGET_S}s commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
} | tee -a "$LOG"

# Our src/ first; the peer never sees it. Each side's wheels only where its python lacks the modules.
OURS_PATH=$REPO/src PEER_PATH=$SITE/peer
if missing "$PY_OURS" torchdata braceexpand; then
  stage install-ours 60 "$LOG" "${PIP_TARGET[@]}" "$SITE/ours" "$WHL"/ours/*.whl
  OURS_PATH=$SITE/ours:$OURS_PATH
fi
if missing "$PY_PEER" open_flamingo open_clip; then
  stage install-peer 90 "$LOG" "${PIP_TARGET[@]}" "$SITE/peer" "$WHL"/peer/*.whl
fi
OURS=(env PYTHONPATH="$OURS_PATH" "$PY_OURS")  # arrays, not functions: `timeout` runs programs
PEER=(env PYTHONPATH="$PEER_PATH" "$PY_PEER")
ARGS=(--size "$SIZE" --assets "$ASSETS" --jsonl "$JSONL")

# Assets with the peer's transformers 4.57, whose files transformers 5 also reads; with ours if that fails.
stage assets 150 "$LOG" "${PEER[@]}" bench/gpu/assets.py "${ARGS[@]}"
if (( STAGE_RC != 0 )); then
  stage assets-ours 150 "$LOG" "${OURS[@]}" bench/gpu/assets.py "${ARGS[@]}"
fi

# Ours: the default step (compiled on a GPU) with its profile, then eager; generation in a process of its own.
if want ours; then
  stage ours 240 "$LOG" "${OURS[@]}" bench/gpu/ours.py "${ARGS[@]}" --what train profile --variants default eager \
    --profile-table "$OUT/profile.txt"
  stage ours-gen 90 "$LOG" "${OURS[@]}" bench/gpu/ours.py "${ARGS[@]}" --what gen
fi
if want peer; then
  stage peer 150 "$LOG" "${PEER[@]}" bench/gpu/peer.py "${ARGS[@]}" --what train gen
fi
# The levers against the default step: FSDP2 with its mixed precision on this one process, frozen weights fp32.
if want levers; then
  stage levers 180 "$LOG" "${OURS[@]}" bench/gpu/ours.py "${ARGS[@]}" --what train --variants fsdp eager-frozen-fp32
fi

# The CLI on the same shape, 30 steps; its metrics.jsonl comes back as it is, and one JSON line of medians.
if want cli; then
  mapfile -t CLI_ARGS < <("${OURS[@]}" bench/gpu/cli_run.py args "${ARGS[@]}" --run-dir "$RUN")
  stage cli 200 "$OUT/cli.log" "${OURS[@]}" -m openflamingo.train --config bench/of3b-synthetic.toml "${CLI_ARGS[@]}"
  "${OURS[@]}" bench/gpu/cli_run.py record "${ARGS[@]}" --metrics "$RUN/metrics.jsonl" --wall-s "$STAGE_S" \
    --rc "$STAGE_RC" >> "$LOG" 2>&1
  cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
  rm -rf "$RUN"  # its checkpoint is large
fi

# The largest batch that fits, last: each search starts a fresh process, so memory from earlier runs is gone.
if want maxbatch; then
  stage maxbatch-ours 120 "$LOG" "${OURS[@]}" bench/gpu/ours.py "${ARGS[@]}" --what maxbatch --variants default
  stage maxbatch-peer 120 "$LOG" "${PEER[@]}" bench/gpu/peer.py "${ARGS[@]}" --what maxbatch
fi

"${OURS[@]}" bench/gpu/summary.py "${ARGS[@]}" >> "$LOG" 2>&1
echo "== done in $(( $(date +%s) - START ))s; JSON lines in $JSONL:"
cat "$JSONL"
