"""Untying: plans, conditions, the engine rebuild with state carried over, and untying inside a run."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from conftest import ROOT, TINY, clean_env, events, losses, run_pretrain, spawn_ranks
from megascale.config import load_config
from megascale.errors import MegascaleError
from megascale.model.sharing import SharingPlan, block_sources, replay_untie_history, untie_units
from megascale.train.checkpoint import full_weights
from megascale.train.checkpoint import read_meta as checkpoint_meta
from megascale.untie.conditions import UntieController
from megascale.untie.moments import UnitStats, block_factors, mean_unit_stats, probe_factors

# ------------------------------------------------------------------ plans


def test_untie_units_gives_each_freed_unit_its_own_block():
    plan = SharingPlan.parse("cycle:2", 6)  # [0,1,0,1,0,1]
    new = untie_units(plan, [2])
    assert new.to_list() == [0, 1, 2, 1, 0, 1]
    assert block_sources(plan, new) == {0: 0, 1: 1, 2: 0}
    whole = untie_units(plan, [0, 2, 4])
    assert whole.to_list() == [0, 1, 2, 1, 3, 1]
    assert block_sources(plan, whole) == {0: 0, 1: 1, 2: 0, 3: 0}


def test_untied_plan_reads_back_through_parse():
    plan = SharingPlan.parse("all", 4)
    new = untie_units(plan, [0])  # the first unit leaves: ids renumber by first appearance
    assert new.to_list() == [0, 1, 1, 1]
    assert block_sources(plan, new) == {0: 0, 1: 0}
    assert SharingPlan.parse(new.spec, 4) == SharingPlan(new.group_of, new.spec)


def test_untie_of_a_lone_unit_changes_nothing_and_history_replays():
    plan = SharingPlan.parse("0,0,1,2", 4)
    assert untie_units(plan, [3]).to_list() == [0, 0, 1, 2]
    history = [{"units": [1]}, {"units": [2]}]
    assert replay_untie_history(SharingPlan.parse("all", 4), history).to_list() == [0, 1, 2, 0]


def test_scale_gives_each_new_block_its_fraction_of_its_source_s_units():
    plan = SharingPlan.parse("cycle:2", 6)  # [0,1,0,1,0,1]: blocks of 3 units each
    assert block_factors(plan, untie_units(plan, [2]), "scale") == {
        0: (2 / 3, 4 / 9, "units"), 2: (1 / 3, 1 / 9, "units")}  # block 1 keeps all its units: (1, 1), left out
    everything = SharingPlan.parse("all", 4)
    assert block_factors(everything, untie_units(everything, [0]), "scale") == {0: (1 / 4, 1 / 16, "units"),
                                                                                  1: (3 / 4, 9 / 16, "units")}
    assert block_factors(plan, untie_units(plan, [2]), "copy") == {} and block_factors(plan, plan, "scale") == {}


def unit_stats_of(grads: dict[int, torch.Tensor]) -> UnitStats:
    """Exact pull and energy of per-unit gradient vectors (what the probe measures on one step)."""
    total = sum(grads.values())
    s = float(total @ total)
    return UnitStats(tuple(grads), {u: float(g @ total) / s for u, g in grads.items()},
                     {u: float(g @ g) / s for u, g in grads.items()}, 1)


def true_factors(grads, subset) -> tuple[float, float]:
    total, part = sum(grads.values()), sum(grads[u] for u in subset)
    return float(part @ total) / float(total @ total), float(part @ part) / float(total @ total)


def test_probe_factors_are_exact_for_one_unit_and_for_the_group_it_leaves():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(256, generator=gen)
    grads = {u: w * common + torch.randn(256, generator=gen) for u, w in zip(range(4), (1.0, 0.5, -0.2, 2.0))}
    stats = unit_stats_of(grads)
    assert sum(stats.pull.values()) == pytest.approx(1.0)
    for subset in ([0], [2], [1, 2, 3], [0, 1, 3]):
        assert probe_factors(stats, subset) == pytest.approx(true_factors(grads, subset), rel=1e-5)
    a, b = probe_factors(stats, [0, 1])  # two of four: the cross term <g0, g1> is estimated along the sum
    assert b >= a * a and a == pytest.approx(true_factors(grads, [0, 1])[0], rel=1e-5)
    with pytest.raises(ValueError, match="not all in the probed group"):
        probe_factors(stats, [7])


def test_probe_factors_of_agreeing_units_are_the_unit_shares():
    grads = {u: torch.ones(8) for u in range(4)}
    a, b = probe_factors(unit_stats_of(grads), [1])
    assert (a, b) == pytest.approx((1 / 4, 1 / 16))


def test_probe_statistics_average_the_recent_probes_of_the_current_units():
    old = {"units": [0, 1, 2], "pull": {"0": 0.2, "1": 0.3, "2": 0.5}, "energy": {"0": 1, "1": 1, "2": 1}}
    probes = [old,
              {"units": [0, 2], "pull": {"0": 0.4, "2": 0.6}, "energy": {"0": 0.5, "2": 0.7}},
              {"units": [0, 2], "pull": {"0": float("nan"), "2": 0.1}, "energy": {"0": 1.0, "2": 1.0}},  # overflowed
              {"units": [0, 2], "pull": {"0": 0.2, "2": 0.8}, "energy": {"0": 0.3, "2": 0.9}}]
    stats = mean_unit_stats(probes)
    assert stats.units == (0, 2) and stats.probes == 2
    assert stats.pull == pytest.approx({0: 0.3, 2: 0.7}) and stats.energy == pytest.approx({0: 0.4, 2: 0.8})
    assert mean_unit_stats([]) is None and mean_unit_stats(probes[2:3]) is None


def test_probe_policy_uses_the_controller_s_probes_and_falls_back_without_them():
    cycle = ("model.sharing=cycle:2", "untie.when=step:5", "untie.probe_every=1", "untie.moments=probe")
    c = controller(*cycle, "untie.coherence_probes=2")
    plan = SharingPlan.parse("cycle:2", 4)  # [0,1,0,1]
    shares = {"pull": {0: 0.9, 2: 0.1}, "energy": {0: 0.85, 2: 0.05}}
    for _ in range(3):  # three probes, two kept
        c.observe_probe(plan, {0: {"rho": 0.9, "alignment": {0: 1.0, 2: 0.4}, **shares}})
    assert len(c.state.unit_probes["0"]) == 2
    restored = controller(*cycle, "untie.coherence_probes=2")
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))  # as a checkpoint holds it
    stats = restored.unit_stats(plan)
    assert stats[0].pull == pytest.approx({0: 0.9, 2: 0.1}) and stats[1] is None
    factors = block_factors(plan, untie_units(plan, [0, 1, 2, 3]), "probe", stats)
    assert factors[0][:2] == pytest.approx((0.9, 0.85)) and factors[2][:2] == pytest.approx((0.1, 0.05))
    assert factors[0][2] == "probe (2)" and factors[1] == (0.5, 0.25, "units (no probe yet)")


def test_block_sources_refuses_a_merge():
    with pytest.raises(MegascaleError, match="only split"):
        block_sources(SharingPlan.parse("none", 2), SharingPlan.parse("all", 2))


# ------------------------------------------------------------------ conditions


def controller(*overrides: str, steps: int = 100) -> UntieController:
    cfg = load_config(None, ["model.n_layers=4", "model.sharing=all", *overrides])
    return UntieController(cfg, planned_tokens=steps * 1000)


ALL = SharingPlan.parse("all", 4)


@pytest.mark.parametrize("bad, match", [
    ("untie.when=epoch:3", "not a condition"),
    ("untie.when=step:x", "needs a number"),
    ("untie.when=tokens:1.5", "out of range"),
    ("untie.groups=3", "do not exist"),
    ("untie.units=lowest:0", "lowest:k"),
    ("untie.per_group=0:step:3", "group=conditions"),
])
def test_bad_untie_settings_fail_in_one_line(bad, match):
    with pytest.raises(MegascaleError, match=match):
        load_config(None, ["model.n_layers=4", "model.sharing=all", "untie.when=step:3", bad])


@pytest.mark.parametrize("needs", ["untie.when=coherence", "untie.moments=probe"])
def test_what_reads_probes_needs_probes(needs):
    with pytest.raises(MegascaleError, match="probe_every"):
        load_config(None, ["model.n_layers=4", "model.sharing=all", "untie.when=step:3", needs])
    load_config(None, ["model.n_layers=4", "model.sharing=all", "untie.moments=probe"])  # no untie rule: nothing to read


def test_step_and_token_conditions_fire_once():
    c = controller("untie.when=step:5")
    assert [c.decide(s, 0, ALL) for s in (3, 4)] == [[], []]
    (d,) = c.decide(5, 0, ALL)
    assert d.group == 0 and d.units == [0, 1, 2, 3] and "step 5" in d.reason
    assert c.decide(6, 0, ALL) == []  # fired already
    t = controller("untie.when=tokens:0.5")
    assert t.decide(10, 49_000, ALL) == [] and t.decide(11, 50_000, ALL)[0].units == [0, 1, 2, 3]


def test_plateau_fires_on_a_flat_loss_not_on_a_falling_one():
    flat = controller("untie.when=plateau", "untie.plateau_window=10", "untie.plateau_smoothing=0")
    falling = controller("untie.when=plateau", "untie.plateau_window=10", "untie.plateau_smoothing=0")
    fired = {}
    for step in range(1, 40):
        flat.observe_loss(step, 3.0 + 0.001 * (step % 2))
        falling.observe_loss(step, 5.0 * 0.98**step)
        for name, c in (("flat", flat), ("falling", falling)):
            if c.decide(step, 0, ALL):
                fired.setdefault(name, step)
    assert fired == {"flat": 11}  # the first step with a full window behind it


def probe(rho: float, cos: list[float]) -> dict:
    return {0: {"rho": rho, "alignment": dict(enumerate(cos))}}


def test_coherence_fires_after_consecutive_low_probes_and_picks_the_least_aligned():
    c = controller("untie.when=coherence", "untie.probe_every=1", "untie.coherence_probes=3", "untie.units=lowest:1")
    seq = [0.2, 0.2, 0.9, 0.2, 0.2]
    decisions = []
    for step, rho in enumerate(seq, 1):
        c.observe_probe(ALL, probe(rho, [0.9, -0.4, 0.8, 0.7]))
        decisions += c.decide(step, 0, ALL)
    assert decisions == []  # the 0.9 probe reset the count
    c.observe_probe(ALL, probe(0.2, [0.9, -0.4, 0.8, 0.7]))
    (d,) = c.decide(6, 0, ALL)
    assert d.units == [1] and "least aligned" in d.reason


def test_controller_state_round_trips():
    a = controller("untie.when=plateau,coherence", "untie.probe_every=1", "untie.plateau_window=3")
    for step in range(1, 6):
        a.observe_loss(step, 4.0 - 0.1 * step)
        a.observe_probe(ALL, probe(0.1, [0.5, 0.1, 0.2, 0.3]))
    b = controller("untie.when=plateau,coherence", "untie.probe_every=1", "untie.plateau_window=3")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.decide(6, 0, ALL) == b.decide(6, 0, ALL)


def test_partial_untie_keeps_watching_the_rest_of_the_group():
    c = controller("untie.when=coherence", "untie.probe_every=1", "untie.coherence_probes=1", "untie.units=lowest:1")
    c.observe_probe(ALL, probe(0.1, [0.9, -0.4, 0.8, 0.7]))
    (d,) = c.decide(1, 0, ALL)
    plan = untie_units(ALL, d.units)  # [0, 1, 0, 0]
    assert c.tied_units(plan, 0) == [0, 2, 3]
    c.state.fired.clear()  # a later rule firing again on what remains
    c.observe_probe(plan, {0: {"rho": 0.1, "alignment": {0: 0.9, 2: 0.1, 3: 0.5}}})
    assert c.decide(2, 0, plan)[0].units == [2]


# ------------------------------------------------------------------ the engine rebuild


def untie_check(data_dir, tmp_path, units: str, *overrides: str, nproc: int = 1) -> dict:
    cmd = [sys.executable, str(ROOT / "tests" / "untie_check.py"), units, *TINY, f"data.path={data_dir}",
           f"train.out_dir={tmp_path / 'run'}", "train.eval_batches=2", *overrides]
    proc = spawn_ranks(cmd, nproc, clean_env(), timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("UNTIE_REPORT ")), None)
    assert proc.returncode == 0 and line, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(line.split(" ", 1)[1])


LAYOUTS = [
    pytest.param(1, ["train.zero_stage=0"], id="zero0"),
    pytest.param(1, ["train.zero_stage=1", "train.precision=bf16"], id="zero1-bf16"),
    pytest.param(2, ["train.zero_stage=2"], id="dp2-zero2"),
    pytest.param(2, ["train.zero_stage=3"], id="dp2-zero3"),
    # bf16 ZeRO-3: the rebuilt engine's new parameters are cast before they are partitioned, as the first ones were.
    pytest.param(2, ["train.zero_stage=3", "train.precision=bf16"], id="dp2-zero3-bf16"),
    # ZeRO-Offload: master weights and moments read from and written to the host partitions.
    pytest.param(2, ["train.zero_stage=2", "train.precision=bf16", "train.offload_optimizer=cpu"], id="dp2-zero2-bf16-offload"),
    # bf16: fp32 ZeRO-1 at dp=1 runs as stage 0 (the first case); bf16 keeps DeepSpeed's partitioned state.
    pytest.param(4, ["train.zero_stage=1", "train.precision=bf16", "parallel.tp=2", "parallel.pp=2"], id="tp2-pp2-zero1-bf16"),
    # Pipeline stages with two data-parallel replicas each: the untie state is sliced over each stage's replicas.
    pytest.param(4, ["train.zero_stage=1", "parallel.pp=2"], id="pp2-dp2-zero1"),
]


@pytest.mark.parametrize("nproc, overrides", LAYOUTS)
def test_untie_keeps_output_and_copies_the_state(data_dir, tmp_path, nproc, overrides):
    r = untie_check(data_dir, tmp_path, "0,2", *overrides, nproc=nproc)
    assert r["plan_after"] == [0, 1, 2, 1]
    assert r["val_after"] == pytest.approx(r["val_before"], rel=1e-6, abs=1e-6)  # same output
    assert r["eval_grad_modes"] == [False]  # evaluation keeps no autograd graph of its micro-batches
    assert r["state_max_diff"] == 0.0  # fp32 weights and both Adam moments copied exactly
    assert all(ratio == [1.0, 1.0] for ratio in r["moment_ratios"].values())
    assert r["step_after"] == r["step_before"] == 2 and r["adam_state_step"] == 2
    assert r["lr_after"] == r["lr_before"] and r["global_steps"] == 2
    for rank in r["memory_by_rank"]:
        for when in ("before", "after"):
            m = rank[when]
            assert m["measured"] == pytest.approx(m["formula"], rel=0.03)
    # The state carried across the untie: each data-parallel rank holds a 1/dp slice of its tp/pp part.
    dp = nproc // (2 if "parallel.tp=2" in overrides else 1) // (2 if "parallel.pp=2" in overrides else 1)
    held = [rank["state"] for rank in r["memory_by_rank"]]
    for s in held:
        assert abs(s["held"] - s["full"] / dp) <= s["tensors"]  # ceil's rounding: at most one element per tensor
    if dp == nproc:  # the slices of the data-parallel ranks tile the whole state
        assert sum(s["held"] for s in held) == held[0]["full"]
    assert all(l == l for l in r["losses"]) and r["losses"][2] < r["losses"][1] * 1.02  # no spike


@pytest.mark.parametrize("nproc, overrides", [
    pytest.param(1, ["train.zero_stage=0"], id="zero0"),
    pytest.param(2, ["train.zero_stage=2", "train.precision=bf16"], id="dp2-zero2-bf16"),
    pytest.param(2, ["train.zero_stage=1", "parallel.pp=2"], id="pp2"),  # blocks named tied_modules.block<g>
])
def test_untie_scales_the_moments_to_each_copy_s_share(data_dir, tmp_path, nproc, overrides):
    """untie.moments=scale: blocks 0 and 2 (one of the two units each) get exp_avg x 1/2 and exp_avg_sq x 1/4;
    block 1, still applied by both its units, and the embeddings keep theirs. Weights and output unchanged."""
    r = untie_check(data_dir, tmp_path, "0,2", "untie.moments=scale", *overrides, nproc=nproc)
    assert r["plan_after"] == [0, 1, 2, 1]
    assert r["val_after"] == pytest.approx(r["val_before"], rel=1e-6, abs=1e-6)
    ratios = r["moment_ratios"]
    block = {name: re.match(r"^(?:blocks\.|tied_modules\.block)(\d+)\.", name) for name in ratios}
    seen = {m.group(1) for m in block.values() if m}  # rank 0's: under pp=2 its stage holds layers 0 and 1
    assert seen == ({"0", "1"} if "parallel.pp=2" in overrides else {"0", "1", "2"})
    for name, (first, second) in ratios.items():
        expected = 0.5 if block[name] and block[name].group(1) in ("0", "2") else 1.0
        assert first == pytest.approx(expected, rel=1e-6) and second == pytest.approx(expected**2, rel=1e-6), name
    assert all(l == l for l in r["losses"])


def test_probe_moments_come_from_the_last_probe_before_the_untie(data_dir, tmp_path):
    """untie.moments=probe with one probe kept: each freed unit's factors are its pull and energy on step 3,
    which the probe record's coherence and alignment pin down: sum a = 1, sum b = 1/(K rho), a = cos sqrt(b)."""
    run_pretrain(tmp_path, data_dir, "untie.when=step:3", "untie.probe_every=1", "untie.coherence_probes=1",
                 "untie.moments=probe", "train.max_steps=4")
    (event,) = events(tmp_path, "untie")
    probe = next(r for r in events(tmp_path, "probe") if r["step"] == 3)
    factors = {int(g): f for g, f in event["moment_factors"].items()}
    assert event["moments"] == "probe" and event["plan_after"] == [0, 1, 2, 3] and sorted(factors) == [0, 1, 2, 3]
    for group, units in ((0, (0, 2)), (1, (1, 3))):  # cycle:2; the new blocks are numbered by layer
        a = [factors[u][0] for u in units]
        b = [factors[u][1] for u in units]
        assert all(factors[u][2] == "probe (1)" for u in units)
        assert sum(a) == pytest.approx(1.0, rel=1e-4)
        assert sum(b) == pytest.approx(1 / (2 * probe[f"coherence/g{group}"]), rel=1e-4)
        for u, ai, bi in zip(units, a, b):
            assert ai == pytest.approx(probe[f"alignment/g{group}/u{u}"] * bi**0.5, rel=1e-4, abs=1e-6)
    assert all(l == l for l in losses(tmp_path).values())


def test_untie_grows_memory_by_the_formula(data_dir, tmp_path):
    r = untie_check(data_dir, tmp_path, "0,2", "train.zero_stage=1")
    (rank,) = r["memory_by_rank"]
    grown_formula = rank["after"]["formula"] - rank["before"]["formula"]
    grown_measured = rank["after"]["measured"] - rank["before"]["measured"]
    assert grown_formula > 0 and grown_measured == pytest.approx(grown_formula, rel=0.01)
    assert r["new_names"] and all(n.startswith("blocks.2.") for n in r["new_names"])


# ------------------------------------------------------------------ untying inside a run


UNTIE_AT_3 = ["untie.when=step:3", "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def untied_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("untied")
    run_pretrain(out, data_dir, *UNTIE_AT_3, "metrics.plot=true")
    return out


def test_untie_in_a_run_matches_the_tied_run_until_it_acts(data_dir, tmp_path, untied_run):
    tied = tmp_path / "tied"
    run_pretrain(tied, data_dir, "train.max_steps=6")
    a, b = losses(tied), losses(untied_run)
    # The untie happens after step 3's update; step 4 still runs on equal weights.
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    assert a[5] != b[5] and max(b[5], b[6]) < b[4] * 1.02
    (event,) = events(untied_run, "untie")
    assert event["step"] == 3 and event["plan_after"] == [0, 1, 2, 3] and event["reasons"]["0"] == "step 3 >= 3"
    assert event["moments"] == "copy" and event["seconds"] > 0
    assert len(events(untied_run, "state_memory")) == 2  # before and after
    assert (untied_run / "loss.png").stat().st_size > 0


def test_untie_under_compile_trains_as_the_eager_run(data_dir, tmp_path, untied_run):
    """configs/1.3b.yaml compiles every block: the untie's rebuilt engine compiles the new ones too, and the
    run's losses stay the eager run's (inductor may reorder float sums)."""
    compiled = tmp_path / "compiled"
    run_pretrain(compiled, data_dir, *UNTIE_AT_3, "train.compile=true", "train.save_every=0")
    eager, got = losses(untied_run), losses(compiled)
    assert sorted(got) == sorted(eager) == list(range(1, 7))
    for step, loss in eager.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step
    (event,) = events(compiled, "untie")
    assert event["step"] == 3 and event["plan_after"] == [0, 1, 2, 3]


def read_meta(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "megascale.json").read_text())


def test_checkpoints_record_the_untie_history(untied_run):
    assert read_meta(untied_run, 2)["untie_history"] == [] and read_meta(untied_run, 2)["sharing_plan"] == [0, 1, 0, 1]
    (event,) = read_meta(untied_run, 4)["untie_history"]
    assert event["step"] == 3 and read_meta(untied_run, 4)["sharing_plan"] == [0, 1, 2, 3]


@pytest.mark.parametrize("step", [2, 4], ids=["before-untie", "after-untie"])
def test_resume_across_the_untie(data_dir, tmp_path, untied_run, step):
    ckpt = untied_run / "checkpoints" / f"step_{step:08d}"
    proc = run_pretrain(tmp_path / "resumed", data_dir, *UNTIE_AT_3, f"train.resume={ckpt}")
    resumed, full = losses(tmp_path / "resumed"), losses(untied_run)
    assert resumed == {s: full[s] for s in range(step + 1, 7)}
    assert ("untied group 0" in proc.stderr) == (step < 3)  # repeated at step 3 only when resumed before it


def test_resume_before_a_probe_scaled_untie_scales_it_the_same(data_dir, tmp_path):
    """The probes a moments=probe untie reads are in the checkpoint: resumed between them, the untie at
    step 3 gets the same factors (from steps 2 and 3) and training the same losses."""
    probed = [*UNTIE_AT_3, "untie.probe_every=1", "untie.coherence_probes=2", "untie.moments=probe"]
    run_pretrain(tmp_path / "full", data_dir, *probed)
    ckpt = tmp_path / "full" / "checkpoints" / f"step_{2:08d}"
    run_pretrain(tmp_path / "resumed", data_dir, *probed, f"train.resume={ckpt}")
    (full,), (resumed,) = events(tmp_path / "full", "untie"), events(tmp_path / "resumed", "untie")
    assert resumed["moment_factors"] == full["moment_factors"]
    assert all(f[2] == "probe (2)" for f in full["moment_factors"].values())
    assert losses(tmp_path / "resumed") == {s: v for s, v in losses(tmp_path / "full").items() if s > 2}


@pytest.mark.parametrize("step", [2, 4])
def test_full_weights_read_checkpoints_on_both_sides_of_the_untie(untied_run, step):
    """The consolidation reader (launch/consolidate.py, the HF export) on either side of the untie.

    This 1-rank fp32 run trains at ZeRO-0 (nothing to partition), so DeepSpeed's zero_to_fp32 has
    no ZeRO files to read here; it is tested on data-parallel runs in test_train_parallel.py.
    """
    path = untied_run / "checkpoints" / f"step_{step:08d}"
    state = full_weights(path, checkpoint_meta(path))
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    assert blocks == ({"0", "1"} if step == 2 else {"0", "1", "2", "3"})


# ------------------------------------------------------------------ coherence inside a run


def test_coherence_condition_in_a_run(data_dir, tmp_path):
    """rho <= 1 always: a threshold above 1 must fire after coherence_probes probes.

    That the detector stays silent when units agree and fires when they conflict is tested on
    built cases in tests/test_probe.py and on the controller above; this is the wiring in a run.
    """
    threshold = 1.01
    run_pretrain(tmp_path, data_dir, "model.sharing=all", "untie.when=coherence", "untie.probe_every=2",
                 "untie.coherence_probes=2", f"untie.coherence_threshold={threshold}", "untie.units=lowest:1",
                 "train.max_steps=6")
    probes = events(tmp_path, "probe")
    rhos = [v for p in probes for k, v in p.items() if k.startswith("coherence/")]  # one tied group per probe
    assert [p["step"] for p in probes][:2] == [2, 4] and len(rhos) == len(probes) and all(0 < r <= 1 for r in rhos)
    assert all(set(p) >= {f"alignment/g0/u{u}" for u in range(4)} for p in probes[:2])
    (event,) = events(tmp_path, "untie")
    assert event["step"] == 4 and len(event["units"]) == 1
    least = min(range(4), key=lambda u: probes[1][f"alignment/g0/u{u}"])
    assert event["units"] == [least] and "least aligned" in event["reasons"]["0"]
    # after the untie the remaining three units are still probed as one group
    later = [p for p in probes if p["step"] > 4]
    assert later and all(len([k for k in p if k.startswith("alignment/")]) == 3 for p in later)


@pytest.mark.parametrize("step", [2, 4], ids=["before-untie", "after-untie"])
def test_hf_export_on_both_sides_of_the_untie(untied_run, tmp_path, step):
    import torch
    import transformers

    from megascale.export import export_hf, model_config_of
    from megascale.model import Transformer
    from megascale.train.checkpoint import full_weights, read_meta as read_checkpoint_meta

    path = untied_run / "checkpoints" / f"step_{step:08d}"
    meta = read_checkpoint_meta(path)
    ours = Transformer(model_config_of(meta))
    ours.load_state_dict(full_weights(path, meta))
    hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(path, tmp_path / "hf"), dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4
