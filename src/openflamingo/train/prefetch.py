"""Micro-steps loaded ahead on a background thread, checked and prepared on the CPU, then copied to the device.

The GPU should never wait for data, and the training step should never wait for the GPU. So everything that needs
to look at a batch's values happens here, on the CPU copy, before the step: the model's input checks, which
positions get logits, the loss targets, the token counts. The step then only launches work on the device.

Exact resume: the loader runs ahead of the training loop, so this wrapper's `state_dict()` is the loader state
recorded right after the last micro-step it handed out, not the loader's own (which has moved on).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..model.flamingo import Flamingo, next_token_targets
from ..model.inputs import map_tensors, to_device
from .data import TrainLoader

Batch = dict[str, Any]


def prepare_batch(model: Flamingo, batch: Batch) -> Batch:
    """A loader batch as the training step takes it: inputs checked (errors name the problem, as the model's own
    forward would), logits requested only where a label follows (as flat indices), the labels those positions
    predict, the number of loss tokens (a 0-d tensor: it travels with the batch to the device, where the loss is
    normalised) and of real tokens (a float: throughput is counted on the host)."""
    model.check_inputs(
        batch["input_ids"],
        batch.get("images"),
        batch.get("attention_mask"),
        batch.get("num_images"),
        batch.get("image_features"),  # with a feature cache: the vision encoder's tokens instead of images
    )
    positions, targets = next_token_targets(batch["labels"], batch.get("document_ids"))
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "num_images" in inputs:
        # A list stays on the host: the model picks the real images without a device sync.
        inputs["num_images"] = inputs["num_images"].tolist()
    if mask is not None and bool(mask.all()):
        # No padding: without a mask the LM takes its causal fast path (flash attention) and does not ask the
        # device whether the mask has padding.
        del inputs["attention_mask"]
    return {
        "inputs": {**inputs, "logits_at": positions.flatten().nonzero().squeeze(1)},
        "targets": targets,
        "loss_tokens": torch.tensor(len(targets), dtype=torch.float64),
        "tokens": float(tokens),  # for throughput, on the host
    }


class _Finished:
    """What the thread puts in the queue instead of a micro-step when the loader ended or failed."""

    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Iterate `loader` `depth` micro-steps ahead on a thread; each `next()` is one prepared micro-step on `device`.

    `wait_seconds` adds up the time `next()` blocked: the data-wait the training loop reports.
    """

    def __init__(
        self,
        loader: TrainLoader,
        device: torch.device,
        prepare: Callable[[Batch], Batch],
        depth: int = 2,
    ):
        self.loader = loader
        self.device = device
        self.prepare = prepare
        self.pin = device.type == "cuda"
        self.wait_seconds = 0.0
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="openflamingo-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                step = next(self.loader)
                state = self.loader.state_dict()
                prepared = {name: self.prepare(batch) for name, batch in step.items()}
                # Page-locked memory, so the copies to the GPU run asynchronously.
                pinned = map_tensors(torch.Tensor.pin_memory, prepared) if self.pin else prepared
                item: Any = (pinned, state)
            except BaseException as error:  # StopIteration included: the main thread re-raises it
                item = _Finished(error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Finished):
                return

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, Batch]:
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, _Finished):
            self._queue.put(item)  # later calls fail the same way
            raise item.error
        step, self._state = item
        return to_device(step, self.device, non_blocking=self.pin)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
