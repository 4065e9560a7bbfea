"""The feature cache of the frozen vision encoder (`[data] feature_cache`): training on cached patch tokens computes
the same loss and gradients as training on the images, each distinct image is stored once, and a cache that does
not fit the shards or the encoder is refused with a one-line error."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.data import image_bytes, mixed_shards, pair, write_shards
from helpers.model import META, ReachedModel, assert_on, tiny_model
from helpers.train import config_of, one_thread, records, shard_run  # noqa: F401 (one_thread: autouse, 1 torch thread)
from PIL import Image

from openflamingo.data import (
    BadSample,
    DatasetConfig,
    FeatureCache,
    FormatConfig,
    ImageItem,
    ImageLimits,
    ImageTextPair,
    PackingConfig,
    ShardLoader,
    build_feature_cache,
)
from openflamingo.data.features import StaleFeatureCacheError
from openflamingo.train import distributed, train
from openflamingo.train.data import build_loader
from openflamingo.train.shards import open_feature_cache

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return tiny_model(tokenizer_dir)


def bad_pair(i: int) -> ImageTextPair:
    return ImageTextPair(f"bad{i:04d}", ImageItem(b"not an image", "png"), f"a broken picture {i}")


def loader(shards, model, packed: bool, features=None) -> ShardLoader:
    config = DatasetConfig(
        shards=shards,
        batch_size=4,
        shuffle_buffer=8,
        epochs=1,
        num_workers=0,
        format=FormatConfig(max_tokens=64, max_images=3),
        packing=PackingConfig(row_tokens=96, max_images_per_row=6) if packed else None,
        max_bad_fraction=None,
    )
    return ShardLoader(config, model.tokenizer, model.vision_encoder.preprocess_image, features=features)


def encoder_output(model, data: bytes) -> torch.Tensor:
    pixels = model.vision_encoder.preprocess_image(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.no_grad():
        return model.vision_encoder(pixels[None])[0]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_and_perceiver_gradients_are_the_same_with_the_feature_cache(model, tmp_path, packed):
    shards = mixed_shards(tmp_path / "shards") + write_shards(tmp_path / "bad", [bad_pair(0), pair(0)], 5)
    cache = FeatureCache(
        build_feature_cache(shards, model, tmp_path / "features.safetensors", progress=False)
    )
    results = []
    for source in (loader(shards, model, packed), loader(shards, model, packed, cache)):
        model.zero_grad()
        batches, losses = list(source), []
        for batch in batches:  # a whole epoch, gradients summed
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.perceiver.named_parameters()}
        results.append((batches, torch.stack(losses), grads, source.stats()))
    (pixels, losses, grads, stats), (features, cached_losses, cached_grads, cached_stats) = results
    num_tokens, dim = model.vision_encoder.num_tokens, model.vision_encoder.dim
    for with_pixels, with_features in zip(pixels, features, strict=True):
        assert "images" not in with_features and "image_features" not in with_pixels
        shape = (*with_pixels["images"].shape[:3], num_tokens, dim)
        assert with_features["image_features"].shape == shape
        for key in ("input_ids", "labels", "num_images"):
            assert torch.equal(with_pixels[key], with_features[key])
    torch.testing.assert_close(cached_losses, losses)
    assert any(bool(g.abs().sum() > 0) for g in grads.values())
    torch.testing.assert_close(cached_grads, grads)
    assert cached_stats == stats and stats["bad"] == {"undecodable_image": 1}  # skipped and counted alike


def test_each_distinct_image_is_stored_once_and_looked_up_as_the_encoder_output(model, tmp_path):
    copy = ImageTextPair("copy", ImageItem(image_bytes(1), "jpg"), "the same picture again")
    shards = write_shards(tmp_path, [pair(0), pair(1), copy, pair(2), bad_pair(0), bad_pair(1)], 3)
    path = build_feature_cache(
        shards, model, tmp_path / "cache" / "f.safetensors", batch_size=2, progress=False
    )
    cache = FeatureCache(path)
    assert cache.num_images == 3 and cache.shape == (
        model.vision_encoder.num_tokens,
        model.vision_encoder.dim,
    )
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]  # no temporary file left behind
    for i in range(3):
        torch.testing.assert_close(
            cache.lookup(image_bytes(i), f"pair{i}"), encoder_output(model, image_bytes(i))
        )
    with pytest.raises(BadSample) as bad:
        cache.lookup(b"not an image", "bad0001.png")
    assert bad.value.reason == "undecodable_image"


def test_a_stale_cache_and_another_encoder_are_one_line_errors(model, tokenizer_dir, tmp_path):
    old = write_shards(tmp_path / "old", [pair(i) for i in range(3)], 3)
    cache = FeatureCache(build_feature_cache(old, model, tmp_path / "f.safetensors", progress=False))
    new = write_shards(tmp_path / "new", [pair(i) for i in range(2, 6)], 4)
    with pytest.raises(
        StaleFeatureCacheError, match=r"pair000[345]\.png is not in the feature cache .* stale"
    ) as error:
        next(iter(loader(new, model, packed=False, features=cache)))
    assert "\n" not in str(error.value) and new[0] in str(error.value)

    cache.check(model)
    other = tiny_model(tokenizer_dir)
    with torch.no_grad():
        next(other.vision_encoder.parameters()).add_(0.01)
    with pytest.raises(StaleFeatureCacheError, match="another vision encoder") as error:
        cache.check(other)
    assert "\n" not in str(error.value)

    other.vision_encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="the vision encoder is trained in this run"):
        open_feature_cache({}, other, 0, ImageLimits())


def test_feature_cache_needs_the_shards_loader(tokenizer_dir, tmp_path):
    run = shard_run(tokenizer_dir, tmp_path, tmp_path / "run")
    run["data"] = {"loader": "synthetic", "feature_cache": True}
    with pytest.raises(ValueError, match='data.feature_cache: only the "shards" loader'):
        config_of(run)


def feature_cache_run(tokenizer_dir, tmp_path, output_dir, feature_cache: bool):
    run = shard_run(tokenizer_dir, tmp_path / "shards", output_dir, train={"steps": 2})
    run["data"]["feature_cache"] = feature_cache
    run["checkpoint"] = {"every": 0, "export": False}
    return config_of(run)


def test_training_with_a_feature_cache_builds_it_once_and_matches_training_on_images(
    tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path / "cache"))
    mixed_shards(tmp_path / "shards")
    train(feature_cache_run(tokenizer_dir, tmp_path, tmp_path / "cached", feature_cache=True))
    (built,) = (tmp_path / "cache" / "features").iterdir()
    seeds = [
        *range(24),
        *(1000 + 10 * i + j for i in range(16) for j in range(1 + i % 3)),
    ]  # mixed_shards' images
    assert built.suffix == ".safetensors" and FeatureCache(built).num_images == len(
        set(map(image_bytes, seeds))
    )
    stamp = built.stat().st_mtime_ns
    train(feature_cache_run(tokenizer_dir, tmp_path, tmp_path / "again", feature_cache=True))
    assert built.stat().st_mtime_ns == stamp  # found, not rebuilt
    train(feature_cache_run(tokenizer_dir, tmp_path, tmp_path / "pixels", feature_cache=False))
    cached, pixels = records(tmp_path / "cached"), records(tmp_path / "pixels")
    assert [r["loss"] for r in cached.values()] == pytest.approx(
        [r["loss"] for r in pixels.values()], rel=1e-5
    )


@pytest.mark.parametrize("mfu", [True, False], ids=["flop-count", "training-step"])
def test_training_sends_cached_features_to_the_model_device(tokenizer_dir, tmp_path, monkeypatch, mfu):
    import openflamingo.train.loop as loop

    monkeypatch.setenv("OPENFLAMINGO_CACHE", str(tmp_path / "cache"))
    mixed_shards(tmp_path / "shards")
    config = feature_cache_run(tokenizer_dir, tmp_path, tmp_path / "run", feature_cache=True)
    config.log.mfu = mfu
    # The cache is built on the CPU (a meta-device encoder computes nothing); the run then moves its batches.
    cpu_model = loop.build_or_load(config.model, seed=0)
    cached = build_loader(config.enabled_datasets(), config.data, cpu_model, rank=0, world_size=1, seed=0)
    monkeypatch.setattr(loop, "build_loader", lambda *args, **kwargs: cached)
    monkeypatch.setattr(distributed, "setup", lambda device="auto": distributed.Distributed(device=META))
    build = loop.build_or_load

    def check(module, args, kwargs):
        assert kwargs.get("images") is None and kwargs["image_features"].device == META
        assert_on(META, "forward", args, kwargs)

    def build_checked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(check, with_kwargs=True)
        return model

    monkeypatch.setattr(loop, "build_or_load", build_checked)
    with pytest.raises(ReachedModel, match="forward"):
        train(config)


def test_check_inputs_names_what_is_wrong_with_image_features(model):
    ids = model.tokenizer(["<image>a cat"], return_tensors="pt")["input_ids"]
    features = torch.zeros(1, 1, 1, model.vision_encoder.num_tokens, model.vision_encoder.dim)
    model.check_inputs(ids, None, None, [1], features)
    with pytest.raises(ValueError, match=r"need B equal and \(num_tokens, D_vis\)"):
        model.check_inputs(ids, None, None, [1], features[..., :-1])
    with pytest.raises(ValueError, match="image_features must be a float tensor"):
        model.check_inputs(ids, None, None, [1], features[0])
    with pytest.raises(ValueError, match="not both"):
        model.check_inputs(ids, torch.zeros(1, 1, 1, 3, 32, 32), None, [1], features)
