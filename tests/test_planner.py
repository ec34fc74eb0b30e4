"""Compute planner: mappings, closed forms, shapes, plans, emitted configs, fits, sweeps, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megascale.config import ModelConfig, load_config
from megascale.errors import MegascaleError
from megascale.hardware import lookup_gpu
from megascale.model import Transformer
from megascale.planner.fit import RunPoint, fit_runs, read_run
from megascale.planner.mappings import PUBLISHED, get_mapping, load_mapping, save_mapping
from megascale.planner.plan import make_budget, make_plan, plan_to_dict, render_plan, write_config
from megascale.planner.shapes import Shape, count, recompute_flops_per_token, solve_shape
from megascale.planner.sweep import PRESETS, plan_sweep, write_sweep

from conftest import ROOT, clean_env

GOPHER = 5.76e23


def load_cli():
    """launch/plan.py as a module (launch/ is not a package), to call main() in-process."""
    sys.path.insert(0, str(ROOT / "launch"))
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    cli = load_cli()
    rc = cli.common.run(cli.main, list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ mappings


def numeric_optimum(mapping, flops: float) -> float:
    """argmin_N L(N, C/(6N)) by a dense log grid, then golden-section refinement."""
    grid = np.exp(np.linspace(math.log(1e3), math.log(1e15), 4001))
    losses = [mapping.loss(n, flops / (6 * n)) for n in grid]
    i = int(np.argmin(losses))
    lo, hi = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        fa = mapping.loss(math.exp(a), flops / (6 * math.exp(a)))
        fb = mapping.loss(math.exp(b), flops / (6 * math.exp(b)))
        lo, hi = (lo, b) if fa < fb else (a, hi)
    return math.exp((lo + hi) / 2)


@pytest.mark.parametrize("name", ["chinchilla-3", "chinchilla-3-tex", "epoch"])
@pytest.mark.parametrize("flops", [1e18, 1e21, GOPHER, 1e26])
def test_closed_form_optimum_matches_numeric_minimisation(name, flops):
    mapping = PUBLISHED[name]
    alloc = mapping.allocate(flops)
    assert alloc.params == pytest.approx(numeric_optimum(mapping, flops), rel=1e-5)
    assert 6 * alloc.params * alloc.tokens == pytest.approx(flops, rel=1e-12)
    assert alloc.loss == pytest.approx(mapping.loss(alloc.params, alloc.tokens))


def test_published_parameters_give_the_papers_exponents_and_anchors():
    # Hoffmann et al. 2022: approach 3 gives a = 0.46, b = 0.54 (Table 2); the printed, rounded
    # alpha/beta give 0.452, the TeX-source values 0.4565.
    assert PUBLISHED["chinchilla-3"].a == pytest.approx(0.46, abs=0.01)
    assert PUBLISHED["chinchilla-3-tex"].a == pytest.approx(0.46, abs=0.005)
    assert PUBLISHED["chinchilla-3-tex"].b == pytest.approx(0.54, abs=0.005)
    # Besiroglu et al. 2024: a = 0.5126 — consistent with approaches 1 and 2 (~20 tokens per parameter).
    assert PUBLISHED["epoch"].a == pytest.approx(0.5126, abs=1e-4)
    assert 15 < PUBLISHED["epoch"].allocate(GOPHER).tokens_per_param < 30
    # Approach 3 with the unrounded values puts the Gopher-budget optimum near 40B (the paper's figure 4).
    assert 35e9 < PUBLISHED["chinchilla-3-tex"].allocate(GOPHER).params < 45e9
    # Approaches 1/2 go through their anchors; D = C/(6N) gives Chinchilla's ~1.4T tokens.
    assert PUBLISHED["chinchilla-1"].allocate(GOPHER).params == pytest.approx(67e9)
    ch2 = PUBLISHED["chinchilla-2"].allocate(GOPHER)
    assert ch2.params == pytest.approx(70e9) and ch2.tokens == pytest.approx(1.37e12, rel=0.01)
    # Kaplan: 1.3e9 non-embedding parameters at 1 PF-day, exponent 0.73.
    kaplan = PUBLISHED["kaplan"]
    assert kaplan.allocate(8.64e19).params == pytest.approx(1.3e9)
    assert kaplan.allocate(8.64e20).params / kaplan.allocate(8.64e19).params == pytest.approx(10**0.73)


def test_overrides_rotate_power_laws_around_the_anchor_and_reject_unknown_names():
    ch2 = get_mapping("chinchilla-2", {"a": 0.6})
    assert ch2.a == 0.6 and ch2.allocate(GOPHER).params == pytest.approx(70e9)
    assert ch2.allocate(GOPHER * 10).params == pytest.approx(70e9 * 10**0.6)
    epoch = get_mapping("epoch", {"alpha": 0.3, "beta": 0.3})
    assert epoch.a == pytest.approx(0.5)
    with pytest.raises(MegascaleError, match="has no parameter 'gamma'"):
        get_mapping("epoch", {"gamma": 1.0})


def test_mapping_json_round_trip(tmp_path):
    for name, mapping in PUBLISHED.items():
        back = load_mapping(save_mapping(mapping, tmp_path / f"{name}.json"))
        assert back.allocate(1e21) == mapping.allocate(1e21)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("shape", [
    Shape(512, 64, 2, 1, 1, 192, 64),
    Shape(1000, 256, 4, 4, 2, 704, 128, sharing="cycle:2"),
    Shape(2048, 384, 6, 6, 3, 1024, 256, sharing="sequence:3", tie_embeddings=True),
    Shape(32000, 2048, 4, 16, 8, 5632, 2048, sharing="all"),
])
def test_shape_counts_equal_the_real_transformer(shape):
    cfg = ModelConfig(**{k: v for k, v in shape.model_overrides().items()})
    with torch.device("meta"):
        model = Transformer(cfg)
    real, mine = model.param_counts(), count(shape)
    assert (mine.applied, mine.unique, mine.embedding) == (real.applied, real.unique, real.embedding)
    assert mine.flops_per_token == model.flops_per_token(shape.seq_len)
    assert recompute_flops_per_token(shape, 3) == model.recompute_flops_per_token(shape.seq_len, 3)  # the trainer's HFU


def test_recompute_flops_are_what_the_real_model_recomputes():
    """The planner's price of recomputing n layers equals the matmul FLOPs PyTorch counts in a training step of the
    real model, less the same step without recomputation (attention through SDPA's math backend, whose products
    the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    shape = Shape(64, 32, 4, 4, 2, 96, 16)
    cfg = ModelConfig(**shape.model_overrides(), attention="torch")
    tokens = torch.randint(0, shape.vocab_size, (2, shape.seq_len), generator=torch.Generator().manual_seed(0))

    def step_flops(layers: int) -> int:
        model = Transformer(cfg, seed=0).train()
        model.activation_checkpointing, model.checkpoint_layers = layers > 0, layers
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(tokens, tokens.roll(-1, 1)).backward()
        return counter.get_total_flops()

    stored = step_flops(0)
    for n in range(1, shape.n_layers + 1):
        assert step_flops(n) - stored == recompute_flops_per_token(shape, n) * tokens.numel()
    # under 6N the attention products are not counted, here as in the rest of the step
    assert recompute_flops_per_token(shape, 1) - recompute_flops_per_token(shape, 1, exact=False) == 4 * 32 * 16


@pytest.mark.parametrize("target", np.geomspace(1e7, 1e12, 11).tolist())
def test_shape_solver_hits_n_within_2_percent_with_friendly_sizes(target):
    shape = solve_shape(target, vocab_size=32000, seq_len=2048)
    n = count(shape).applied
    assert abs(n / target - 1) <= 0.02
    assert shape.head_dim in (64, 128) and shape.d_model % 64 == 0 and shape.ffn_dim % 64 == 0
    assert shape.n_heads % shape.n_kv_heads == 0
    assert 2 <= shape.ffn_dim / shape.d_model <= 4
    assert 8 <= shape.d_model / shape.n_layers <= 256  # a sensible depth/width ratio
    if target >= 1e10:
        assert shape.n_kv_heads == 8 and shape.n_heads % 8 == 0  # GQA, divisible for 8-way tensor parallelism


@pytest.mark.parametrize("kind", ["non_embedding", "model_scale"])
def test_shape_solver_hits_other_size_measures(kind):
    shape = solve_shape(3e9 if kind == "non_embedding" else 2e10, kind=kind, vocab_size=32000, seq_len=2048)
    value = count(shape).value(kind)
    assert abs(value / (3e9 if kind == "non_embedding" else 2e10) - 1) <= 0.02


def test_tied_blocks_compute_follows_applied_memory_follows_unique():
    budget = make_budget(flops=1e20)
    dense = make_plan(budget, PUBLISHED["epoch"])
    tied = make_plan(budget, PUBLISHED["epoch"], sharing="all")
    assert tied.counts.applied == pytest.approx(dense.allocation.params, rel=0.02)  # same compute target
    assert tied.counts.unique < tied.counts.applied / 4  # one stored block
    assert tied.recipe.tokens == pytest.approx(dense.recipe.tokens, rel=0.05)
    assert any("tied blocks" in note for note in tied.notes)


# ------------------------------------------------------------------ plans and configs


def test_gpu_budget_plan_spends_the_budget_and_takes_the_time():
    budget = make_budget(gpu=lookup_gpu("H100"), n_gpus=8, hours=168, mfu=0.4)
    assert budget.flops == pytest.approx(8 * 989e12 * 0.4 * 168 * 3600)
    plan = make_plan(budget, PUBLISHED["epoch"])
    r = plan.recipe
    assert r.steps == math.ceil(budget.flops / plan.flops_per_token / (r.global_batch * r.seq_len))
    assert r.global_batch % (r.micro_batch * 8) == 0
    assert plan.wall_seconds == pytest.approx(168 * 3600, rel=0.01)
    assert abs(plan.size_error) <= 0.02
    six_nd = make_plan(budget, PUBLISHED["epoch"], flops_model="6nd")
    assert six_nd.flops_per_token == 6 * six_nd.counts.applied  # the planner says which model it used
    assert six_nd.recipe.tokens > r.tokens  # the exact count includes attention


def test_optimizer_is_offloaded_only_when_it_does_not_fit_on_the_gpus(tmp_path):
    from megascale.planner.plan import offloaded_state_bytes  # noqa: PLC0415
    from megascale.train.memory import formula_state_bytes  # noqa: PLC0415

    fits = make_plan(make_budget(gpu=lookup_gpu("A10G"), n_gpus=1, hours=30 * 24), PUBLISHED["epoch"])  # ~1B
    assert fits.recipe.offload_optimizer == "none" and fits.memory.host == 0
    big = make_plan(make_budget(gpu=lookup_gpu("A10G"), n_gpus=1, hours=365 * 24), PUBLISHED["epoch"])  # ~3.5B
    r, mem = big.recipe, big.memory
    assert r.offload_optimizer == "cpu" and r.zero_stage == 2  # 16 bytes/parameter exceed 24 GB; 2 bytes do not
    assert mem.state + mem.activations <= 0.9 * 24 * 2**30 < 16 * big.counts.unique
    assert any("offloaded (train.offload_optimizer=cpu)" in note for note in big.notes)
    cfg = load_config(write_config(big, tmp_path / "big.yaml"))
    assert cfg.train.offload_optimizer == "cpu" and cfg.train.zero_stage == 2
    # The planner's split is the trainer's formula: the device keeps the weights, the host the rest.
    for stage, dp in ((2, 1), (2, 4), (3, 4)):
        f = formula_state_bytes(1000, "bf16", stage, dp, offload=True)
        assert offloaded_state_bytes(1000, "bf16", stage, dp) == pytest.approx((f.weights, f.grads + f.optimizer))
        if stage == 3:  # the weight partition to the host as well
            assert offloaded_state_bytes(1000, "bf16", 3, dp, params=True)[1] == pytest.approx(f.total)
    # ~11B on one 24 GB GPU: even ZeRO-3's weights do not fit beside the activations; they are offloaded too.
    huge = make_plan(make_budget(gpu=lookup_gpu("A10G"), n_gpus=1, hours=3650 * 24), PUBLISHED["epoch"])
    assert (huge.recipe.zero_stage, huge.recipe.offload_optimizer, huge.recipe.offload_params) == (3, "cpu", "cpu")
    cfg = load_config(write_config(huge, tmp_path / "huge.yaml"))
    assert cfg.train.offload_params == "cpu" and any("train.offload_params=cpu" in note for note in huge.notes)
    assert fits.recipe.offload_params == big.recipe.offload_params == "none"


def test_layers_recompute_only_when_one_sequence_does_not_fit_and_before_offloading(tmp_path):
    """~1B on one 24 GB GPU: 2k-token sequences fit; at 16k the fewest layers that make one sequence fit recompute,
    with the optimizer still on the GPU; at 32k every layer does."""
    from megascale.planner.layout import layer_bytes_per_token  # noqa: PLC0415
    from megascale.planner.plan import activation_bytes  # noqa: PLC0415

    def plan(seq_len):
        return make_plan(make_budget(gpu=lookup_gpu("A10G"), n_gpus=1, hours=30 * 24), PUBLISHED["epoch"], seq_len=seq_len)

    short, long, longer = plan(2048), plan(16384), plan(32768)
    cfg = load_config(write_config(short, tmp_path / "short.yaml"))
    assert short.recipe.recomputed_layers == 0 and not cfg.parallel.activation_checkpointing
    usable = 0.9 * 24 * 2**30
    L, n = long.shape.n_layers, long.recipe.recomputed_layers
    assert 0 < n < L and long.recipe.offload_optimizer == "none" and long.recipe.micro_batch == 1
    mem = long.memory
    assert mem.activations == activation_bytes(long.shape, 1, "bf16", n) and mem.state + mem.activations <= usable
    assert mem.state + activation_bytes(long.shape, 1, "bf16", n - 1) > usable  # one layer fewer would not fit
    cfg = load_config(write_config(long, tmp_path / "long.yaml"))
    assert cfg.parallel.activation_checkpointing and cfg.parallel.checkpoint_layers == n
    assert f"{n} of {L} layers recomputed" in render_plan(long)
    assert any(f"parallel.checkpoint_layers={n}): one more forward" in note for note in long.notes)
    # the recomputed forwards are paid out of the budget: fewer tokens, and the 30 days still hold
    r, C = long.recipe, long.budget.flops
    extra = recompute_flops_per_token(long.shape, n)
    assert r.steps == math.ceil(C / (long.flops_per_token + extra) / r.tokens_per_step)
    assert r.recompute_flops == extra * r.tokens and long.hardware_flops == r.flops + r.recompute_flops
    assert long.wall_seconds == pytest.approx(30 * 24 * 3600, rel=0.01)
    share = r.recompute_flops / long.hardware_flops
    assert f"{share:.0%} of it recomputing" in render_plan(long) and f"reads ≈ {0.4 * (1 - share):.2f}" in render_plan(long)
    assert short.hardware_flops == short.recipe.flops and "recomput" not in render_plan(short)
    cfg = load_config(write_config(longer, tmp_path / "longer.yaml"))
    assert longer.recipe.recomputed_layers == longer.shape.n_layers and longer.recipe.offload_optimizer == "none"
    assert cfg.parallel.activation_checkpointing and cfg.parallel.checkpoint_layers == 0  # 0: every layer
    assert "every layer recomputed" in render_plan(longer)
    # each recomputed layer keeps its input (2·d bytes a token in bf16) of what it would keep, plus one rebuilt layer
    d, T = long.shape.d_model, long.shape.seq_len
    layer = layer_bytes_per_token(long.shape, "bf16")
    assert activation_bytes(long.shape, 1, "bf16", 0) - activation_bytes(long.shape, 1, "bf16", 2) == (2 * (layer - 2 * d) - layer) * T


def test_emitted_config_loads_validates_and_matches_the_plan(tmp_path):
    plan = make_plan(make_budget(flops=3e19), PUBLISHED["chinchilla-2"], vocab_size=32000, seq_len=1024, sharing="cycle:2")
    cfg = load_config(write_config(plan, tmp_path / "run.yaml"))
    assert cfg.model.d_model == plan.shape.d_model and cfg.model.sharing == "cycle:2"
    assert cfg.train.max_steps == plan.recipe.steps and cfg.train.global_batch_size == plan.recipe.global_batch
    assert 0 < cfg.optim.warmup_steps <= 0.02 * cfg.train.max_steps + 1
    assert cfg.data.seq_len == 1024 and cfg.model.max_seq_len == 1024
    with torch.device("meta"):
        assert Transformer(cfg.model).param_counts().applied == plan.counts.applied


def test_cli_plan_json_and_table(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "--gpus", "8", "--gpu", "h100", "--days", "7", "--json", "--emit-config", str(tmp_path / "a.yaml"))
    assert rc == 0
    data = json.loads(out)
    assert data["budget"]["n_gpus"] == 8 and data["flops_model"] == "exact"
    assert data["predicted_loss"] is not None and data["emitted_config"].endswith("a.yaml")
    assert data["start_command"] == f"deepspeed --num_gpus 8 launch/pretrain.py --config {tmp_path / 'a.yaml'}"
    rc, out, _ = run_cli(capsys, "--flops", "1e21", "--mapping", "kaplan")
    assert rc == 0 and "non-embedding" in out and "other mappings" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--flops", "-1"], "must be positive"),
    (["--flops", "0"], "must be positive"),
    (["--gpus", "8", "--gpu", "H100", "--days", "7", "--mfu", "1.5"], "MFU 1.5 must be in (0, 1]"),
    (["--gpus", "8", "--gpu", "H100", "--days", "7", "--mfu", "0"], "MFU 0 must be in (0, 1]"),
    (["--gpus", "8", "--gpu", "Z100", "--days", "7"], "unknown GPU 'Z100'"),
    (["--gpus", "0", "--gpu", "H100", "--days", "7"], "GPU count 0"),
    (["--gpus", "8", "--days", "7"], "a GPU-time budget needs the GPU model: --gpu H100"),
    (["--flops", "1e21", "--gpus", "8"], "laying the run out over --gpus 8 needs the GPU model: --gpu H100"),
    (["--flops", "1e21", "--seq-len", "0"], "sequence length 0 and vocabulary 32000 must be positive"),
    (["--flops", "1e21", "--kv-heads", "-1"], "KV heads -1 must be >= 0"),
    (["sweep", "--budgets", "1e18,3e18", "--out", "/nonexistent/never", "--micro-batch", "0"], "--micro-batch 0 must be positive"),
    (["sweep", "--budgets", "1e18,3e18", "--out", "/nonexistent/never", "--global-batch", "-1"], "--global-batch -1 must be"),
    (["sweep", "--budgets", "1e18,3e18", "--out", "/nonexistent/never", "--jobs", "0"], "--jobs 0 must be >= 1"),
    ([], "no budget"),
    (["--flops", "1e21", "--mapping", "nope"], "unknown mapping 'nope'"),
])
def test_bad_plan_input_is_one_line(capsys, argv, fragment):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err


def _part_with_tokens(source: Path, out: Path, train_tokens: int) -> Path:
    """A copy of a prepared corpus whose manifest says it has ``train_tokens`` train tokens (all the planner reads)."""
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] = train_tokens
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_plan_counts_the_epochs_of_each_blended_part_and_emits_the_blend(capsys, tmp_path, data_dir):
    """--blend: each part's share of D against its train tokens (from its manifest); a note past 4 epochs
    (Muennighoff et al. 2023), stronger past 16; the emitted config trains on the blend, vocabulary from its tokenizer."""
    rc, out, _ = run_cli(capsys, "--flops", "1e15", "--seq-len", "64", "--data", str(data_dir), "--json")
    assert rc == 0
    tokens = json.loads(out)["tokens"]
    mid = _part_with_tokens(data_dir, tmp_path / "mid", int(tokens * 0.25 / 8))  # read 8 times
    big = _part_with_tokens(data_dir, tmp_path / "big", int(tokens * 0.25 * 2))  # half of it read
    blend = f"0.5 {data_dir}, 0.25 {mid}, 0.25 {big}"
    rc, out, _ = run_cli(capsys, "--flops", "1e15", "--seq-len", "64", "--blend", blend, "--json",
                         "--emit-config", str(tmp_path / "blend.yaml"))
    assert rc == 0
    plan = json.loads(out)
    assert plan["tokens"] == tokens
    use = {Path(u["path"]).name: u for u in plan["data_use"]}
    assert [(u["weight"], u["train_tokens"]) for u in use.values()] == [
        (0.5, 300_200), (0.25, int(tokens * 0.25 / 8)), (0.25, int(tokens * 0.25 * 2))]
    assert use["stdlib-512"]["epochs"] == pytest.approx(tokens * 0.5 / 300_200) and use["stdlib-512"]["epochs"] > 16
    assert use["mid"]["epochs"] == pytest.approx(8, rel=1e-6) and use["big"]["epochs"] == pytest.approx(0.5, rel=1e-6)
    repeated = [n for n in plan["notes"] if "Muennighoff" in n]
    assert len(repeated) == 2
    assert repeated[0].startswith(f"{data_dir}:") and "worth little" in repeated[0]
    assert repeated[1].startswith(f"{mid}:") and "train tokens 8.0 times" in repeated[1] and "worth less and less" in repeated[1]
    cfg = load_config(tmp_path / "blend.yaml")
    assert cfg.data.blend == blend and cfg.data.corpus == "prepared" and cfg.model.vocab_size == 512

    rc, out, _ = run_cli(capsys, "--flops", "1e15", "--seq-len", "64", "--blend", blend)  # the table's data row
    (row,) = [line for line in out.splitlines() if line.strip().startswith("data ")]
    assert f"{mid}: " in row and "× 25%, 8.00 epochs" in row and "0.50 epochs" in row

    rc, out, err = run_cli(capsys, "--flops", "1e15", "--data", str(data_dir), "--blend", blend)
    assert rc == 2 and err.count("\n") == 1 and "--data and --blend both name the training data" in err


# ------------------------------------------------------------------ fits


def synthetic_runs(law, budgets, sizes=7, spread=36.0, noise=0.005, seed=1) -> list[RunPoint]:
    """IsoFLOP runs generated by ``law`` plus multiplicative noise."""
    rng = np.random.default_rng(seed)
    points = []
    for c in budgets:
        for f in np.geomspace(spread**-0.5, spread**0.5, sizes):
            n = law.allocate(c).params * f
            d = c / (6 * n)
            points.append(RunPoint(f"{c:g}-{f:.2f}", n, d, c, law.loss(n, d) * math.exp(rng.normal(0, noise))))
    return points


def test_fit_recovers_known_parameters_from_synthetic_runs():
    law = PUBLISHED["epoch"]
    report = fit_runs(synthetic_runs(law, [1e18, 1e19, 1e20, 1e21]), "6nd", bootstrap=10, starts=4)
    a3 = report.approach3
    assert a3.alpha == pytest.approx(law.alpha, abs=0.03) and a3.beta == pytest.approx(law.beta, abs=0.03)
    assert a3.E == pytest.approx(law.E, abs=0.1)
    assert a3.beta / (a3.alpha + a3.beta) == pytest.approx(law.a, abs=0.02)
    assert report.approach2.a == pytest.approx(law.a, abs=0.04)
    lo, hi = a3.ci["a"]
    assert lo < a3.beta / (a3.alpha + a3.beta) < hi
    # Planning with the fitted law lands within 15% of the true law's N_opt two decades further out.
    assert a3.mapping().allocate(1e23).params == pytest.approx(law.allocate(1e23).params, rel=0.15)


def write_csv(path: Path, points: list[RunPoint]) -> Path:
    path.write_text("N,D,loss,C\n" + "".join(f"{p.params},{p.tokens},{p.loss},{p.flops}\n" for p in points))
    return path


def test_cli_fit_writes_mapping_png_and_plan_uses_it(capsys, tmp_path):
    csv = write_csv(tmp_path / "runs.csv", synthetic_runs(PUBLISHED["chinchilla-3"], [1e17, 1e18, 1e19]))
    rc, out, err = run_cli(capsys, "fit", str(csv), "--out", str(tmp_path / "fit"), "--bootstrap", "5", "--starts", "4")
    assert rc == 0, err
    assert (tmp_path / "fit" / "isoflop.png").stat().st_size > 10_000
    assert {"approach2", "approach3"} <= set(json.loads((tmp_path / "fit" / "fit.json").read_text()))
    rc, out, err = run_cli(capsys, "--flops", "1e20", "--mapping", str(tmp_path / "fit" / "mapping.json"), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["mapping"]["name"] == "fit-approach3" and data["predicted_loss"] is not None


@pytest.mark.parametrize("budgets, sizes, fragment", [
    ([1e18], 3, "at least 6 finished runs"),
    ([1e18], 8, "at one budget"),
])
def test_bad_fit_input_is_one_line(capsys, tmp_path, budgets, sizes, fragment):
    csv = write_csv(tmp_path / "runs.csv", synthetic_runs(PUBLISHED["epoch"], budgets, sizes=sizes))
    rc, out, err = run_cli(capsys, "fit", str(csv), "--out", str(tmp_path / "fit"))
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err


# ------------------------------------------------------------------ sweeps


def test_sweep_writes_isoflop_configs_that_load(tmp_path):
    settings = PRESETS["cpu-demo"]
    runs = plan_sweep(settings, PUBLISHED["chinchilla-2"], str(tmp_path / "runs"))
    write_sweep(runs, tmp_path, settings, PUBLISHED["chinchilla-2"])
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert len(manifest["runs"]) == len(runs) >= 9
    for budget in settings.budgets:
        at_budget = [r for r in manifest["runs"] if r["budget"] == budget]
        assert len({r["params_applied"] for r in at_budget}) >= 3  # a curve, not a point
        for r in at_budget:
            assert r["flops"] == pytest.approx(budget, rel=0.05)  # every run spends (about) the budget
            cfg = load_config(r["config"])
            assert cfg.train.max_steps == r["steps"] and cfg.train.precision == "fp32" and cfg.data.corpus == "stdlib"


def test_an_emitted_sweep_config_trains_and_reads_back_as_a_fit_point(tmp_path, data_dir):
    settings = PRESETS["cpu-demo"]
    run = plan_sweep(settings, PUBLISHED["chinchilla-2"], str(tmp_path / "runs"))[0]
    write_sweep([run], tmp_path, settings, PUBLISHED["chinchilla-2"])
    config = tmp_path / "configs" / f"{run.name}.yaml"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(config), "train.max_steps=2",
         "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_batches=2",  # the test corpus is small
         "data.corpus=prepared", f"data.path={data_dir}"],
        capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = read_run(Path(run.config["train"]["out_dir"]))
    c = count(run.plan.shape)
    assert point.params == c.applied and point.flops == pytest.approx(c.flops_per_token * point.tokens)
    assert point.tokens == 2 * 8 * run.plan.shape.seq_len and point.loss_source == "val"


def test_offloaded_plan_prices_the_host_adam_step_into_the_wall_time():
    """The GPU waits for the host's Adam step over its 1/n partition: steps x unique/n / rate on top of the GPUs' time."""
    gpu, year = lookup_gpu("A10G"), 365 * 24
    unpriced = make_plan(make_budget(gpu=gpu, n_gpus=2, hours=year), PUBLISHED["epoch"])
    assert unpriced.recipe.offload_optimizer == "cpu" and unpriced.host_step_seconds is None
    assert unpriced.wall_seconds == unpriced.device_seconds == pytest.approx(year * 3600, rel=0.01)
    assert "unpriced" in render_plan(unpriced) and "--host-adam-rate" in render_plan(unpriced)
    priced = make_plan(make_budget(gpu=gpu, n_gpus=2, hours=year, host_adam_rate=2e8), PUBLISHED["epoch"])
    per_step = priced.counts.unique / 2 / 2e8
    assert priced.host_step_seconds == pytest.approx(per_step)
    assert priced.wall_seconds == pytest.approx(priced.device_seconds + per_step * priced.recipe.steps)
    assert priced.wall_seconds > priced.device_seconds and "of host Adam steps" in render_plan(priced)
    assert plan_to_dict(priced)["host_step_seconds"] == pytest.approx(per_step)
    on_device = make_plan(make_budget(gpu=gpu, n_gpus=2, hours=30 * 24, host_adam_rate=2e8), PUBLISHED["epoch"])
    assert on_device.recipe.offload_optimizer == "none" and on_device.wall_seconds == on_device.device_seconds
    with pytest.raises(MegascaleError, match="bench/cpu_adam.py"):
        make_budget(gpu=gpu, n_gpus=1, hours=1, host_adam_rate=0)
