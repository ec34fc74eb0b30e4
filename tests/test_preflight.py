"""The start-up memory estimate and the one line a step's allocation failure becomes (megascale/train/preflight.py)."""

import pytest
import torch

from conftest import ROOT
from megascale.config import load_config
from megascale.errors import MegascaleError
from megascale.model.sharing import SharingPlan, untie_units
from megascale.parallel.topology import ParallelDims
from megascale.planner.layout import USABLE, activation_bytes, stage_blocks, stage_params, state_bytes
from megascale.train import preflight


def tiny(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_the_estimate_is_the_planners_count_of_this_layout():
    cfg = tiny("train.precision=bf16", "parallel.activation_checkpointing=true", "parallel.checkpoint_layers=1")
    dims = ParallelDims(tp=2, pp=2, dp=2)
    est = preflight.estimate(cfg, dims, zero_stage=1, grad_accum=4)
    shape = preflight.model_shape(cfg)
    assert est.activations == activation_bytes(shape, cfg.train.micro_batch_size, "bf16", 1, tp=2, pp=2, in_flight=2,
                                               sequence_parallel=False)
    assert est.state == state_bytes(stage_params(shape, 2, 2), "bf16", 1, 2)
    # sequence parallelism splits the norms' tensors and the hidden states; offloading leaves the activations alone
    sp = preflight.estimate(tiny("train.precision=bf16", "parallel.sequence_parallel=true"), dims, 1, 4)
    assert sp.activations < preflight.estimate(tiny("train.precision=bf16"), dims, 1, 4).activations
    host = preflight.estimate(tiny("train.offload_optimizer=cpu", "train.zero_stage=2"), ParallelDims(1, 1, 1), 2, 1)
    assert host.state is None and host.total == host.activations


def test_the_fix_names_the_fewest_recomputed_layers_that_fit():
    cfg, dims = tiny(), ParallelDims(1, 1, 1)
    layers = cfg.model.n_layers
    sizes = [preflight.estimate(cfg, dims, 0, 1, r).total for r in range(layers + 1)]
    target = min(range(1, layers + 1), key=lambda r: sizes[r])  # the recomputation that saves the most
    capacity = sizes[target] / USABLE
    r = preflight.fewest_recomputed(cfg, dims, 0, 1, capacity)
    assert r is not None and sizes[r] <= sizes[target] and all(sizes[k] > USABLE * capacity for k in range(r))
    said = preflight.fixes(cfg, dims, 0, 1, capacity)
    assert "parallel.activation_checkpointing=true" in said and "train.micro_batch_size" in said
    assert preflight.fit_note(preflight.estimate(cfg, dims, 0, 1), capacity).startswith("this layout may not fit")
    assert preflight.fit_note(preflight.estimate(cfg, dims, 0, 1, r), capacity) is None
    assert preflight.fewest_recomputed(cfg, dims, 0, 1, 1.0) is None  # a byte fits nothing
    assert preflight.fit_note(preflight.estimate(cfg, dims, 0, 1), None) is None  # no device limit on CPU


def test_an_allocation_failure_in_a_step_becomes_one_line():
    """A real failed allocation (the CPU allocator's; CUDA's is torch.OutOfMemoryError) inside the step."""
    cfg, dims = tiny(), ParallelDims(1, 1, 1)
    with pytest.raises(MegascaleError) as caught:
        with preflight.out_of_memory_explained(cfg, dims, 0, 1, "in step 3", rank=0, device=torch.device("cpu")):
            torch.empty(2**50, dtype=torch.uint8)
    said = str(caught.value)
    assert said.startswith("out of memory in step 3 on rank 0 (") and "\n" not in said
    assert "memory per GPU by the planner's count" in said and "to fit: recompute layers" in said
    with pytest.raises(RuntimeError, match="not about memory"):  # anything else passes through untouched
        with preflight.out_of_memory_explained(cfg, dims, 0, 1, "in step 3", rank=0, device=torch.device("cpu")):
            raise RuntimeError("not about memory")


def test_stage_blocks_counts_the_groups_each_stage_stores():
    assert stage_blocks(SharingPlan.parse("none", 6).group_of, 2) == 3
    assert stage_blocks(SharingPlan.parse("all", 6).group_of, 3) == 1
    assert stage_blocks(SharingPlan.parse("cycle:2", 6).group_of, 2) == 2
    assert stage_blocks(SharingPlan.parse("sequence:2", 6).group_of, 2) == 1  # layers 0-2 one block, 3-5 another
    assert stage_blocks(SharingPlan.parse("sequence:3", 6).group_of, 2) == 2  # (0, 0, 1 | 1, 2, 2)
    assert stage_blocks((0, 0, 0, 1, 2), 2) == 2  # 3 + 2 layers: the second stage, the shorter one, stores more
    assert stage_blocks((0, 1, 0, 0, 0), 2) == 2  # an untied unit: the first stage (3 layers) now holds two blocks


def test_the_estimate_counts_the_runs_plan_not_the_configs():
    """A resumed or untied run holds its plan's blocks: the step's and the untie's messages count those."""
    cfg, dims = tiny("model.sharing=all"), ParallelDims(1, 2, 1)
    layers = cfg.model.n_layers
    tied = preflight.estimate(cfg, dims, 1, 2)
    assert preflight.estimate(cfg, dims, 1, 2, plan=SharingPlan.parse("all", layers)) == tied
    untied = preflight.estimate(cfg, dims, 1, 2, plan=untie_units(SharingPlan.parse("all", layers), list(range(layers))))
    assert untied == preflight.estimate(tiny("model.sharing=none"), dims, 1, 2)  # every unit untied: as never tied
    assert untied.state > tied.state and untied.activations == tied.activations
    one_stage = ParallelDims(1, 1, 2)  # one untied unit: 2 blocks of 4 (on two stages, each would hold 2)
    tied, one, untied = (preflight.estimate(cfg, one_stage, 1, 2, plan=untie_units(SharingPlan.parse("all", layers), units))
                         for units in ([], [0], list(range(layers))))
    assert tied.state < one.state < untied.state


def test_an_allocation_failure_while_untying_names_the_untied_plan_and_the_checkpoint():
    cfg, dims = tiny("model.sharing=all", "train.zero_stage=1"), ParallelDims(1, 1, 2)
    after = untie_units(SharingPlan.parse("all", cfg.model.n_layers), list(range(cfg.model.n_layers)))
    with pytest.raises(MegascaleError) as caught:
        with preflight.out_of_memory_explained(cfg, dims, 1, 1, "untying units [0, 1, 2, 3] at step 40", rank=1,
                                               device=torch.device("cpu"), plan=after, untying=True,
                                               then=lambda: "the latest checkpoint, step_00000030, is untouched"):
            torch.empty(2**50, dtype=torch.uint8)
    said = str(caught.value)
    assert said.startswith("out of memory untying units [0, 1, 2, 3] at step 40 on rank 1 (") and "\n" not in said
    state = preflight.estimate(cfg, dims, 1, 1, plan=after).state
    assert f"state (weights, gradients, Adam) {state / 2**30:.2f} GiB" in said and " after the untie; " in said
    assert "to fit: untie fewer units (untie.units=lowest:k" in said and "train.offload_optimizer=cpu" in said
    assert said.endswith("; the latest checkpoint, step_00000030, is untouched")
