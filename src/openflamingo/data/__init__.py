"""Data: sample types, WebDataset tar shards, formatting and labels, packing, resumable loaders, converters."""

from .batching import Batcher, PackingConfig, PreparedSample, collate_packed, collate_padded, pack_rows
from .dataset import BadDataError, DatasetConfig, ShardStream
from .features import FeatureCache, build_feature_cache
from .images import ImageLimits, decode_image
from .loader import MixedLoader, ShardLoader
from .samples import (
    BAD_REASONS,
    BadSample,
    ImageItem,
    ImageTextPair,
    InterleavedDocument,
    TextItem,
    sample_from_members,
)
from .shards import ShardWriter, expand_shards, read_shard
from .text import FormatConfig, SampleFormatter

__all__ = [
    "BAD_REASONS",
    "BadDataError",
    "Batcher",
    "BadSample",
    "DatasetConfig",
    "FeatureCache",
    "FormatConfig",
    "ImageItem",
    "ImageLimits",
    "ImageTextPair",
    "InterleavedDocument",
    "MixedLoader",
    "PackingConfig",
    "PreparedSample",
    "SampleFormatter",
    "ShardLoader",
    "ShardStream",
    "ShardWriter",
    "TextItem",
    "build_feature_cache",
    "collate_packed",
    "collate_padded",
    "decode_image",
    "expand_shards",
    "pack_rows",
    "read_shard",
    "sample_from_members",
]
