"""Context parallelism's arithmetic on one process: the zigzag split, RoPE positions and attention.

Each simulated rank's queries attend to the whole sequence's keys as the gather would
give them; together the ranks must give the 1-rank causal attention's rows, and the
gradients of q, k, v summed over ranks (what the reduce-scatter computes) must equal
its gradients. The collectives themselves are covered by the multi-rank runs in
test_parallel.py.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megascale.parallel.context_parallel import ContextParallel

ROOT = Path(__file__).resolve().parent.parent


def ranks(cp):
    return [ContextParallel(group=None, size=cp, rank=r) for r in range(cp)]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_shards_cover_the_sequence_once_with_balanced_causal_work(cp):
    T = 8 * cp
    seq = torch.arange(T).view(1, T)
    shards = [r.shard(seq) for r in ranks(cp)]
    assert sorted(torch.cat(shards, dim=1).flatten().tolist()) == list(range(T))
    for r, shard in zip(ranks(cp), shards):
        assert torch.equal(r.positions(T // cp, torch.device("cpu")), shard.flatten())
    # Causal work: each query at position p sees p + 1 keys. Zigzag gives every rank the same total.
    work = [int((shard + 1).sum()) for shard in shards]
    assert len(set(work)) == 1


@pytest.mark.parametrize("cp", [2, 3])
def test_sequence_and_rank_order_are_inverse(cp):
    T = 4 * cp
    x = torch.randn(2, 3, T, 5)
    parts = [r.shard(x, dim=2) for r in ranks(cp)]
    whole = ranks(cp)[0].to_sequence_order(parts)
    assert torch.equal(whole, x)
    assert torch.equal(ranks(cp)[0].to_rank_order(whole), torch.cat(parts, dim=2))


@pytest.mark.parametrize("cp, heads, kv_heads", [(2, 4, 2), (3, 4, 4), (4, 6, 2)])
def test_rank_attention_equals_causal_attention_and_its_gradients(cp, heads, kv_heads):
    torch.manual_seed(0)
    B, T, hd = 2, 8 * cp, 16
    q = torch.randn(B, heads, T, hd, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, T, hd, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, T, hd, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, heads, T, hd, dtype=torch.float64)  # a loss that weighs every output differently

    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    (reference * weight).sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    total = 0
    for r in ranks(cp):
        out = r.attend(r.shard(q, dim=2), k, v)
        torch.testing.assert_close(out, r.shard(reference, dim=2).detach(), rtol=1e-10, atol=1e-10)
        total = total + (out * r.shard(weight, dim=2)).sum()
    total.backward()
    for name, t, want in zip("qkv", (q, k, v), expected):
        torch.testing.assert_close(t.grad, want, rtol=1e-10, atol=1e-10, msg=name)


def test_world_size_must_hold_whole_context_groups():
    from megascale.errors import MegascaleError
    from megascale.parallel.topology import ParallelDims

    with pytest.raises(MegascaleError, match=r"world size 6 is not divisible by parallel.tp × parallel.pp × parallel.cp = 2×1×2; "
                                             r"launch a multiple of 4"):
        ParallelDims.from_world(2, 1, 6, cp=2)
    dims = ParallelDims.from_world(2, 1, 8, cp=2)
    assert (dims.dp, dims.dp_cp, dims.describe()) == (2, 4, "tp=2 pp=1 cp=2 dp=2")


def test_finetuning_refuses_context_parallelism_in_one_line():
    from megascale.config import load_config
    from megascale.errors import MegascaleError
    from megascale.finetune.stage import finetune_config

    cfg = load_config(ROOT / "configs" / "trace_tiny.yaml", ["parallel.cp=2"])
    with pytest.raises(MegascaleError, match="context parallelism is for pretraining") as err:
        finetune_config(cfg)
    assert "\n" not in str(err.value)
