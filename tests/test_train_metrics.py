"""FLOP counting for MFU (grouped-query attention included, failures never stop a run) and the fused optimizer's
on-device skip of non-finite steps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from helpers.train import config_of, records, tiny_run

import openflamingo.train.loop as loop
from openflamingo.train import train
from openflamingo.train.config import TrainConfig
from openflamingo.train.metrics import count_flops
from openflamingo.train.optim import build_optimizer


def attention_flops(q, k, v) -> int:
    with count_flops() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    return counter.get_total_flops()


def strict_sdpa_flop_count(query_shape, key_shape, value_shape):
    """torch <= 2.11's check: the same head count everywhere (it raised on grouped-query attention)."""
    if query_shape[1] != key_shape[1]:
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
    return original_sdpa_flop_count(query_shape, key_shape, value_shape)


original_sdpa_flop_count = flop_counter.sdpa_flop_count


@pytest.mark.parametrize("torch_check", ["current", "torch-2.11"])
def test_grouped_query_attention_counts_as_attention_over_repeated_heads(monkeypatch, torch_check):
    if torch_check == "torch-2.11":
        monkeypatch.setattr(flop_counter, "sdpa_flop_count", strict_sdpa_flop_count)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
    repeated = [t.detach().repeat_interleave(2, dim=1).requires_grad_() for t in (k, v)]
    # forward: QK^T and AV, 2 FLOPs per multiply-add (2 * 2 * B * H * L * L * D); backward: the same five
    # products over again (QK^T recomputed, then the gradients of AV, of the scores, of Q and of K)
    forward = 2 * 2 * (2 * 4 * 16 * 16 * 8)
    expected = forward + 5 * forward // 2
    assert attention_flops(q, k, v) == attention_flops(q, *repeated) == expected


def test_a_failing_flop_count_leaves_mfu_out_and_the_run_going(tokenizer_dir, tmp_path, monkeypatch):
    class Failing(flop_counter.FlopCounterMode):
        def __enter__(self):
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")

    monkeypatch.setattr(loop, "count_flops", lambda: Failing(display=False))
    run = tiny_run(tokenizer_dir, tmp_path, log={"progress": False, "peak_tflops": 1.0, "mfu": True})
    with pytest.warns(UserWarning, match="counting FLOPs failed .*MFU not reported"):
        result = train(config_of(run))
    assert result.step == 4 and "mfu" not in records(tmp_path)[4]


def test_mfu_is_logged_from_the_counted_flops(tokenizer_dir, tmp_path):
    run = tiny_run(
        tokenizer_dir, tmp_path, log={"progress": False, "peak_tflops": 1e-3, "mfu": True, "every": 2}
    )
    train(config_of(run))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]  # one record per log interval, rates over the interval
    assert all(r["mfu"] > 0 and r["step_time_s"] > 0 for r in logged)


def test_a_nonfinite_step_changes_no_weight_and_no_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for param, param_state in optimizer.state.items():
        assert all(torch.equal(state[id(param)][k], v) for k, v in param_state.items())
