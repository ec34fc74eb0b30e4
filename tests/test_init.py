"""Initialisation by parameter name: a model built on the meta device and materialized later
(whole, or one tensor-parallel chunk at a time) has exactly the eager model's weights."""

import pytest
import torch
import torch.nn as nn

from megascale.config import ModelConfig
from megascale.model import Transformer
from megascale.model.init import INIT_ATTR, SHARD_ATTR, carry_init, materialize, param_seed

CPU = torch.device("cpu")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16, sharing="cycle:2")
    return ModelConfig(**{**base, **kw})


def meta_model(cfg: ModelConfig, seed: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg, seed=seed)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_meta_then_materialize_equals_eager(tie_embeddings):
    cfg = tiny(tie_embeddings=tie_embeddings)
    eager, late = Transformer(cfg, seed=7), meta_model(cfg, seed=7)
    assert all(p.is_meta for p in late.parameters())
    assert materialize(late, 7, CPU) == len(list(eager.parameters()))
    for (name, a), (_, b) in zip(eager.state_dict().items(), late.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    # Tied tensors stay one parameter; the shared block stays one module.
    assert (late.lm_head.weight is late.embed.weight) == tie_embeddings
    assert late.blocks["0"].attn.q_proj.weight.requires_grad


def test_values_follow_the_seed_and_the_name_not_the_creation_order():
    a, b = Transformer(tiny(), seed=1), Transformer(tiny(), seed=2)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    # Two different parameters of the same shape are different draws.
    assert not torch.equal(a.blocks["0"].attn.q_proj.weight, a.blocks["1"].attn.q_proj.weight)
    # More groups (sharing none) add parameters; the ones both models have keep their values.
    untied = Transformer(tiny(sharing="none"), seed=1)
    torch.testing.assert_close(untied.blocks["1"].mlp.up_proj.weight, a.blocks["1"].mlp.up_proj.weight, rtol=0, atol=0)
    assert param_seed(1, "embed.weight") != param_seed(1, "norm.weight")


def test_init_std_by_role():
    model = Transformer(tiny(n_layers=8, sharing="none", d_model=256, n_heads=4, n_kv_heads=4), seed=0)
    std = model.cfg.init_std
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.05)
    down = model.blocks["3"].mlp.down_proj.weight
    assert getattr(down, INIT_ATTR).std == pytest.approx(std / 4)  # scaled by sqrt(2 × 8 applied layers)
    assert down.std().item() == pytest.approx(std / 4, rel=0.05)


@pytest.mark.parametrize("dim", [0, 1])
def test_a_shard_materializes_as_its_chunk_of_the_full_tensor(dim):
    eager, late = Transformer(tiny(), seed=3), meta_model(tiny(), seed=3)
    full = eager.blocks["1"].attn.o_proj.weight
    dense = late.blocks["1"].attn.o_proj.weight
    holder = nn.Module()
    holder.weight = carry_init(dense, nn.Parameter(dense.chunk(4, dim=dim)[2].clone()), dim, 2, 4)
    materialize(holder, 3, CPU)
    torch.testing.assert_close(holder.weight, full.chunk(4, dim=dim)[2], rtol=0, atol=0)
    assert holder.weight.is_contiguous() and holder.weight.untyped_storage().nbytes() == holder.weight.nbytes
    assert getattr(holder.weight, SHARD_ATTR).count == 4


def test_materialize_from_a_source_uses_its_values():
    eager, late = Transformer(tiny(), seed=0), meta_model(tiny(), seed=5)
    weights = eager.state_dict()
    materialize(late, 5, CPU, weights=weights)
    for name, value in weights.items():
        torch.testing.assert_close(late.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_meta_parameter_without_a_spec_is_refused():
    with torch.device("meta"):
        layer = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="no init spec"):
        materialize(layer, 0, CPU)


def test_full_weights_that_do_not_fit_are_one_line():
    from megascale.errors import MegascaleError  # noqa: PLC0415
    from megascale.model.init import check_full_weights  # noqa: PLC0415

    weights = Transformer(tiny(), seed=0).state_dict()
    check_full_weights(meta_model(tiny(), seed=0), weights)  # fits
    bad = {k: v for k, v in weights.items() if k != "norm.weight"} | {"extra.weight": torch.zeros(1)}
    bad["embed.weight"] = torch.zeros(97, 32)
    with pytest.raises(MegascaleError, match=r"missing: norm\.weight; unexpected: extra\.weight; wrong shape: embed\.weight"):
        check_full_weights(meta_model(tiny(), seed=0), bad)
    with pytest.raises(ValueError, match="meta device"):
        check_full_weights(Transformer(tiny(), seed=0), weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second kind of device")
def test_drawn_on_the_cpu_a_cuda_model_starts_from_the_cpu_values():
    """train.init_device=cpu: the CUDA generator's values differ; drawn on the host, they are the CPU model's."""
    cuda = torch.device("cuda")
    on_host, on_device = meta_model(tiny(), seed=4), meta_model(tiny(), seed=4)
    materialize(on_host, 4, cuda, draw_on=CPU)
    materialize(on_device, 4, cuda)
    eager = Transformer(tiny(), seed=4)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(on_host.state_dict()[name].cpu(), value, rtol=0, atol=0, msg=name)
    assert on_host.embed.weight.device.type == "cuda"
    assert not torch.equal(on_device.embed.weight.cpu(), eager.embed.weight)


def test_a_shard_drawn_elsewhere_is_cut_before_it_moves():
    """draw_on: the full tensor is drawn there and only this rank's chunk is copied to the device."""
    eager, late = Transformer(tiny(), seed=3), meta_model(tiny(), seed=3)
    dense = late.blocks["0"].mlp.up_proj.weight
    holder = nn.Module()
    holder.weight = carry_init(dense, nn.Parameter(dense.chunk(2)[1].clone()), 0, 1, 2)
    materialize(holder, 3, CPU, draw_on=CPU)
    torch.testing.assert_close(holder.weight, eager.blocks["0"].mlp.up_proj.weight.chunk(2)[1], rtol=0, atol=0)
