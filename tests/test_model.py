"""The plain model: shapes, sharing plans, tied storage, FLOP accounting, GQA, RoPE."""

import pytest
import torch

from megascale.config import ModelConfig
from megascale.errors import MegascaleError
from megascale.model import SharingPlan, Transformer
from megascale.model.attention import attention, resolve_backend


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "spec, groups",
    [
        ("none", [0, 1, 2, 3, 4, 5]),
        ("all", [0, 0, 0, 0, 0, 0]),
        ("cycle:2", [0, 1, 0, 1, 0, 1]),
        ("sequence:3", [0, 0, 1, 1, 2, 2]),
        ("5,5,7,5,7,9", [0, 0, 1, 0, 1, 2]),
    ],
)
def test_sharing_plans(spec, groups):
    plan = SharingPlan.parse(spec, 6)
    assert plan.to_list() == groups
    assert plan.n_groups == max(groups) + 1
    assert sum(len(plan.units_of(g)) for g in range(plan.n_groups)) == 6


def test_tied_layers_use_one_storage_and_sum_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny(sharing="cycle:2"))
    assert len(model.blocks) == 2
    tokens = torch.randint(0, 97, (2, 16))
    model(tokens, tokens).backward()
    # Autograd sums the three units' contributions into the one shared .grad.
    grads = [p.grad for p in model.blocks["0"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_tied_model_equals_untied_model_with_copied_weights():
    """A tied model is the untied model whose units hold identical weights."""
    torch.manual_seed(0)
    tied = Transformer(tiny(sharing="cycle:2"))
    untied = Transformer(tiny(sharing="none"))
    for layer, group in enumerate(tied.plan.group_of):
        untied.blocks[str(layer)].load_state_dict(tied.blocks[str(group)].state_dict())
    untied.embed.load_state_dict(tied.embed.state_dict())
    untied.norm.load_state_dict(tied.norm.state_dict())
    untied.lm_head.load_state_dict(tied.lm_head.state_dict())
    tokens = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(tied(tokens), untied(tokens), rtol=0, atol=0)


def test_param_counts_unique_vs_applied():
    untied = Transformer(tiny(sharing="none"))
    tied = Transformer(tiny(sharing="all"))
    block = sum(p.numel() for p in tied.blocks["0"].parameters())
    other = tied.embed.weight.numel() + tied.lm_head.weight.numel() + tied.norm.weight.numel()
    assert tied.param_counts().unique == other + block
    assert tied.param_counts().applied == other + 6 * block == untied.param_counts().unique
    # Compute follows applied parameters: same FLOPs tied or not.
    assert tied.flops_per_token(16) == untied.flops_per_token(16)


def test_flops_formula():
    cfg = tiny(sharing="none")
    m = Transformer(cfg)
    n_matmul = sum(p.numel() for p in m.parameters()) - m.embed.weight.numel()
    assert m.flops_per_token(16) == 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 16


def test_tied_embeddings_share_storage():
    m = Transformer(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.embed.weight
    assert m.param_counts().unique == sum(p.numel() for p in m.parameters())


def test_gqa_attention_matches_repeated_kv():
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True
    )
    torch.testing.assert_close(attention(q, k, v, causal=True), ref)


def test_causality():
    torch.manual_seed(0)
    m = Transformer(tiny())
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97
    torch.testing.assert_close(m(a)[:, :10], m(b)[:, :10])


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu"))[0] == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == ("torch", "requested")
    with pytest.raises(MegascaleError):
        resolve_backend("magic", torch.device("cpu"))
