"""Training on a tiny random model: logs, export, accumulation, activation checkpointing, NaN handling, checkpoints
and exact resume after SIGKILL."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.train import (
    FINE_TUNED_LM,
    _launch,
    config_of,
    kill_after_logged_steps,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    records,
    tiny_run,
    trainable_state,
)

from openflamingo import load
from openflamingo.train import NonFiniteLossError, train
from openflamingo.train.config import to_toml
from openflamingo.train.data import LOADERS, SyntheticLoader, build_synthetic_loader
from openflamingo.train.optim import LRSchedule, build_optimizer
from openflamingo.train.parallelize import apply_activation_checkpointing


def test_training_logs_every_metric_keeps_last_checkpoints_and_exports_a_loadable_model(
    tokenizer_dir, tmp_path
):
    result = train(config_of(tiny_run(tokenizer_dir, tmp_path, train={"grad_accum": 2}, log={"mfu": True})))
    assert result.step == 4 and sorted(result.losses) == [1, 2, 3, 4]
    logged = records(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4]
    last = logged[4]
    assert set(last["dataset_loss"]) == {"pairs", "docs"}
    assert last["loss"] == pytest.approx(0.2 * last["dataset_loss"]["pairs"] + last["dataset_loss"]["docs"])
    assert [logged[s]["lr"] for s in (1, 2, 3)] == pytest.approx(
        [1.5e-3, 3e-3, 3e-3]
    )  # warmup in optimizer steps
    for key in ("grad_norm", "tokens_per_s", "mfu", "data_wait_frac", "step_time_s", "tokens_seen"):
        assert last[key] > 0 or key == "data_wait_frac", key
    gates = last["gates"]
    assert len(gates["attn"]) == len(gates["ff"]) == 2  # 4 layers, a block every 2
    assert all(0 < g < 1 for g in gates["attn"] + gates["ff"])  # tanh of gates started at 1.0
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (tmp_path / "config.toml").is_file()

    exported = load(tmp_path / "final")
    for name, value in trainable_state(result.model).items():
        assert torch.equal(exported.get_parameter(name), value), name


def test_gradient_accumulation_equals_one_bigger_batch(tokenizer_dir, tmp_path):
    big = tiny_run(tokenizer_dir, tmp_path / "big", train={"steps": 2}, checkpoint={"export": False})
    big["datasets"] = {"docs": {"batch_size": 4, "seq_len": 24, "max_images": 3}}
    small = tiny_run(
        tokenizer_dir, tmp_path / "small", train={"steps": 2, "grad_accum": 2}, checkpoint={"export": False}
    )
    small["datasets"] = {"docs": {"batch_size": 2, "seq_len": 24, "max_images": 3}}
    a, b = train(config_of(big)), train(config_of(small))
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    # Two half-batch gradients summed differ from one batch's in float rounding; AdamW divides by sqrt(v), which
    # for a near-zero gradient turns that rounding into up to ~1e-6 of a 3e-3 step (seen once under transformers
    # 4.57: 1.6e-6 in 1 of 4096). A real accumulation bug moves parameters by the order of the step.
    for name, value in trainable_state(a.model).items():
        torch.testing.assert_close(b.model.get_parameter(name), value, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_recomputes_cross_attention_with_identical_gradients(
    tokenizer_dir, tmp_path
):
    config = config_of(tiny_run(tokenizer_dir, tmp_path))
    from openflamingo import build_flamingo

    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the random tiny LM is initialised from the global generator
        models.append(build_flamingo(config.model, seed=0).train())
    apply_activation_checkpointing(models[1])
    calls = []
    for block in models[1].cross_attn_blocks.values():
        block.register_forward_hook(lambda *args: calls.append(1))
    batch = next(build_synthetic_loader(config.datasets, config.data, models[0], 0, 1, seed=0))["docs"]
    for model in models:
        model(**batch).loss.backward()
    assert len(calls) == 2 * len(models[1].cross_attn_blocks)  # forward, then the recomputation in backward
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_weight_decay_applies_to_cross_attention_matrices_only(tokenizer_dir, tmp_path):
    from openflamingo import build_flamingo

    config = config_of(tiny_run(tokenizer_dir, tmp_path))
    model = build_flamingo(config.model, seed=0)
    optimizer = build_optimizer(model, config.train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(
        n.startswith("cross_attn_blocks.") and "gate" not in n and "norm" not in n for n in decayed
    )
    assert "cross_attn_blocks.1.attn.to_q.weight" in decayed


def test_lr_scale_multiplies_the_scheduled_lr_of_the_named_parameters(tokenizer_dir, tmp_path):
    from openflamingo import build_flamingo

    scales = {"added_tokens": 10.0, "perceiver.latents": 0.5}
    config = config_of(tiny_run(tokenizer_dir, tmp_path, train={"lr_scale": scales}))
    model = build_flamingo(config.model, seed=0)
    optimizer = build_optimizer(model, config.train)
    base_lr = LRSchedule(config.train).apply(optimizer)  # the first warmup step's lr
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = 10.0 if name.startswith("added_tokens.") else 0.5 if name == "perceiver.latents" else 1.0
            assert lr_of[id(param)] == pytest.approx(base_lr * scale), name

    config.train.lr_scale = {"perceiver.latent": 2.0}  # a prefix must end at a dot
    with pytest.raises(
        ValueError, match=r"^train\.lr_scale\.perceiver\.latent: names no trainable parameter"
    ):
        build_optimizer(model, config.train)


def _nan_loader(bad_steps):
    def build(datasets, data, model, rank, world_size, seed):
        loader = SyntheticLoader(datasets, seed, model.special_ids, 32, rank, world_size)

        class Poisoned:
            def __iter__(self):
                return self

            def __next__(self):
                step = loader.step
                batch = next(loader)
                if step in bad_steps:
                    for b in batch.values():
                        b["images"] = torch.full_like(b["images"], float("nan"))
                return batch

            state_dict, load_state_dict = loader.state_dict, loader.load_state_dict

        return Poisoned()

    return build


def test_nonfinite_steps_are_skipped_and_counted_and_too_many_in_a_row_stop_the_run(
    tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(LOADERS, "nan_at_2", _nan_loader({1}))
    monkeypatch.setitem(LOADERS, "nan_from_1", _nan_loader({1, 2, 3}))
    run = tiny_run(tokenizer_dir, tmp_path / "a", data={"loader": "nan_at_2"}, checkpoint={"export": False})
    result = train(config_of(run))
    assert result.step == 4 and result.skipped_steps == 1
    logged = records(tmp_path / "a")
    assert logged[2]["skipped_steps"] == 1 and logged[4]["skipped_steps"] == 1
    assert torch.isfinite(torch.tensor(logged[3]["loss"]))

    run = tiny_run(
        tokenizer_dir, tmp_path / "b", data={"loader": "nan_from_1"}, train={"max_nonfinite_in_row": 2}
    )
    with pytest.raises(NonFiniteLossError, match="2 steps in a row.*step 3"):
        train(config_of(run))


def test_interrupted_checkpoint_write_leaves_no_checkpoint_and_resume_uses_the_previous_one(
    tokenizer_dir, tmp_path, monkeypatch
):
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def crash_at_step_4(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the files are all there, only the rename is missing
        if checkpoint_id.endswith("step_00000004"):
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(dcp, "save", crash_at_step_4)
    run = tiny_run(tokenizer_dir, tmp_path, checkpoint={"every": 2, "keep": 5, "export": False})
    with pytest.raises(KeyboardInterrupt):
        train(config_of(run))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".tmp-step_00000004", "step_00000002"]

    monkeypatch.setattr(dcp, "save", real_save)
    result = train(config_of(run))
    assert result.resumed_from.name == "step_00000002" and sorted(result.losses) == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_checkpoint_that_does_not_load_completely_is_an_error(tokenizer_dir, tmp_path):
    run = tiny_run(tokenizer_dir, tmp_path, train={"steps": 2}, checkpoint={"export": False})
    train(config_of(run))
    bigger = tiny_run(tokenizer_dir, tmp_path, train={"steps": 3})
    bigger["model"]["perceiver"]["num_latents"] = 5
    with pytest.raises(ValueError, match="step_00000002.*latents"):
        train(config_of(bigger))
    more_blocks = tiny_run(tokenizer_dir, tmp_path, train={"steps": 3})
    more_blocks["model"]["cross_attention"]["every_n_layers"] = 1
    with pytest.raises(ValueError, match="missing key.*cross_attn_blocks.0"):
        train(config_of(more_blocks))
    with pytest.raises(ValueError, match="checkpoint.resume: no checkpoint 'step_00000009'"):
        train(config_of(tiny_run(tokenizer_dir, tmp_path, checkpoint={"resume": "step_00000009"})))
    named = tiny_run(tokenizer_dir, tmp_path, train={"steps": 3}, checkpoint={"resume": "step_00000002"})
    assert train(config_of(named)).resumed_from.name == "step_00000002"
    shard = next((tmp_path / "checkpoints" / "step_00000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated on disk
    with pytest.raises(ValueError, match="step_00000003: cannot load"):
        train(config_of(tiny_run(tokenizer_dir, tmp_path, train={"steps": 4})))


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses_and_weights_bitwise(tokenizer_dir, tmp_path):
    steps = 8
    run = tiny_run(
        tokenizer_dir, tmp_path / "killed", train={"steps": steps}, checkpoint={"every": 2, "keep": 2}
    )
    run["model"].update(FINE_TUNED_LM)  # the adapters and the trained layer resume exactly too
    config_path = tmp_path / "killed.toml"
    config_path.write_text(to_toml(run))

    kill_after = 3 + int(torch.randint(0, 3, (1,), generator=torch.Generator().manual_seed(os.getpid())))
    kill_after_logged_steps(config_path, tmp_path / "killed" / "metrics.jsonl", kill_after, timeout=120)
    assert not (tmp_path / "killed" / "final").exists()

    resumed = _launch(config_path)
    output = resumed.communicate(timeout=240)[0].decode()
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    reference_run = tiny_run(tokenizer_dir, tmp_path / "reference", train={"steps": steps})
    reference_run["model"].update(FINE_TUNED_LM)
    reference = train(config_of(reference_run))
    logged = records(tmp_path / "killed")
    assert sorted(logged) == list(range(1, steps + 1))
    assert {
        s: r["loss"] for s, r in logged.items()
    } == reference.losses  # bitwise: floats round-trip through JSON
    from safetensors.torch import load_file

    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = (load_file(tmp_path / d / "final" / file) for d in ("killed", "reference"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_compiled_and_checkpointed_training_matches_eager(tokenizer_dir, tmp_path):
    eager = tiny_run(tokenizer_dir, tmp_path / "eager", train={"steps": 2}, checkpoint={"export": False})
    compiled = tiny_run(
        tokenizer_dir,
        tmp_path / "compiled",
        train={"steps": 2},
        checkpoint={"export": False},
        # aot_eager traces forward and backward like inductor does, without compiling kernels (fast on CPU).
        parallel={"compile": True, "compile_backend": "aot_eager", "activation_checkpointing": True},
    )
    for run in (eager, compiled):  # one dataset: fewer shapes to trace
        run["datasets"] = {"docs": {"batch_size": 2, "seq_len": 24, "max_images": 3}}
    assert train(config_of(compiled)).losses == pytest.approx(train(config_of(eager)).losses, rel=1e-6)


def test_bf16_autocast_with_bf16_frozen_backbones(tokenizer_dir, tmp_path):
    run = tiny_run(
        tokenizer_dir,
        tmp_path,
        train={"steps": 2},
        precision={"autocast": "bf16", "frozen_dtype": "bf16"},
        checkpoint={"export": False},
    )
    result = train(config_of(run))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    params = dict(result.model.named_parameters())
    assert params["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert params["language_model.model.norm.weight"].dtype == torch.float32  # vectors stay fp32
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)  # fp32 master weights
    with pytest.raises(ValueError, match="precision.frozen_dtype: 'bf16' needs precision.autocast"):
        train(
            config_of(
                tiny_run(tokenizer_dir, tmp_path, precision={"autocast": "fp32", "frozen_dtype": "bf16"})
            )
        )


def test_deterministic_mode_is_on_for_cpu_runs_and_restored_afterwards(tokenizer_dir, tmp_path, monkeypatch):
    import openflamingo.train.loop as loop

    seen = []
    forward_backward = loop.forward_backward

    def recording(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", recording)
    run = tiny_run(tokenizer_dir, tmp_path / "default", train={"steps": 1}, checkpoint={"export": False})
    train(config_of(run))
    run = tiny_run(tokenizer_dir, tmp_path / "off", train={"steps": 1, "deterministic": False})
    train(config_of(run))
    assert seen == [True, True, False, False] and not torch.are_deterministic_algorithms_enabled()


def test_an_op_without_a_deterministic_implementation_is_a_one_line_error(
    tokenizer_dir, tmp_path, monkeypatch
):
    import openflamingo.train.loop as loop

    def nondeterministic(*args, **kwargs):
        raise RuntimeError(
            "scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
            "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation..."
        )

    monkeypatch.setattr(loop, "forward_backward", nondeterministic)
    with pytest.raises(
        ValueError, match=r"^train.deterministic: scatter_add_cuda_kernel has no deterministic .*false"
    ):
        train(config_of(tiny_run(tokenizer_dir, tmp_path)))
