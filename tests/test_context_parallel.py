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


def assert_ranks_give_the_whole(cp, heads, kv_heads, T, whole_fn, rank_fn) -> None:
    """Every simulated rank's ``rank_fn(rank, its queries, all keys, all values)`` equals ``whole_fn(q, k, v)``'s rows
    at its positions, and the q/k/v gradients of a loss over all ranks' outputs equal the whole one's."""
    torch.manual_seed(0)
    B, hd = 3, 16
    q = torch.randn(B, heads, T, hd, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_heads, T, hd, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_heads, T, hd, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, heads, T, hd, dtype=torch.float64)  # a loss that weighs every output differently

    reference = whole_fn(q, k, v)
    (reference * weight).sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    total = 0
    for r in ranks(cp):
        out = rank_fn(r, r.shard(q, dim=2), k, v)
        torch.testing.assert_close(out, r.shard(reference, dim=2).detach(), rtol=1e-10, atol=1e-10)
        total = total + (out * r.shard(weight, dim=2)).sum()
    total.backward()
    for name, t, want in zip("qkv", (q, k, v), expected):
        torch.testing.assert_close(t.grad, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("cp, heads, kv_heads", [(2, 4, 2), (3, 4, 4), (4, 6, 2)])
def test_rank_attention_equals_causal_attention_and_its_gradients(cp, heads, kv_heads):
    assert_ranks_give_the_whole(
        cp, heads, kv_heads, 8 * cp,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads),
        lambda rank, q, k, v: rank.attend(q, k, v))


def test_world_size_must_hold_whole_context_groups():
    from megascale.errors import MegascaleError
    from megascale.parallel.topology import ParallelDims

    with pytest.raises(MegascaleError, match=r"world size 6 is not divisible by parallel.tp × parallel.pp × parallel.cp = 2×1×2; "
                                             r"launch a multiple of 4"):
        ParallelDims.from_world(2, 1, 6, cp=2)
    dims = ParallelDims.from_world(2, 1, 8, cp=2)
    assert (dims.dp, dims.dp_cp, dims.describe()) == (2, 4, "tp=2 pp=1 cp=2 dp=2")


def test_a_rank_has_one_context_object_that_the_model_and_loop_share():
    from megascale.parallel.topology import ParallelDims, ParallelGroups

    def groups(cp):
        return ParallelGroups(ParallelDims(1, 1, 1, cp), None, None, None, None, None, 0, 1, 0, cp_group="cp", cp_rank=1)

    assert groups(1).context is None
    g = groups(2)
    assert g.context is g.context  # made once, not once per micro-batch
    assert (g.context.group, g.context.size, g.context.rank, g.context.chunks) == ("cp", 2, 1, (1, 2))


def packed_doc_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Rows of examples of random lengths, padding (-1) after the last whole one, as finetune.data.pack lays them."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        start, doc = 0, 0
        while True:
            length = int(torch.randint(1, T // 2, (1,), generator=gen))
            if start + length > T - 1:
                break
            rows[b, start:start + length], start, doc = doc, start + length, doc + 1
    return rows


@pytest.mark.parametrize("cp, heads, kv_heads", [(2, 4, 2), (3, 4, 4)])
def test_rank_attention_over_packed_rows_equals_the_document_masked_attention(cp, heads, kv_heads):
    """Packed fine-tuning rows: each rank's rows of the block-diagonal causal mask (by global position, against
    the gathered doc ids) give the 1-rank attention's rows at its positions, and its q/k/v gradients summed."""
    from megascale.model.attention import attention
    from megascale.model.llama import document_mask

    T = 8 * cp
    doc = packed_doc_ids(3, T)
    assert (doc == -1).any() and int(doc.max()) >= 2  # padding and several examples in a row
    whole = document_mask(doc)
    for r in ranks(cp):
        assert torch.equal(r.mask_rows(r.shard(doc), doc), r.shard(whole, dim=2))
    assert_ranks_give_the_whole(cp, heads, kv_heads, T, lambda q, k, v: attention(q, k, v, mask=whole),
                                lambda rank, q, k, v: attention(q, k, v, mask=rank.mask_rows(rank.shard(doc), doc)))


def test_gathered_ids_come_back_in_sequence_order():
    cp = 3
    doc = packed_doc_ids(2, 12 * cp, seed=1)
    parts = [r.shard(doc) for r in ranks(cp)]
    assert torch.equal(ranks(cp)[1].to_sequence_order(parts, dim=1), doc)
