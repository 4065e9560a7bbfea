"""Golden losses: rerun the tiny recipe tests/fixtures/golden/recipe.toml under a pinned numeric environment and
record its per-step losses and gradient norms bit for bit in tests/fixtures/golden/losses.json.

    .venv/bin/python tools/golden/update.py                  # rewrite this venv's entry (transformers 5)
    .venv-transformers4/bin/python tools/golden/update.py    # and the other one's (transformers 4)
    .venv/bin/python tools/golden/update.py --check          # compare only; exit status 1 on a difference
    .venv/bin/python tools/golden/update.py --check --env MKL_ENABLE_INSTRUCTIONS=AVX2   # an experiment
    .venv/bin/python tools/golden/update.py --data           # rebuild the recipe's CLIP, tokenizer and shards

tests/test_golden.py runs the recipe the same way and fails on any bit of difference. A commit that changes the
numerics of training on purpose reruns this tool with each venv and commits the new losses.json with it.

The bits must not depend on the machine (CI runs Intel and AMD x86 CPUs with AVX2 or AVX-512), so the recipe runs
in a fresh process whose numerics are pinned before torch loads (`PINNED_ENV`, `pin_backends`):
- one thread everywhere (torch, OpenMP, MKL; no dynamic adjustment): reductions split across threads differently;
- ATEN_CPU_CAPABILITY=default: PyTorch's own kernels (softmax, norms, elementwise, AdamW's fused kernel, the
  reductions) in their baseline x86-64 build rather than the AVX2 or AVX-512 one this CPU supports;
- MKL_CBWR=COMPATIBLE: MKL (torch's BLAS, also its vectorised exp/log/tanh) on its SSE2 code path without the
  approximate rcpps/rsqrtps instructions, with fixed cache sizes and static scheduling, on Intel and AMD alike;
- oneDNN and NNPACK off (they pick JIT/ISA-specific kernels and blockings from the CPU): the vision tower's patch
  convolution then runs as im2col + MKL GEMM; ONEDNN_MAX_CPU_ISA=SSE41 as well, should anything reach oneDNN;
- GLIBC_TUNABLES masks FMA from glibc's ifunc selection, so its libm (expf, logf, tanhf, ... that the baseline
  kernels call, and the cos of the lr schedule) runs the same non-FMA variants on every CPU.
Not pinned by this: the versions of torch (and its MKL), transformers, tokenizers, Pillow/zlib and glibc's libm;
losses.json records them, and keeps one entry per transformers major version, since the frozen LM and vision tower
are transformers code. (Today the two entries are bitwise equal: the recipe loads its CLIP tower from disk, as
transformers 4 and 5 initialise a random one differently; from the same weights both compute the same bits.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "fixtures" / "golden"
RECIPE = GOLDEN_DIR / "recipe.toml"
FIXTURE = GOLDEN_DIR / "losses.json"
COMMAND = ".venv/bin/python tools/golden/update.py"

PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_DYNAMIC": "FALSE",
    "MKL_DYNAMIC": "FALSE",
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-FMA,-FMA4",
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
# Ambient settings that would change the numerics; removed before the pins apply.
CLEARED_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "ONEDNN_", "DNNL_", "ATEN_CPU_", "GLIBC_TUNABLES")


def golden_key() -> str:
    """The fixture entry for this interpreter's transformers: its major version."""
    import importlib.metadata

    return f"transformers-{importlib.metadata.version('transformers').split('.')[0]}"


def recipe_sha256() -> str:
    return hashlib.sha256(RECIPE.read_bytes()).hexdigest()


def pinned_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES)}
    env.update(PINNED_ENV)
    env.update(extra or {})
    return env


def run_recipe(
    output_dir: Path,
    overrides: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    python: str | None = None,
    timeout: float = 600,
) -> dict:
    """Train the recipe in a fresh pinned process (`--train.output_dir output_dir` + `overrides`); its record."""
    output_dir = Path(output_dir)
    record = output_dir / "golden-record.json"
    command = [python or sys.executable, str(Path(__file__).resolve()), "--worker", str(record), "--"]
    command += ["--train.output_dir", str(output_dir / "run"), *(overrides or [])]
    done = subprocess.run(
        command, cwd=ROOT, env=pinned_env(extra_env), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the golden recipe failed (exit status {done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
    return json.loads(record.read_text())


# ----- inside the pinned process ---------------------------------------------------------------------------------
def pin_backends() -> None:
    import torch

    # Experiments (--check --env) may vary the belt-and-braces pins, never the ones the bits rest on.
    loose = ("ONEDNN_MAX_CPU_ISA", "GLIBC_TUNABLES")
    missing = {
        k: v for k, v in PINNED_ENV.items() if os.environ.get(k) != v and not (k in loose and k in os.environ)
    }
    if missing:
        raise RuntimeError(f"not in the pinned environment (run through run_recipe): {missing}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        raise RuntimeError(f"ATEN_CPU_CAPABILITY=default was not honoured: torch runs {capability} kernels")
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


def weights_sha256(directory: Path) -> str:
    """sha256 over the exported tensors (names, dtypes, shapes, bytes); not the file, whose header holds metadata."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        tensors = load_file(path)
        for name in sorted(tensors):
            tensor = tensors[name].contiguous()
            digest.update(f"{path.name}:{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def worker(record_path: Path, arguments: list[str], pin: bool = True) -> None:
    """Run `openflamingo train --config RECIPE ARGUMENTS` here and write its per-step record to `record_path`."""
    if pin:
        pin_backends()
    import torch
    import transformers

    from openflamingo.train.cli import main

    started = time.perf_counter()
    status = main(["--config", str(RECIPE.relative_to(ROOT)), *arguments])
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(status)
    output_dir = Path(arguments[arguments.index("--train.output_dir") + 1])
    steps = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[str(entry["step"])] = {
            "loss": float(entry["loss"]).hex(),
            "grad_norm": float(entry["grad_norm"]).hex(),
            "dataset_loss": {k: float(v).hex() for k, v in sorted(entry["dataset_loss"].items())},
        }
    final = output_dir / "final"
    record = {
        "steps": steps,
        "final_weights_sha256": weights_sha256(final) if final.is_dir() else None,
        "arguments": arguments,
        "versions": versions(torch, transformers),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "train_seconds": round(seconds, 2),
    }
    Path(record_path).write_text(json.dumps(record, indent=1))


def versions(torch, transformers) -> dict[str, str]:
    import importlib.metadata

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    mkl = torch.__config__.show().split("Math Kernel Library Version ", 1)[-1].split("-", 1)[0]
    return {
        "torch": torch.__version__,
        "mkl": mkl if torch.backends.mkl.is_available() else "-",
        "transformers": transformers.__version__,
        "tokenizers": version("tokenizers"),
        "pillow": version("pillow"),
        "python": platform.python_version(),
        "glibc": "-".join(platform.libc_ver()),
    }


# ----- comparing ---------------------------------------------------------------------------------------------------
def flatten(steps: dict) -> dict[tuple[int, str], str]:
    """{(step, quantity): hex} with quantities loss, grad_norm and dataset_loss.NAME."""
    out = {}
    for step, values in steps.items():
        out[(int(step), "loss")] = values["loss"]
        out[(int(step), "grad_norm")] = values["grad_norm"]
        for name, value in values["dataset_loss"].items():
            out[(int(step), f"dataset_loss.{name}")] = value
    return out


def differences(expected: dict, got: dict) -> list[str]:
    """Readable lines for every quantity of the two records that is not bitwise equal; [] when none."""
    lines: list[str] = []
    want, have = flatten(expected["steps"]), flatten(got["steps"])
    for key in sorted(want.keys() | have.keys()):
        step, quantity = key
        a, b = want.get(key), have.get(key)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"step {step:>3} {quantity:<20} expected {a or 'nothing':<24} got {b or 'nothing'}")
            continue
        x, y = float.fromhex(a), float.fromhex(b)
        relative = abs(y - x) / abs(x) if x else math.inf
        lines.append(
            f"step {step:>3} {quantity:<20} expected {x!r:<22} got {y!r:<22} relative difference {relative:.3g}"
        )
    if expected.get("final_weights_sha256") != got.get("final_weights_sha256") and not lines:
        lines.append(
            f"final weights: sha256 {got.get('final_weights_sha256')}, expected {expected.get('final_weights_sha256')}"
        )
    return lines


def report(expected: dict, got: dict, key: str) -> str:
    lines = differences(expected, got)
    if not lines:
        return ""
    changed = {k: (expected["versions"].get(k), v) for k, v in got["versions"].items()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    text = [
        f"the golden recipe's numbers ({key}) differ from tests/fixtures/golden/losses.json in {len(lines)} values:",
        *lines[:40],
        *(["..."] if len(lines) > 40 else []),
    ]
    if changed:
        text.append(
            "versions differ from the golden's: "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items()))
        )
    text.append(
        "If the change of numerics is intended, regenerate the golden with each venv and commit losses.json:\n"
        f"    {COMMAND}\n    .venv-transformers4/bin/python tools/golden/update.py"
    )
    return "\n".join(text)


# ----- the fixture ---------------------------------------------------------------------------------------------------
def read_fixture() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


def write_fixture(key: str, record: dict) -> None:
    fixture = read_fixture()
    goldens = fixture.get("goldens", {})
    if fixture.get("recipe_sha256") not in (None, recipe_sha256()):
        goldens = {}  # entries of another recipe are stale: regenerate each venv's
    goldens[key] = {
        "versions": record["versions"],
        "recorded_on": cpu_name(),
        "steps": record["steps"],
        "final_weights_sha256": record["final_weights_sha256"],
    }
    fixture = {
        "about": (
            "Per-step loss, gradient norm (before clipping) and per-dataset loss of the first "
            f"{len(record['steps'])} optimizer steps of tests/fixtures/golden/recipe.toml, as float.hex() strings, "
            "and a sha256 of the exported weights; one entry per transformers major version. tests/test_golden.py "
            "compares them bitwise. Run under the pinned numeric environment below (tools/golden/update.py)."
        ),
        "regenerate": [COMMAND, ".venv-transformers4/bin/python tools/golden/update.py"],
        "recipe": str(RECIPE.relative_to(ROOT)),
        "recipe_sha256": recipe_sha256(),
        "pinned_env": PINNED_ENV,
        "pinned_in_process": "torch.set_num_threads(1); torch.backends.mkldnn.enabled = False; NNPACK off",
        "goldens": dict(sorted(goldens.items())),
    }
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----- the recipe's data -------------------------------------------------------------------------------------------
def build_data() -> None:
    """tests/fixtures/golden/{clip,tokenizer,shards}: a random tiny HF CLIP tower (tests/tiny.py's TINY_CLIP),
    tests/tiny.py's tokenizer, and shards of patterned PNG images with captions and interleaved documents of
    tests/tiny.py's words. Committed; rebuild only to change them, with .venv (a random CLIP's weights depend on the
    transformers version; the files are read alike by 4 and 5)."""
    import io
    import shutil

    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import TINY_CLIP, corpus, make_tokenizer

    from openflamingo.data import ImageItem, ImageTextPair, InterleavedDocument, ShardWriter, TextItem

    def png(seed: int) -> bytes:
        width, height = 24 + seed % 5, 20 + seed % 7
        pixels = bytes(
            (x * (seed % 11 + 3) + y * (seed % 7 + 5) + c * 85 + seed * 29) % 256
            for y in range(height)
            for x in range(width)
            for c in range(3)
        )
        buffer = io.BytesIO()
        Image.frombytes("RGB", (width, height), pixels).save(buffer, "PNG")
        return buffer.getvalue()

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # The vision tower is loaded, not initialised from a config: transformers 4 and 5 initialise a random CLIP
    # differently, while with the same weights both compute this recipe bit for bit alike.
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    shutil.rmtree(GOLDEN_DIR / "clip", ignore_errors=True)
    clip.save_pretrained(str(GOLDEN_DIR / "clip"))
    # transformers 4's key layout ("vision_model." in front), which 5 reads too; 5 itself writes the keys without it.
    state = {
        k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in clip.state_dict().items()
    }
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        GOLDEN_DIR / "clip" / "model.safetensors",
        {"format": "pt"},
    )

    lines = [line.strip(" .?") for line in corpus(200)]

    def words(i: int, n: int) -> str:  # the tokenizer is nearly byte-level: a word is ~3 tokens
        return " ".join(lines[i % len(lines)].split()[:n])

    for name in ("tokenizer", "shards"):
        shutil.rmtree(GOLDEN_DIR / name, ignore_errors=True)
    tokenizer = make_tokenizer(GOLDEN_DIR / "tokenizer")
    # transformers 5 writes its own class name, which 4 cannot load; the fast tokenizer class is the same in both.
    config_path = GOLDEN_DIR / "tokenizer" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    print(f"tokenizer: {len(tokenizer)} tokens, bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}")
    with ShardWriter(GOLDEN_DIR / "shards" / "pairs", samples_per_shard=6) as writer:
        for i in range(24):
            writer.write(ImageTextPair(f"pair{i:03d}", ImageItem(png(i), "png"), words(i, 2 + i % 3)))
    with ShardWriter(GOLDEN_DIR / "shards" / "docs", samples_per_shard=4) as writer:
        for i in range(16):
            items: list = [TextItem(words(100 + i, 1 + i % 2))]
            for j in range(1 + i % 3):
                items += [
                    ImageItem(png(1000 + 10 * i + j), f"{j}.png"),
                    TextItem(words(30 + 7 * i + j, 2 + j)),
                ]
            writer.write(InterleavedDocument(f"doc{i:03d}", items))
    print(f"wrote {GOLDEN_DIR}/{{clip,tokenizer,shards}}; now regenerate the goldens with each venv")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # internal: inside the pinned process
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        worker(Path(argv[1]), rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the fixture, write nothing")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="with --check: extra env"
    )
    parser.add_argument("--data", action="store_true", help="rebuild the recipe's CLIP, tokenizer and shards")
    args = parser.parse_args(argv)
    if args.data:
        build_data()
        return 0
    if args.env and not args.check:
        parser.error("--env is for experiments with --check; goldens are written under the pins alone")
    extra = dict(item.split("=", 1) for item in args.env)
    key = golden_key()
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        started = time.perf_counter()
        record = run_recipe(Path(tmp), extra_env=extra)
        wall = time.perf_counter() - started
    print(f"{key}: {len(record['steps'])} steps, {record['train_seconds']} s training, {wall:.1f} s in all")
    if args.check:
        golden = read_fixture().get("goldens", {}).get(key)
        if golden is None:
            print(f"no golden for {key} in {FIXTURE}")
            return 1
        text = report(golden, record, key)
        print(text or f"bitwise identical to the golden ({record['final_weights_sha256'][:16]}...)")
        return 1 if text else 0
    write_fixture(key, record)
    print(f"wrote {key} to {FIXTURE.relative_to(ROOT)}")
    for other, golden in read_fixture()["goldens"].items():
        if other != key:
            same = (
                not differences(golden, record)
                and golden["final_weights_sha256"] == record["final_weights_sha256"]
            )
            print(
                f"{other}: {'bitwise identical to this one' if same else 'other bits'}; regenerate it too if stale"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
