"""Where metrics go (rank 0 only): a console progress bar, JSON lines, TensorBoard and, optionally, W&B."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import LogConfig

logger = logging.getLogger(__name__)


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics flattened to TensorBoard tags: {"loss": {"pairs": 1.2}} -> {"loss/pairs": 1.2}."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, f"{tag}/"))
        elif isinstance(value, (list, tuple)):
            out.update({f"{tag}/{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class MetricLogger:
    def __init__(
        self,
        config: LogConfig,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.bar = self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if config.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if config.jsonl:
            self.jsonl = open(
                output_dir / "metrics.jsonl", "a"
            )  # appended across resumes; the last record per step wins
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                warnings.warn(
                    "log.tensorboard: the tensorboard package is not installed; skipping TensorBoard logs",
                    stacklevel=2,
                )
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise InputError(
                    "log.wandb: true but the wandb package is not installed (pip install wandb)"
                ) from None
            self.wandb = wandb.init(
                project=config.wandb_project, dir=str(output_dir), config=run_config, resume="allow"
            )

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        scalars = _scalars(record)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def progress(self, steps: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            logger.info(message)

    def close(self) -> None:
        for sink in (self.bar, self.jsonl, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()
