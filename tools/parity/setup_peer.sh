#!/usr/bin/env bash
# Create the virtual environment that runs the peer package open-flamingo==2.0.1, used only by
# tools/parity/make_fixtures.py to write tests/fixtures/parity/. The openflamingo library never
# imports the peer.
#
#   bash tools/parity/setup_peer.sh           # no-op when the venv already matches the pins below
#   bash tools/parity/setup_peer.sh --force   # delete and rebuild
#
# Environment: PEER_VENV (default /tmp/openflamingo-peer-venv), PEER_PYTHON (default python3.11).
#
# Why the install is split in two:
#  * open-flamingo 2.0.1 declares torch==2.0.1 and sentencepiece==0.1.98, open_clip_torch 2.20.0
#    declares timm/protobuf<4/sentencepiece; none of these are used by the fixture generator and
#    torch 2.0.1 has no cp311 CPU wheel here. Those three packages (and torchvision) therefore go in
#    with --no-deps, after everything they really need has been installed with pins.
#  * `pip install torch==2.13.0` resolves to the CPU wheel this machine keeps in its local wheel
#    directory. The matching torchvision (0.28.0) on PyPI is a CUDA build whose compiled ops cannot
#    load next to CPU torch; make_fixtures.py defines the two operator schemas torchvision's import
#    needs (see install_torchvision_stub there). Only torchvision's pure-Python transforms are used.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PEER_VENV:-/tmp/openflamingo-peer-venv}"
PYTHON="${PEER_PYTHON:-python3.11}"

TORCH_PIN="torch==2.13.0"
# Installed with dependency resolution (the real runtime needs of the four packages below + torch).
PINNED=(
  "transformers==4.57.6" "tokenizers==0.22.2" "huggingface_hub==0.36.2" "safetensors==0.8.0"
  "numpy==2.4.6" "pillow==13.0.0" "einops==0.8.2" "einops-exts==0.0.4" "ftfy==6.3.1"
  "regex==2026.11.19" "tqdm==4.70.1" "PyYAML==6.0.4" "requests==2.34.2" "packaging==26.4"
  "filelock==4.3.1" "fsspec==2026.9.0" "sympy==1.14.0" "networkx==3.6.1" "Jinja2==3.1.6"
  "typing_extensions==4.16.0" "mpmath==1.3.0" "MarkupSafe==3.0.4" "setuptools==84.2.1"
  "certifi==2026.10.19.post1" "charset-normalizer==3.5.3" "idna==3.20" "urllib3==2.8.0"
  "hf-xet==1.8.0" "wcwidth==0.9.4"
)
# Installed without their declared dependencies (see above).
NO_DEPS=("torchvision==0.28.0" "open_clip_torch==2.20.0" "open-flamingo==2.0.1")

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup_peer.sh: $PYTHON not found; set PEER_PYTHON to a Python 3.11 interpreter" >&2
  exit 1
fi
pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$pyver" != "3.11" ]]; then
  echo "setup_peer.sh: $PYTHON is Python $pyver; the pinned wheels need Python 3.11 (set PEER_PYTHON)" >&2
  exit 1
fi

# A venv inside a work tree would show up in `git status` and in source searches.
parent="$(dirname "$VENV")"
while [[ ! -d "$parent" ]]; do parent="$(dirname "$parent")"; done  # nearest existing ancestor
if git -C "$parent" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "setup_peer.sh: PEER_VENV=$VENV is inside a git work tree; choose a path outside it" >&2
  exit 1
fi

mkdir -p "$(dirname "$VENV")"
stamp_file="$VENV/.openflamingo-peer-stamp"
wanted_stamp="python$pyver $TORCH_PIN ${PINNED[*]} --no-deps ${NO_DEPS[*]}"

check_env() {
  # Imports everything the generator uses (with its torchvision stub) and prints the versions.
  "$VENV/bin/python" "$SCRIPT_DIR/make_fixtures.py" --versions
}

if [[ $force -eq 0 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$wanted_stamp" ]]; then
  if check_env >/dev/null; then
    echo "setup_peer.sh: $VENV is up to date"
    exit 0
  fi
  echo "setup_peer.sh: $VENV has the right stamp but fails the import check; rebuilding"
fi

started=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip_install() {
  # This machine's pip config lists index directories that do not all exist; drop those warnings.
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "$@" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}
echo "setup_peer.sh: [1/2] $TORCH_PIN + pinned runtime dependencies"
pip_install "$TORCH_PIN" "${PINNED[@]}"
echo "setup_peer.sh: [2/2] --no-deps ${NO_DEPS[*]}"
pip_install --no-deps "${NO_DEPS[@]}"

echo "setup_peer.sh: import check"
check_env
echo "$wanted_stamp" > "$stamp_file"
echo "setup_peer.sh: $VENV ready in $((SECONDS - started)) s ($(du -sh "$VENV" | cut -f1))"
