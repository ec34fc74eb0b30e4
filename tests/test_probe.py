"""Per-unit gradient capture (megascale.train.probe): exact per-unit gradients, the coherence signal, layouts.

Exactness: a tied model's captured unit gradients equal the block gradients of the
untied model holding the same weights. Signal: a shared matrix whose two uses pull
in set directions gives the ρ and alignments computed by hand. Layouts: a probe step
under tp=2 with sequence parallelism (ZeRO-3) and under pp=2 with activation
checkpointing (a tie group split over the stages) gives the 1-rank result.
"""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

from conftest import ROOT, clean_env, spawn_ranks
from megascale.config import ModelConfig
from megascale.model import SharingPlan, Transformer
from megascale.train import probe as probe_module
from megascale.train.probe import CoherenceProbe, GroupCoherence, ProbeResult


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def untied_copy(tied: Transformer) -> Transformer:
    """The sharing=none model whose every layer holds a copy of the block its tied layer applies."""
    untied = Transformer(tiny(sharing="none", n_layers=tied.cfg.n_layers))
    for layer, group in enumerate(tied.plan.group_of):
        untied.blocks[str(layer)].load_state_dict(tied.blocks[str(group)].state_dict())
    for name in ("embed", "norm", "lm_head"):
        getattr(untied, name).load_state_dict(getattr(tied, name).state_dict())
    return untied


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (2, 16), generator=gen) for _ in range(n)]


def train_steps(model: Transformer, tokens: list[torch.Tensor]) -> None:
    """Forward and backward over several micro-batches, gradients accumulating."""
    for t in tokens:
        model(t, t).backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("sharing", ["all", "cycle:2"])
def test_unit_gradients_equal_the_untied_models_block_gradients(sharing, checkpointing):
    torch.manual_seed(0)
    tied = Transformer(tiny(sharing=sharing))
    untied, reference = untied_copy(tied), copy.deepcopy(tied)
    for m in (tied, untied, reference):
        m.activation_checkpointing = checkpointing
    probe = CoherenceProbe(tied, tied.plan, None)
    probe.arm()
    data = batches(2)
    for model in (tied, untied, reference):
        train_steps(model, data)
    for layer in range(tied.cfg.n_layers):
        captured = probe.unit_gradients(layer)
        assert len(captured) == 7  # q, k, v, o, gate, up, down: norms are not captured
        for name, grad in captured.items():
            torch.testing.assert_close(grad, untied.blocks[str(layer)].get_parameter(name).grad, rtol=1e-6, atol=1e-9)
    # Probing leaves the gradients the optimizer sees exactly as they were.
    for (name, p), q in zip(tied.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # ρ of every group, from the untied model's block gradients (matrices only).
    result = probe.finish()
    for g in range(tied.plan.n_groups):
        units = tied.plan.units_of(g)
        grads = [{n: untied.blocks[str(u)].get_parameter(n).grad for n in captured} for u in units]
        total_sq = sum(sum(g_u[n].square().sum() for n in g_u) for g_u in grads)
        sum_sq = sum(sum(g_u[n] for g_u in grads).square().sum() for n in captured)
        assert result.groups[g].rho == pytest.approx(float(sum_sq / (len(units) * total_sq)), rel=1e-5)
        assert result.groups[g].sum_sq == pytest.approx(float(sum_sq), rel=1e-5)
    assert not probe.armed


class SharedMatrix(nn.Module):
    """A two-unit tie group in miniature: one Linear applied to x_k, loss Σ_k ⟨c_k, W x_k⟩, so g_k = c_kᵀ x_k.

    Sets the unit tracker as the Transformer does, optionally inside activation checkpointing.
    """

    def __init__(self, checkpoint: str = ""):
        super().__init__()
        self.plan = SharingPlan.parse("all", 2)
        self.blocks = nn.ModuleDict({"0": nn.Linear(4, 3, bias=False)})
        self.unit_tracker = None
        self.checkpoint = checkpoint

    def _apply_unit(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.unit_tracker is not None:
            self.unit_tracker.current = layer
        return self.blocks["0"](x)

    def forward(self, xs: list[torch.Tensor], cs: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.zeros(())
        for layer, (x, c) in enumerate(zip(xs, cs)):
            if self.checkpoint:
                y = torch.utils.checkpoint.checkpoint(self._apply_unit, layer, x, use_reentrant=self.checkpoint == "reentrant")
            else:
                y = self._apply_unit(layer, x)
            loss = loss + (y * c).sum()
        return loss


def probe_shared(scale: float, checkpoint: str = "") -> ProbeResult:
    """Unit 1's gradient is ``scale`` × unit 0's: same input, output weights scaled."""
    torch.manual_seed(0)
    model = SharedMatrix(checkpoint)
    x = torch.randn(5, 4, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    c = torch.randn(5, 3)
    probe = CoherenceProbe(model, model.plan, None)
    probe.arm()
    model([x, x], [c, scale * c]).backward()
    return probe.finish()


@pytest.mark.parametrize("checkpoint", ["", "non-reentrant", "reentrant"])
def test_conflicting_units_give_low_coherence_and_a_negative_alignment(checkpoint):
    # g_1 = -g_0/2: Σg = g_0/2, ρ = (1/4) / (2 · (1 + 1/4)) = 0.1; unit 1 points against the sum.
    group = probe_shared(-0.5, checkpoint).groups[0]
    assert group.rho == pytest.approx(0.1, rel=1e-5)
    assert group.alignment[0] == pytest.approx(1.0, abs=1e-5)
    assert group.alignment[1] == pytest.approx(-1.0, abs=1e-5)
    assert group.sq_norms[1] == pytest.approx(0.25 * group.sq_norms[0], rel=1e-5)


@pytest.mark.parametrize("checkpoint", ["", "non-reentrant", "reentrant"])
def test_agreeing_units_give_coherence_one(checkpoint):
    result = probe_shared(1.0, checkpoint)
    assert result.groups[0].rho == pytest.approx(1.0, rel=1e-6)
    assert result.to_record() == pytest.approx({"coherence/g0": 1.0, "alignment/g0/u0": 1.0, "alignment/g0/u1": 1.0}, rel=1e-6)


def test_orthogonal_units_give_one_over_k():
    torch.manual_seed(0)
    model = SharedMatrix()
    x0, x1 = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])
    probe = CoherenceProbe(model, model.plan, None)
    probe.arm()
    model([x0, x1], [torch.ones(1, 3), torch.ones(1, 3)]).backward()
    assert probe.finish().groups[0].rho == pytest.approx(0.5, rel=1e-6)


def test_overflowed_gradients_report_nan_not_coherence():
    """fp16 overflow: coherence() alone would clamp a nan ratio to 1, i.e. "the units agree"."""
    inf = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    group = GroupCoherence.from_sums([0, 1], inf, inf, torch.tensor(float("inf"), dtype=torch.float64))
    assert math.isnan(group.rho) and all(math.isnan(a) for a in group.alignment.values())


def test_probing_off_does_no_work_and_keeps_nothing(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny(sharing="cycle:2"))
    probe = CoherenceProbe(model, model.plan, None)

    def fail(*args):
        raise AssertionError("a capture ran on a non-probe step")

    monkeypatch.setattr(probe, "_accumulate", fail)
    monkeypatch.setattr(probe_module, "_PendingCapture", fail)  # no hook is put on any tensor
    tokens = batches(1)[0]
    model(tokens, tokens).backward()
    assert not probe.armed and probe._grads is None
    with pytest.raises(RuntimeError, match="not armed"):
        probe.unit_gradients(0)
    # Armed, but without grad (evaluation): still nothing.
    probe.arm()
    with torch.no_grad():
        model(tokens, tokens)
    assert probe._grads == {}
    probe.disarm()
    assert probe._grads is None
    with pytest.raises(RuntimeError, match="without arm"):
        probe.finish()


def test_remove_takes_out_hooks_and_tracker():
    model = Transformer(tiny(sharing="all"))
    probe = CoherenceProbe(model, model.plan, None)
    linears = [m for m in model.blocks["0"].modules() if isinstance(m, nn.Linear)]
    assert model.unit_tracker is probe.tracker and all(len(m._forward_hooks) == 1 for m in linears)
    probe.remove()
    assert model.unit_tracker is None and all(len(m._forward_hooks) == 0 for m in linears)


def test_untied_groups_are_not_probed():
    model = Transformer(tiny(sharing="0,0,1,2"))
    probe = CoherenceProbe(model, model.plan, None)
    probe.arm()
    tokens = batches(1)[0]
    model(tokens, tokens).backward()
    result = probe.finish()
    assert list(result.groups) == [0] and result.groups[0].units == (0, 1)
    assert set(result.to_record()) == {"coherence/g0", "alignment/g0/u0", "alignment/g0/u1"}


def test_a_wrong_plan_is_refused():
    model = Transformer(tiny(sharing="all"))
    with pytest.raises(ValueError, match="not the model's"):
        CoherenceProbe(model, SharingPlan.parse("cycle:2", 4), None)


# ------------------------------------------------------------ layouts (real processes, gloo)


def probe_step(nproc: int, *overrides: str) -> dict:
    """tests/probe_ranks.py on ``nproc`` ranks; rank 0's JSON."""
    script = str(ROOT / "tests" / "probe_ranks.py")
    cmd = [sys.executable, script, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300) if nproc == 1 \
        else spawn_ranks(cmd, nproc, clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_rank():
    return probe_step(1)


def assert_same_probe(got: dict, expected: dict) -> None:
    assert got["record"] == pytest.approx(expected["record"], rel=1e-5)
    assert got["sums"].keys() == expected["sums"].keys()
    for g, sums in expected["sums"].items():
        assert got["sums"][g]["sum_sq"] == pytest.approx(sums["sum_sq"], rel=1e-5), g
        for key in ("sq_norms", "dots"):
            assert got["sums"][g][key] == pytest.approx(sums[key], rel=1e-5), (g, key)


def test_tensor_and_sequence_parallel_probe_matches_single_rank(single_rank):
    """tp=2, sequence parallelism, ZeRO-3: sharded matrices, T/tp slices gathered in the hooks."""
    got = probe_step(2, "parallel.tp=2", "parallel.sequence_parallel=true", "train.zero_stage=3")
    assert_same_probe(got, single_rank)


def test_probe_with_more_tensor_ranks_than_kv_heads_matches_single_rank():
    """tp=2 over one KV head: each copy of the head captures its own query heads' share; the shares are summed
    and the head counted once (sequence parallelism and ZeRO-3 as above)."""
    kv = "model.n_kv_heads=1"
    got = probe_step(2, kv, "parallel.tp=2", "parallel.sequence_parallel=true", "train.zero_stage=3")
    assert_same_probe(got, probe_step(1, kv))


@pytest.mark.parametrize("overrides", [["train.zero_stage=1"], ["train.zero_stage=2", "train.precision=bf16"]],
                         ids=["zero1", "zero2-bf16"])
def test_data_parallel_probe_matches_single_rank(single_rank, overrides):
    """dp=2: each replica backpropagates half of the global batch; the unit gradients are averaged over
    the replicas before the statistics, so they are the 1-rank run's on the whole batch."""
    got = probe_step(2, *overrides)
    if "train.precision=bf16" in overrides:  # bf16 weights and activations against the fp32 run: within 5e-4
        for key, value in single_rank["record"].items():  # (1e-4 measured; pooling per-replica statistics: 2e-3)
            assert got["record"][key] == pytest.approx(value, abs=5e-4), key
    else:
        assert_same_probe(got, single_rank)


def test_pipeline_probe_matches_single_rank(single_rank):
    """pp=2 with blocks 1,3: group 0 (layers 0, 2) spans both stages, group 1 (layers 1, 3) lives on stage 1."""
    got = probe_step(2, "parallel.pp=2", "parallel.partition=1,3", "parallel.activation_checkpointing=true")
    assert_same_probe(got, single_rank)
    # Stage 0 (rank 0): the embedding and layer 0's block, run through BlockUnit: the block checkpointed (the
    # embedding never is: test_recompute.py), both saved.
    assert got["checkpointed"] == [False, True] and got["saved"] == [True, True]
    # Stage 1 applies layers 1, 2, 3: with parallel.checkpoint_layers=1 only layer 1 recomputes there, so the
    # hooks of recomputed and stored layers meet in one backward; stage 0 recomputes layer 0.
    got = probe_step(2, "parallel.pp=2", "parallel.partition=1,3", "parallel.activation_checkpointing=true",
                     "parallel.checkpoint_layers=1")
    assert_same_probe(got, single_rank)
    assert got["checkpointed"] == [False, True]
