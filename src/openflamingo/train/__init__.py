"""Training: typed run configs, the loop, DDP/FSDP2, DCP checkpoints with exact resume, metrics and logs.

The inference library (model, generate, checkpoint loading) never imports this package, and this package imports
its optional dependencies (tensorboard, wandb) only when a run asks for them.
"""

from .config import DatasetConfig, RunConfig, load_config
from .loop import NonFiniteLossError, TrainResult, train

__all__ = ["DatasetConfig", "NonFiniteLossError", "RunConfig", "TrainResult", "load_config", "train"]
