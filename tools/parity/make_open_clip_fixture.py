"""Write tests/fixtures/vision/: a tiny random open_clip ViT, its patch tokens, and open_clip's preprocessing.

Runs in the peer venv of tools/parity/setup_peer.sh, which has open_clip_torch 2.20.0 (OpenFlamingo 2.0.1's):

    /tmp/openflamingo-peer-venv/bin/python tools/parity/make_open_clip_fixture.py

tests/test_vision.py checks our converter and preprocessing against these files without open_clip.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "vision"

# Importing make_fixtures installs its torchvision stub, which must precede open_clip's torchvision import.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures  # noqa: E402

# isort: split

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MODEL_NAME = "openflamingo-fixture-vit-tiny"
MODEL_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
# (width, height): one image is shrunk (landscape), the other enlarged (portrait), so both crop axes are exercised.
IMAGE_SIZES = {"landscape": (53, 37), "portrait": (20, 45)}


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: resampling differences show up, and the values are exactly reproducible."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 127.5 + 127.5 * np.sin((x + 2 * y) / 3.0)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def randomise_zero_and_unit_params(visual: torch.nn.Module) -> None:
    """LayerNorms start at (1, 0) and attention biases at 0; perturb them so a mis-mapped key cannot hide."""
    with torch.no_grad():
        for name, param in visual.named_parameters():
            is_norm = ".ln_" in f".{name}" or name.startswith("ln_")
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / f"{MODEL_NAME}.json"
        config_path.write_text(json.dumps(MODEL_CONFIG))
        open_clip.add_model_config(str(config_path))
        torch.manual_seed(0)
        model, _, preprocess_val = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    model.eval()
    visual = model.visual
    visual.output_tokens = True  # what OpenFlamingo 2.0.1 sets: patch tokens come back before ln_post
    randomise_zero_and_unit_params(visual)

    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, patch_tokens = visual(pixels)

    # An open_clip checkpoint keeps the vision tower under "visual."; only that part is stored, to stay small.
    checkpoint = {f"visual.{key}": value.contiguous() for key, value in visual.state_dict().items()}
    save_file(checkpoint, str(OUT_DIR / "open_clip_tiny.safetensors"))
    (OUT_DIR / "open_clip_config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")

    tensors = {"pixels": pixels, "patch_tokens": patch_tokens.contiguous()}
    for seed, (label, (width, height)) in enumerate(IMAGE_SIZES.items()):
        image = make_image(width, height, seed)
        image.save(OUT_DIR / f"preprocess_{label}.png")
        # Reload from disk so open_clip sees exactly the bytes the test will read.
        tensors[f"preprocessed_{label}"] = preprocess_val(Image.open(OUT_DIR / f"preprocess_{label}.png"))
    save_file(tensors, str(OUT_DIR / "open_clip_tiny_expected.safetensors"))

    versions = {
        key: make_fixtures.package_versions()[key]
        for key in ("open_clip_torch", "torch", "torchvision", "pillow")
    }
    (OUT_DIR / "open_clip_versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"wrote {OUT_DIR}: patch tokens {tuple(patch_tokens.shape)}, versions {versions}")


if __name__ == "__main__":
    main()
