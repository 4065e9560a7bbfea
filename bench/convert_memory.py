"""Peak memory of `openflamingo convert idefics` against the bytes of the weights it converts.

Writes an IDEFICS-shaped Hub directory with random bf16 weights (the Hub's dtype; tests/idefics_reference.py lays it
out, nothing is downloaded), then converts it in a child process of its own (peak RSS is per process) and prints one
JSON line: the weights' bytes, the child's RSS before the conversion and its peak during it (VmHWM, which counts the
mapped safetensors pages too), and the peak's growth over the weights' bytes.

    .venv/bin/python bench/convert_memory.py [--hidden 2048] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over exec from the parent,
    which had the random model of `write_source` in memory."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def write_source(root: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """A bf16 IDEFICS directory (LM of `hidden` x `layers`, a block every 2nd layer, a small vision tower) and the
    bytes of its weights."""
    import torch
    from idefics_reference import idefics_config, make_idefics_tokenizer, save_hub_layout
    from transformers import IdeficsForVisionText2Text

    tokenizer = make_idefics_tokenizer(root / "tokenizer-src")
    config = idefics_config(
        tokenizer,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        cross_layer_interval=2,
    )
    model = IdeficsForVisionText2Text(config).to(torch.bfloat16)
    source = save_hub_layout(model, tokenizer, root / "idefics")
    return source, sum(p.numel() * p.element_size() for p in model.state_dict().values())


def convert_and_measure(source: Path, out: Path) -> dict:
    from openflamingo.model.convert.idefics import convert_idefics

    before = status_mb("VmRSS")
    convert_idefics(source, out)
    return {"rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", type=Path, nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    if args.child:
        print(json.dumps(convert_and_measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        source, weight_bytes = write_source(Path(tmp), args.hidden, args.layers)
        child = [sys.executable, __file__, "--child", str(source), str(Path(tmp) / "out")]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    weights_mb = weight_bytes / 2**20
    growth = result["peak_rss_mb"] - result["rss_before_mb"]
    print(
        json.dumps(
            {
                "hidden": args.hidden,
                "layers": args.layers,
                "weights_mb": round(weights_mb, 1),
                **{key: round(value, 1) for key, value in result.items()},
                "peak_growth_over_weights": round(growth / weights_mb, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
