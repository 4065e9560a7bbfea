#!/usr/bin/env python
"""The picture of the chat page in docs/serving.md, taken by the page test's own harness from the real page.

    .venv/bin/python tools/serve_screenshot.py [--checkpoint runs/demo/final] [--out docs/serve-chat.png]

Serves the checkpoint on a free local port, opens `/` in headless Chromium (tests/serving.py), asks about an
easy-VQA test image, then asks a second question about a second image with the first turn as context, and saves
the window.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serving import ask_in_page, running_server, start_chromium  # noqa: E402

from openflamingo.model.checkpoint import load  # noqa: E402
from openflamingo.serve.app import Settings  # noqa: E402
from openflamingo.serve.images import ImagePolicy  # noqa: E402
from openflamingo.serve.protocol import Limits  # noqa: E402

TURNS = [
    (3, "what shape is in the image?"),
    (10, "what color is the shape?"),
]  # (easy-VQA test image id, question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "runs/demo/final")
    parser.add_argument("--out", type=Path, default=REPO / "docs/serve-chat.png")
    args = parser.parse_args()
    from easy_vqa import get_test_image_paths

    torch.set_num_threads(2)
    model = load(args.checkpoint).eval()
    settings = Settings(Limits("runs/demo/final"), ImagePolicy(), model.config.prompt_format)
    paths = get_test_image_paths()
    with tempfile.TemporaryDirectory() as tmp, running_server(model, settings) as (url, _):
        driver = start_chromium(900, 820)
        try:
            driver.get(url + "/")
            for image_id, question in TURNS:
                image = Path(tmp) / f"{image_id}.png"
                image.write_bytes(Path(paths[image_id]).read_bytes())
                print(question, "->", ask_in_page(driver, question, [image]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
