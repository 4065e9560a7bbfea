"""The feature cache beyond the demo: every frozen vision encoder kind (tiny random configs, the packaged
EfficientNet-Lite0 in the demo's layout, OpenFlamingo-3B's ViT-L/14 token layout), on real photos in the shard
layouts the project reads (converted captions, VQA, NLVR2, img2dataset tars) with bad images and a truncated shard,
several datasets sharing one cache. Training on the cache gives the loss of training on the images; a file's size is
feature_cache_bytes() exactly; a cache of another encoder, or a truncated file, is a one-line error naming it."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from helpers.data import FIXTURES, image_bytes, img2dataset_shard, write_shards
from helpers.train import config_of, one_thread, records, shard_run  # noqa: F401 (one_thread: autouse, 1 torch thread)
from PIL import Image
from tiny import TINY_CLIP, lm_config
from transformers import AutoTokenizer

from openflamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, VisionConfig, build_flamingo
from openflamingo.data import (
    DatasetConfig,
    FeatureCache,
    FormatConfig,
    ImageItem,
    ImageLimits,
    ImageTextPair,
    ShardLoader,
    build_feature_cache,
)
from openflamingo.data.convert import convert
from openflamingo.data.features import (
    HEADER_BYTES,
    StaleFeatureCacheError,
    UnreadableFeatureCacheError,
    feature_cache_bytes,
)
from openflamingo.train import train
from openflamingo.train.parallelize import cast_frozen
from openflamingo.train.shards import open_feature_cache

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")

SKIMAGE = FIXTURES / "skimage-clip-captions"
ALLENNLP = FIXTURES / "allennlp-vl-fixtures"
TINY_SIGLIP = dict(TINY_CLIP)  # the same tiny tower shape
OPEN_CLIP = json.loads((Path(__file__).parent / "fixtures" / "vision" / "open_clip_config.json").read_text())
# OpenFlamingo-3B/4B/9B's CLIP ViT-L/14 at 224 px as a 1-layer tower: the same 256 patch tokens x 1024 dims.
# How far narrow storage may move the loss (relative) and the perceiver's output (absolute, output ~3 in size); the
# measured moves are 3-10x smaller (fp16: 2e-7 and 5e-5, bf16: 1e-6 and 6e-4).
FP16_LOSS, FP16_VISUAL, BF16_LOSS, BF16_VISUAL = 1e-5, 5e-4, 1e-5, 2e-3
VIT_L14_LAYOUT = dict(
    hidden_size=1024,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
)
ENCODERS = {
    "hf_clip": VisionConfig("hf_clip", config=TINY_CLIP),
    "hf_clip-idefics": VisionConfig("hf_clip", config=TINY_CLIP, keep_cls=True, resize="squash"),
    "hf_siglip": VisionConfig("hf_siglip", config=TINY_SIGLIP),
    "open_clip": VisionConfig("open_clip", config=OPEN_CLIP),
    "efficientnet_lite0-demo": VisionConfig(
        "efficientnet_lite0", feature_stages=(1, 2), image_size=96, crop_padding=0
    ),
}


def flamingo(tokenizer_dir, vision: VisionConfig, max_num_frames: int | None = None):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = FlamingoConfig(
        language_model_config=lm_config("llama", tokenizer),
        tokenizer=str(tokenizer_dir),
        vision=vision,
        perceiver=PerceiverConfig(depth=1, num_latents=4, heads=2, dim_head=8, max_num_frames=max_num_frames),
        cross_attention=CrossAttentionConfig(every_n_layers=2, heads=2, dim_head=8, gate_init=0.5),
    )
    return build_flamingo(config, seed=0).eval()


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> dict[str, list[str]]:
    """Real photos as the project's converters and img2dataset write them, one folder per dataset; "bad" holds an
    undecodable image, an extreme aspect ratio and a good photo, then a shard cut off mid-sample."""
    root = tmp_path_factory.mktemp("real-shards")
    sources = {
        "captions": ("captions", [SKIMAGE / "captions.jsonl", ALLENNLP / "captions.jsonl"]),
        "vqa": ("vqa", [ALLENNLP / "vqa.jsonl"]),  # 8 questions on 2 photos: each photo stored once
        "nlvr2": ("nlvr2", [ALLENNLP / "nlvr2.jsonl"]),  # two photos per sample
    }
    shards = {}
    for name, (source, inputs) in sources.items():
        shards[name] = [str(p) for p in convert(source, [str(i) for i in inputs], root / name).shards]
    (root / "laion").mkdir()
    img2dataset_shard(root / "laion" / "00000.tar", 0)
    shards["laion"] = [str(root / "laion" / "00000.tar")]
    photo = (SKIMAGE / "images" / "horse.png").read_bytes()
    bad = [
        ImageTextPair("broken", ImageItem(b"not an image", "png"), "a broken picture"),
        ImageTextPair("sliver", ImageItem(png((420, 10)), "png"), "a thin red sliver"),
        ImageTextPair("horse", ImageItem(photo, "png"), "a horse again"),
        ImageTextPair("moon", ImageItem((SKIMAGE / "images" / "moon.png").read_bytes(), "png"), "the moon"),
    ]
    shards["bad"] = write_shards(root / "bad", bad, 2)
    last = Path(shards["bad"][-1])
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # a truncated tar
    return shards


def loader(shards, model, features=None, max_images: int = 2) -> ShardLoader:
    config = DatasetConfig(
        shards=shards,
        batch_size=3,
        shuffle_buffer=4,
        epochs=1,
        num_workers=0,
        format=FormatConfig(max_tokens=48, max_images=max_images),
        max_bad_fraction=None,
    )
    return ShardLoader(config, model.tokenizer, model.vision_encoder.preprocess_image, features=features)


def epoch(source, model) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of a whole epoch, and the perceiver's output for every real image: the loss of a tiny random
    model hardly depends on the images (its perceiver starts with a LayerNorm, its gates are small), the visual
    tokens do."""
    losses, visual = [], []
    with torch.no_grad():
        for batch in source:
            losses.append(model(**batch).loss)
            media = {k: batch[k] for k in ("images", "image_features") if k in batch}
            tokens = model.encode_images(**media, num_images=batch["num_images"].tolist())
            visual += [tokens[b, :n] for b, n in enumerate(batch["num_images"].tolist())]
    return torch.stack(losses), torch.cat(visual)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_every_encoder_kind_trains_on_cached_real_photos_with_the_loss_of_the_images(
    tokenizer_dir, tmp_path, real_shards, kind
):
    model = flamingo(tokenizer_dir, ENCODERS[kind])
    every = sorted(url for urls in real_shards.values() for url in urls)  # several datasets, one cache
    cache = FeatureCache(build_feature_cache(every, model, tmp_path / "f.safetensors", progress=False))
    encoder = model.vision_encoder
    assert cache.shape == (encoder.num_tokens, encoder.dim) and cache.dtype == torch.float32
    # 4 skimage + flickr + 2 VG + 2 NLVR2 photos; horse and flickr again elsewhere; moon is in the cut-off half
    assert cache.num_images == 9
    cache.check(model)
    for name, shards in real_shards.items():
        pixels, cached = loader(shards, model), loader(shards, model, cache)
        torch.testing.assert_close(epoch(cached, model), epoch(pixels, model))
        assert cached.stats() == pixels.stats()
        if name == "bad":  # skipped and counted alike, the truncated tail included
            assert cached.stats()["bad"] == {
                "undecodable_image": 1,
                "extreme_aspect_ratio": 1,
                "truncated_tar": 1,
            }


def test_openflamingo_3b_token_layout_builds_in_bf16_and_stores_512_kib_per_image(
    tokenizer_dir, tmp_path, real_shards
):
    """ViT-L/14 at 224 px: 256 tokens x 1024 dims. With the recipes' precision.frozen_dtype = "bf16" (matrices in
    bf16, vectors fp32) the encoder only runs under bf16 autocast, as the training step runs it."""
    model = flamingo(tokenizer_dir, VisionConfig("hf_clip", config=VIT_L14_LAYOUT))
    shards = real_shards["captions"] + real_shards["bad"]
    fp32 = FeatureCache(build_feature_cache(shards, model, tmp_path / "fp32.safetensors", progress=False))
    assert fp32.shape == (256, 1024) and fp32.num_images == 5
    assert fp32.path.stat().st_size == feature_cache_bytes(5, 256, 1024, torch.float32, num_bad=2)
    torch.testing.assert_close(epoch(loader(shards, model, fp32), model), epoch(loader(shards, model), model))

    cast_frozen(model, torch.bfloat16)
    path = build_feature_cache(
        shards, model, tmp_path / "bf16.safetensors", progress=False, feature_dtype=torch.bfloat16
    )
    cache = FeatureCache(path)
    assert cache.storage_dtype == torch.bfloat16 and cache.dtype == torch.float32  # what CLIP hands on
    assert path.stat().st_size == HEADER_BYTES + 5 * (512 * 1024 + 32) + 2 * 33
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live = epoch(loader(shards, model), model)
        cached = epoch(loader(shards, model, cache), model)
    # bf16 matmuls round differently for other batch shapes (the cache encodes 16 images at a time, a step 3): the
    # live path is no closer to itself. Measured: loss 4e-5, visual tokens 8e-3 (of ~4).
    torch.testing.assert_close(cached[0], live[0], rtol=2e-4, atol=0)
    torch.testing.assert_close(cached[1], live[1], rtol=0, atol=3e-2)


def test_cached_frames_give_the_loss_of_the_video_frames(tokenizer_dir, real_shards, tmp_path):
    """Media of several frames (B, T_img, F, ...): one cache row per frame image, stacked as the frames are."""
    model = flamingo(tokenizer_dir, ENCODERS["hf_siglip"], max_num_frames=2)
    cache = FeatureCache(
        build_feature_cache(real_shards["captions"], model, tmp_path / "f.safetensors", progress=False)
    )
    photos = [(SKIMAGE / "images" / name).read_bytes() for name in ("page.png", "rocket.jpg", "horse.png")]
    photos.append((ALLENNLP / "images" / "flickr30k" / "4945942737.jpg").read_bytes())
    frames = [photos[:2], photos[2:]]  # two clips of two frames
    images = torch.stack(
        [
            torch.stack(
                [
                    model.vision_encoder.preprocess_image(Image.open(io.BytesIO(f)).convert("RGB"))
                    for f in clip
                ]
            )
            for clip in frames
        ]
    )[None]
    features = torch.stack([torch.stack([cache.lookup(f, "frame") for f in clip]) for clip in frames])[None]
    ids = model.tokenizer(["<image>a rocket<|endofchunk|><image>a horse"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        live = model(ids, images=images, labels=ids).loss
        cached = model(ids, image_features=features, labels=ids).loss
    torch.testing.assert_close(cached, live)
    with torch.no_grad():
        live_tokens = model.encode_images(images)
        torch.testing.assert_close(model.encode_images(image_features=features), live_tokens)


def small_shards(directory: Path) -> list[str]:
    samples = [ImageTextPair(f"p{i}", ImageItem(image_bytes(i), "png"), f"a cat {i}") for i in range(5)]
    samples.append(ImageTextPair("broken", ImageItem(b"not an image", "png"), "a broken picture"))
    return write_shards(directory, samples, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_file_size_is_the_formula_and_narrow_storage_keeps_the_loss(tokenizer_dir, tmp_path, dtype):
    model = flamingo(tokenizer_dir, ENCODERS["hf_clip"])
    shards = small_shards(tmp_path / "shards")
    path = build_feature_cache(shards, model, tmp_path / "f.safetensors", progress=False, feature_dtype=dtype)
    encoder = model.vision_encoder
    assert path.stat().st_size == feature_cache_bytes(5, encoder.num_tokens, encoder.dim, dtype, num_bad=1)
    cache = FeatureCache(path)
    assert cache.storage_dtype == dtype and cache.dtype == torch.float32
    assert cache.lookup(image_bytes(0), "p0").dtype == torch.float32
    live = epoch(loader(shards, model), model)
    cached = epoch(loader(shards, model, cache), model)
    if dtype == torch.float32:
        torch.testing.assert_close(cached, live)
    else:  # fp16 keeps 11 significant bits, bf16 8
        loss, visual = {torch.float16: (FP16_LOSS, FP16_VISUAL), torch.bfloat16: (BF16_LOSS, BF16_VISUAL)}[
            dtype
        ]
        torch.testing.assert_close(cached[0], live[0], rtol=loss, atol=0)
        torch.testing.assert_close(cached[1], live[1], rtol=0, atol=visual)


def test_building_reports_images_per_second_and_bytes_written(tokenizer_dir, tmp_path, capsys, caplog):
    model = flamingo(tokenizer_dir, ENCODERS["hf_clip"])
    with caplog.at_level(logging.INFO, logger="openflamingo"):
        path = build_feature_cache(small_shards(tmp_path / "shards"), model, tmp_path / "f.safetensors")
    err = capsys.readouterr().err
    assert "image/s" in err or "images/s" in err  # the bar's rate
    last = caplog.messages[-1]  # the report, logged
    assert last.startswith(f"feature cache {path}: 5 images (1 bad, skipped) in ") and "images/s" in last
    assert f"wrote {path.stat().st_size:,} bytes" in last


def test_a_cache_of_another_encoder_kind_or_a_damaged_file_is_refused_naming_it(
    tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path / "cache"))
    shards = small_shards(tmp_path / "shards")
    configs = {"pairs": DatasetConfig(shards=shards, batch_size=2)}
    clip, siglip = (flamingo(tokenizer_dir, ENCODERS[k]) for k in ("hf_clip", "hf_siglip"))
    built = open_feature_cache(configs, clip, 0, ImageLimits()).path
    other = build_feature_cache(shards, siglip, tmp_path / "siglip.safetensors", progress=False)
    with pytest.raises(StaleFeatureCacheError, match="another vision encoder") as error:
        FeatureCache(other).check(clip)
    assert "\n" not in str(error.value)
    intact = built.read_bytes()
    built.write_bytes(other.read_bytes())  # a file copied under the name of clip's cache
    with pytest.raises(StaleFeatureCacheError, match=f"{built}.*another vision encoder"):
        open_feature_cache(configs, clip, 0, ImageLimits())

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    damaged = {
        "truncated": intact[: len(intact) - 100],
        "header only": intact[:HEADER_BYTES],
        "empty": b"",
        "garbage": os.urandom(len(intact)),
        "another file": (tmp_path / "other.safetensors").read_bytes(),
    }
    for why, data in damaged.items():
        built.write_bytes(data)
        with pytest.raises(UnreadableFeatureCacheError, match="delete the file to rebuild it") as error:
            open_feature_cache(configs, clip, 0, ImageLimits())
        message = str(error.value)
        assert message.startswith(f"feature cache {built} cannot be read (") and "\n" not in message, why


def two_dataset_run(tokenizer_dir, root: Path, output_dir: Path, feature_cache: bool, **data):
    run = shard_run(tokenizer_dir, root, output_dir, train={"steps": 2})
    run["model"]["vision"] = {"kind": "hf_siglip", "config": TINY_SIGLIP}
    run["model"]["cross_attention"]["zero_init_output"] = False  # the images count from the first step on
    run["datasets"]["pairs"]["path"] = str(root / "captions")
    run["datasets"]["docs"]["path"] = str(root / "vqa")
    run["data"].update(feature_cache=feature_cache, **data)
    run["checkpoint"] = {"every": 0, "export": False}
    return config_of(run)


def test_a_siglip_run_over_two_datasets_trains_on_one_cache_as_on_the_images(
    tokenizer_dir, tmp_path, real_shards, monkeypatch
):
    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path / "cache"))
    root = Path(real_shards["captions"][0]).parent.parent
    train(two_dataset_run(tokenizer_dir, root, tmp_path / "cached", True))
    (built,) = (tmp_path / "cache" / "features").iterdir()
    assert FeatureCache(built).num_images == 5 + 2  # the captions' photos and the VQA photos
    train(two_dataset_run(tokenizer_dir, root, tmp_path / "pixels", False))
    train(two_dataset_run(tokenizer_dir, root, tmp_path / "fp16", True, feature_dtype="fp16"))
    assert {FeatureCache(p).storage_dtype for p in (tmp_path / "cache" / "features").iterdir()} == {
        torch.float32,
        torch.float16,
    }
    losses = {
        run: [r["loss"] for r in records(tmp_path / run).values()] for run in ("cached", "pixels", "fp16")
    }
    # Measured: cached = pixels bit for bit, fp16 1e-7 apart; noise of 0.01 on the cached tokens moves step 2 by 5e-6.
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-6)
    assert losses["fp16"] == pytest.approx(losses["pixels"], rel=1e-6)
    with pytest.raises(ValueError, match="data.feature_dtype: 'int8' is not one of auto, bf16, fp16, fp32"):
        two_dataset_run(tokenizer_dir, root, tmp_path / "bad", True, feature_dtype="int8")
