"""The loop's pieces used on their own, as a newcomer changing the loop would: `setup` builds what a run uses,
`Trainer.train_step` takes one optimizer step and returns its `StepStats`, a `StepWindow` reads them as a
`WindowRecord`, and `TrainState.state_dict()` is what checkpoints hold. Driven by hand they give `train()`'s losses."""

from __future__ import annotations

import torch
from helpers.train import config_of, one_thread, tiny_run  # noqa: F401  (one_thread: autouse)

from openflamingo.train import distributed
from openflamingo.train.loop import StepWindow, TrainState, setup, train
from openflamingo.train.prefetch import DevicePrefetcher, prepare_batch


def test_train_steps_by_hand_give_the_losses_train_gives(tokenizer_dir, tmp_path):
    config = config_of(tiny_run(tokenizer_dir, tmp_path / "run", train={"steps": 3, "grad_accum": 2}))
    expected = train(config).losses

    dist = distributed.Distributed()
    trainer = setup(config, dist)
    torch.manual_seed(config.train.seed)  # what the loop seeds runtime randomness with on rank 0
    prefetcher = DevicePrefetcher(
        trainer.loader, dist.device, lambda batch: prepare_batch(trainer.flamingo, batch)
    )
    window = StepWindow(trainer.names, prefetcher, trainer.throughput, dist.device, nonfinite_in_row=0)
    try:
        stats = [trainer.train_step([next(prefetcher) for _ in range(2)]) for _ in range(3)]
    finally:
        prefetcher.close()
    assert [s.step for s in stats] == [1, 2, 3]
    assert all(s.loss.shape == () and s.dataset_loss.shape == (len(trainer.names),) for s in stats)
    for s in stats:
        window.add(s)
    record = window.flush()
    assert record.losses == expected  # bitwise: the same step, driven by hand
    assert record.skipped == [] and record.nonfinite_in_row == 0 and record.tokens > 0
    assert set(record.metrics["dataset_loss"]) == set(trainer.names) and record.metrics["lr"] == stats[-1].lr
    assert window.steps == []  # a new window starts


def test_the_train_state_is_the_checkpoints_train_entry(tokenizer_dir, tmp_path):
    config = config_of(tiny_run(tokenizer_dir, tmp_path, train={"steps": 2}, checkpoint={"every": 2}))
    train(config)
    saved = TrainState()
    reader = torch.distributed.checkpoint.FileSystemReader(str(tmp_path / "checkpoints" / "step_00000002"))
    keys = {k.split(".", 1)[1] for k in reader.read_metadata().state_dict_metadata if k.startswith("train.")}
    assert keys == {k if k != "schedule" else "schedule.step" for k in saved.state_dict()}
    saved.load_state_dict({**saved.state_dict(), "step": 2, "tokens_seen": 7})
    assert (saved.step, saved.tokens_seen) == (2, 7)
