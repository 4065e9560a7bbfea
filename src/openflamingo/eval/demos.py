"""Choosing demonstrations: random from a per-trial query set, or RICES (retrieval by image similarity).

Every choice depends only on the trial seed and the query example's id, never on batch composition or process rank,
so a distributed run picks exactly the demonstrations a single-process run does.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import InputError
from .datasets import Example


def demo_pool_error(needed: int, available: int, what: str) -> InputError:
    return InputError(
        f"{needed} demonstrations per prompt need at least {needed} examples, but {what} has {available}"
    )


class RandomDemos:
    """OpenFlamingo's scheme: a query set of `query_set_size` training examples drawn with the trial seed, then
    for each evaluated example a random sample from it."""

    def __init__(self, pool: list[Example], query_set_size: int, seed: int):
        rng = random.Random(seed)
        size = min(query_set_size, len(pool))
        self.query_set = [pool[i] for i in sorted(rng.sample(range(len(pool)), size))]
        self.seed = seed

    def check(self, needed: int) -> None:
        if needed > len(self.query_set):
            raise demo_pool_error(needed, len(self.query_set), "the demonstration query set")

    def select(self, query: Example, count: int) -> list[Example]:
        rng = random.Random(f"{self.seed}/{query.key}")
        return rng.sample(self.query_set, count)


class AttachedDemos:
    """Tasks whose examples bring their own demonstrations (`info["demos"]`, e.g. binding prompts): the first
    `count` of them, in their order."""

    def __init__(self, examples: list[Example]):
        self.fewest = min(len(e.info["demos"]) for e in examples)

    def check(self, needed: int) -> None:
        if needed > self.fewest:
            raise demo_pool_error(needed, self.fewest, "each example's own demonstration list")

    def select(self, query: Example, count: int) -> list[Example]:
        return query.info["demos"][:count]


def image_features(
    model, examples: list[Example], batch_size: int, device: torch.device, progress=None
) -> torch.Tensor:
    """Unit-norm image embeddings from the model's own vision encoder (mean of its patch tokens); examples with
    several images get the mean of their images' embeddings."""
    from .inference import open_images
    from .prompts import Prompt

    features = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        images = open_images([Prompt("", [c[0] for c in e.images]) for e in batch])
        flat = [image for sample in images for image in sample]
        with torch.no_grad():
            pixels = model.vision_encoder.preprocess(flat).to(device)
            tokens = model.vision_encoder(pixels).float().mean(dim=1)
        tokens = torch.nn.functional.normalize(tokens, dim=-1).cpu()
        counts = [len(sample) for sample in images]
        for chunk in tokens.split(counts):
            features.append(torch.nn.functional.normalize(chunk.mean(0), dim=-1))
        if progress is not None:
            progress.update(len(batch))
    return torch.stack(features)


def pool_fingerprint(pool: list[Example], model_config: dict) -> str:
    ids = json.dumps([[e.key, [str(c[0]) for c in e.images]] for e in pool])
    encoder = json.dumps(model_config.get("vision", {}), sort_keys=True, default=str)
    return hashlib.sha256((ids + encoder).encode()).hexdigest()


class RicesDemos:
    """Retrieval-based In-Context Example Selection (Yang et al. 2022; OpenFlamingo): the demonstrations are the
    pool examples most similar to the query image, ordered so that the most similar comes last (next to the query).

    Pool features are cached in `cache_file` when given, keyed by the pool's ids/paths and the vision encoder."""

    def __init__(
        self,
        model,
        pool: list[Example],
        batch_size: int,
        device,
        cache_file: Path | None,
        progress=None,
        write_cache: bool = True,  # False on all ranks but one
    ):
        self.model, self.pool, self.batch_size, self.device = model, pool, batch_size, device
        fingerprint = pool_fingerprint(pool, model.config.to_dict())
        if cache_file is not None and Path(cache_file).is_file():
            with safe_open(str(cache_file), "pt") as stored:
                stored_fingerprint = (stored.metadata() or {}).get("fingerprint")
            if stored_fingerprint != fingerprint:
                raise InputError(
                    f"{cache_file}: RICES features were computed for another demonstration pool or vision encoder; "
                    "delete the file or pass another --rices-cache"
                )
            self.features = load_file(str(cache_file))["features"]
        else:
            self.features = image_features(model, pool, batch_size, device, progress)
            if cache_file is not None and write_cache:
                Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
                save_file(
                    {"features": self.features.contiguous()},
                    str(cache_file),
                    metadata={"fingerprint": fingerprint},
                )
        self.query_features: dict[str, torch.Tensor] = {}

    def check(self, needed: int) -> None:
        if needed > len(self.pool):
            raise demo_pool_error(needed, len(self.pool), "the demonstration pool")

    def prepare(self, queries: list[Example]) -> None:
        """Embed the evaluated examples once (they are shared by all shots and trials)."""
        todo = [q for q in queries if q.key not in self.query_features]
        if todo:
            features = image_features(self.model, todo, self.batch_size, self.device)
            self.query_features.update({q.key: f for q, f in zip(todo, features, strict=True)})

    def select(self, query: Example, count: int) -> list[Example]:
        if count == 0:
            return []
        self.prepare([query])
        similarity = self.features @ self.query_features[query.key]
        best = torch.topk(similarity, count).indices.tolist()  # most similar first
        return [self.pool[i] for i in reversed(best)]
