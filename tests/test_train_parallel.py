"""Data parallelism by equivalence: 2 ranks with ZeRO 0-3 reproduce the 1-rank run.

Same seed, same global batch (8 sequences: 1 rank × micro 4 × accumulation 2
vs 2 ranks × micro 4), tied blocks (cycle:2), fp32, 5 steps.
"""

import pytest
import torch

from conftest import losses, run_pretrain
from megascale.train.checkpoint import full_weights, read_meta


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single")
    run_pretrain(out, data_dir, "train.zero_stage=1")
    return out


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory, data_dir):
    runs = {}
    for stage in (0, 1, 2, 3):
        runs[stage] = tmp_path_factory.mktemp(f"dp2_zero{stage}")
        run_pretrain(runs[stage], data_dir, f"train.zero_stage={stage}", nproc=2)
    return runs


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_losses_match_single_rank(single_rank, dp_runs, stage):
    expected, got = losses(single_rank), losses(dp_runs[stage])
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert got[5] < got[1]  # it trains
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (stage, step)


def consolidated(out_dir):
    """Full fp32 weights from a (possibly ZeRO-3 sharded) checkpoint, via DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out_dir / "checkpoints"))


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_to_fp32_reads_our_checkpoints(single_rank, dp_runs, stage):
    # The 1-rank fp32 run trains at ZeRO-0 (stage 1 partitions nothing at dp=1): no ZeRO files to merge there.
    path = single_rank / "checkpoints" / (single_rank / "checkpoints" / "latest").read_text()
    assert read_meta(path)["config"]["train"]["zero_stage"] == 1 and not list(path.glob("*optim_states.pt"))
    reference = full_weights(path, read_meta(path))
    weights = consolidated(dp_runs[stage])
    assert set(weights) == set(reference)
    assert any(k.startswith("blocks.1.") for k in weights) and not any(k.startswith("blocks.2.") for k in weights)
    for name, tensor in reference.items():
        _assert_adam_close(weights[name], tensor, name)


def _assert_adam_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """fp32 weights after a few Adam steps, by two runs whose gradient sums add in different orders: all but a few
    elements agree to rtol 1e-5 / atol 1e-6, and those few to 2e-5. Adam divides each update by the gradient's own
    scale, so where a gradient is near zero its rounding moves the update by up to the learning rate: on a Xeon with
    AVX512-FP16, one element in 12,288 of two ZeRO-3 tensors moved 1.5e-6 (2026-11-27), where the machines the suite
    passed on before left none. A shard merged wrong is off by the weights' own size (~0.05) in most elements."""
    off = (got - want).abs() > 1e-6 + 1e-5 * want.abs()
    assert int(off.sum()) <= max(1, want.numel() // 1000), (name, int(off.sum()), want.numel())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)
