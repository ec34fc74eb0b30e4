"""Compute planner: budget → parameters and tokens → a runnable config; fits from your own runs.

    python launch/plan.py --gpus 8 --gpu H100 --days 7 [--mfu 0.4] [--emit-config run.yaml]
    python launch/plan.py --gpus 1024 --gpu H100 --days 30 --emit-config big.yaml   # picks tp/pp; prints the sbatch line
    python launch/plan.py --flops 1e21 --mapping chinchilla-2 --json
    python launch/plan.py --flops 1e21 --mapping fit/mapping.json          # your own fitted mapping
    python launch/plan.py sweep --budgets 1e18,3e18,1e19 --out sweeps/s1   # IsoFLOP sweep configs
    python launch/plan.py sweep --preset cpu-demo --out runs/sweep-demo --run   # train it on CPU and fit
    python launch/plan.py fit runs/sweep-demo/runs --out runs/sweep-demo/fit
    python launch/plan.py mappings                                          # the published mappings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

SUBCOMMANDS = ("plan", "fit", "sweep", "mappings")


# ------------------------------------------------------------------ arguments


def _shape_args(p: argparse.ArgumentParser, seq_len: int | None = 2048) -> None:
    g = p.add_argument_group("model shape")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the --data/--blend tokenizer's, rounded up to 64; else 32000)")
    g.add_argument("--seq-len", type=int, default=seq_len, help="training sequence length (default 2048; cpu-demo 64)")
    g.add_argument("--sharing", default="none", help="tied blocks: none | all | cycle:k | sequence:k (compute follows applied, memory unique parameters)")
    g.add_argument("--tie-embeddings", action="store_true", help="share the input embedding with the LM head")
    g.add_argument("--data", default=None, metavar="DIR", help="prepared data directory (launch/prepare_data.py); default: the embedded stdlib corpus")
    g.add_argument("--blend", default=None, metavar="SPEC",
                   help="prepared corpora mixed by weight instead of --data, as data.blend: \"0.7 data/web, 0.3 data/code\"")
    g.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32", "bf16-autocast"),
                   help="training precision (default bf16; fp32 for the CPU demo; bf16-autocast: fp32 state, bf16 compute)")


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b = p.add_argument_group("budget (FLOPs, or GPUs × time × peak × MFU)")
    b.add_argument("--flops", type=float, help="compute budget in FLOPs, e.g. 1e21")
    b.add_argument("--gpus", type=int, help="number of GPUs")
    b.add_argument("--gpu", help="GPU model: A100, A100-40GB, H100, H100-PCIE, H200, B200, L40S, A10G, MI300X, V100")
    b.add_argument("--hours", type=float, help="wall-clock hours")
    b.add_argument("--days", type=float, help="wall-clock days")
    b.add_argument("--mfu", type=float, default=0.4, help="expected model FLOPs utilisation in (0, 1] (default %(default)s)")
    b.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU, overriding the table (or for an unlisted GPU)")
    b.add_argument("--host-adam-rate", type=float, metavar="PARAMS_PER_S",
                   help="parameters per second one GPU's process steps on the host (python bench/cpu_adam.py on a "
                        "training node): prices the optimizer step of a plan that offloads it into the wall time")
    c = p.add_argument_group("parallel layout (multi-GPU budgets; default: the layout with the best modelled step)")
    c.add_argument("--tp", type=int, default=0, help="tensor-parallel size to plan with (default: the planner's choice)")
    c.add_argument("--pp", type=int, default=0, help="pipeline stages to plan with (default: the planner's choice)")
    c.add_argument("--cp", type=int, default=0, help="context-parallel size (ranks sharing each sequence) to plan with (default: the planner's choice)")
    c.add_argument("--gpus-per-node", type=int, default=0, help="GPUs in a node (default: the GPU's reference system, 8)")
    c.add_argument("--link-gbs", type=float, default=0.0, help="GB/s one way per GPU inside a node (default: the GPU table's: NVLink, PCIe)")
    c.add_argument("--net-gbs", type=float, default=0.0,
                   help="GB/s one way per GPU between nodes (default: the GPU's reference system, e.g. H100 50 = 400 Gb/s a GPU)")

    m = p.add_argument_group("allocation")
    m.add_argument("--mapping", default="epoch", help="chinchilla-1 | chinchilla-2 | chinchilla-3 | chinchilla-3-tex | epoch | kaplan | deepseek, or a mapping.json from `fit` (default %(default)s)")
    m.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a mapping parameter, e.g. --set alpha=0.35 (repeatable)")
    m.add_argument("--flops-model", default="exact", choices=("exact", "6nd"), help="FLOPs per token: the trainer's exact count with attention, or 6N (default %(default)s)")
    m.add_argument("--kv-heads", type=int, default=0, help="KV heads (0: MHA below 3B parameters, 8 above)")
    _shape_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--emit-config", metavar="PATH", help="write the run config (YAML) that trains this plan")
    o.add_argument("--plot-layouts", metavar="PNG", help="draw the chosen layout's modelled step beside the runners-up (multi-GPU plans)")
    o.add_argument("--out-dir", default="runs/plan", help="train.out_dir of the emitted config (default %(default)s)")
    return p


def fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/plan.py fit", description="Fit Chinchilla approaches 2 and 3 to finished runs.")
    p.add_argument("inputs", nargs="+", metavar="RUN_DIR|CSV", help="run directories (searched for metrics.jsonl) or CSV files with N,D,loss[,C]")
    p.add_argument("--out", default="fit", help="output directory: mapping.json, fit.json, isoflop.png (default %(default)s)")
    p.add_argument("--flops-model", default="exact", choices=("exact", "6nd"), help="C = flops_per_token × D (exact) or 6ND")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the 95%% intervals (default %(default)s)")
    p.add_argument("--starts", type=int, default=16, help="L-BFGS starts from the best grid points; 0 = all 4,500 (default %(default)s)")
    p.add_argument("--use", default="auto", choices=("auto", "approach2", "approach3"), help="which fit mapping.json holds (auto: approach 3 when its rms error in ln L is < 3%%, else approach 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the fit report as JSON")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/plan.py sweep", description="Write (and optionally train and fit) an IsoFLOP sweep.")
    p.add_argument("--preset", choices=("cpu-demo",), help="cpu-demo: 3 budgets × 5 sizes that train on 2 CPU cores in < 30 min")
    p.add_argument("--budgets", help="comma-separated FLOPs budgets, e.g. 1e18,3e18,1e19")
    p.add_argument("--sizes", type=int, help="model sizes per budget (default 5)")
    p.add_argument("--spread", type=float, help="largest / smallest size at a budget (default 8)")
    p.add_argument("--prior", default="chinchilla-2", help="mapping whose N_opt(C) centres the sizes (default %(default)s)")
    p.add_argument("--center", type=float, help="centre the sizes on this multiple of the prior's N_opt (default 1; cpu-demo 2)")
    p.add_argument("--out", required=True, help="sweep directory: configs/, sweep.json, run_sweep.sh (and runs/, fit/ with --run)")
    p.add_argument("--runs-dir", help="where the runs write (train.out_dir parent; default OUT/runs)")
    p.add_argument("--micro-batch", type=int, help="sequences per rank per forward/backward")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: DeepSeek's B_opt(C))")
    p.add_argument("--run", action="store_true", help="train every config here (python launch/pretrain.py), then fit")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once with --run (threads split between them)")
    _shape_args(p, seq_len=None)
    return p


# ------------------------------------------------------------------ plan


def main_plan(argv: list[str]) -> int:
    args = plan_parser().parse_args(argv)
    from megascale.errors import MegascaleError
    from megascale.planner.mappings import get_mapping, parse_overrides
    from megascale.planner.plan import make_plan, plan_to_dict, render_plan, start_command, write_config

    budget = _budget(args)
    mapping = get_mapping(args.mapping, parse_overrides(args.set))
    plan = make_plan(budget, mapping, vocab_size=_vocab(args), seq_len=args.seq_len, sharing=args.sharing,
                     tie_embeddings=args.tie_embeddings, kv_heads=args.kv_heads, flops_model=args.flops_model,
                     precision=args.precision or "bf16", data_path=args.data, data_blend=args.blend, out_dir=args.out_dir,
                     tp=args.tp, pp=args.pp, cp=args.cp)
    written = write_config(plan, args.emit_config) if args.emit_config else None
    if args.plot_layouts:
        if plan.step is None:
            raise MegascaleError("--plot-layouts needs a GPU budget whose memory and links are known: --gpus N --gpu NAME")
        from megascale.planner.plot import plot_layouts

        plot_layouts(plan, args.plot_layouts)
    if args.json:
        print(json.dumps(plan_to_dict(plan) | {"emitted_config": str(written) if written else None,
                                               "start_command": start_command(budget, written) if written else None}, indent=2))
        return 0
    print(render_plan(plan))
    if written:
        print(f"\nconfig written: {written}\nstart the run:  {start_command(budget, written)}")
    return 0


def _vocab(args) -> int:
    """--vocab, else the prepared data's tokenizer size rounded up to a multiple of 64, else 32000."""
    from megascale.errors import MegascaleError

    if args.data and args.blend:
        raise MegascaleError("--data and --blend both name the training data; pass one (a blend of one part is --data)")
    if args.vocab is not None:
        if args.vocab <= 0:
            raise MegascaleError(f"--vocab {args.vocab} must be positive")
        return args.vocab
    if args.data or args.blend:
        from megascale.data import load_manifest
        from megascale.data.blend import parse_blend

        first = Path(args.data) if args.data else parse_blend(args.blend)[0].path  # a blend's parts share one tokenizer
        return 64 * -(-int(load_manifest(first)["vocab_size"]) // 64)
    return 32000


def _budget(args):
    from megascale.errors import MegascaleError
    from megascale.hardware import GPU, lookup_gpu
    from megascale.planner.plan import make_budget

    if args.hours is not None and args.days is not None:
        raise MegascaleError("give the time as --hours or --days, not both")
    hours = args.days * 24 if args.days is not None else args.hours
    gpu = lookup_gpu(args.gpu) if args.gpu else None
    if args.peak_tflops is not None:
        if not args.peak_tflops > 0:
            raise MegascaleError(f"--peak-tflops {args.peak_tflops:g} must be positive (dense bf16 TFLOP/s per GPU)")
        gpu = replace(gpu, peak_tflops=args.peak_tflops) if gpu else GPU("custom", args.peak_tflops, 0.0)
    if gpu is None and (args.gpus or hours is not None):
        # With --flops, --gpus only asks for a layout, which needs the GPU's memory and speed.
        need = f"laying the run out over --gpus {args.gpus}" if args.flops is not None and hours is None else "a GPU-time budget"
        raise MegascaleError(f"{need} needs the GPU model: --gpu H100 (or --peak-tflops for an unlisted one)")
    return make_budget(args.flops, gpu, args.gpus, hours, args.mfu, args.host_adam_rate, args.gpus_per_node, args.link_gbs,
                       args.net_gbs)


# ------------------------------------------------------------------ fit


def main_fit(argv: list[str]) -> int:
    args = fit_parser().parse_args(argv)
    from megascale.errors import MegascaleError
    from megascale.planner.fit import MIN_RUNS, collect_runs, fit_runs, report_to_dict
    from megascale.planner.mappings import save_mapping
    from megascale.planner.plot import plot_fit

    if args.bootstrap < 0:
        raise MegascaleError(f"--bootstrap {args.bootstrap} must be >= 0")
    points, notes = collect_runs(args.inputs, args.flops_model)
    if notes and len(points) < MIN_RUNS:
        raise MegascaleError(f"a fit needs at least {MIN_RUNS} finished runs, found {len(points)} — {notes[0]}"
                             + (f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""))
    report = fit_runs(points, args.flops_model, args.bootstrap, args.seed, args.starts)
    report.notes = notes + report.notes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = report.preferred(args.use)
    files = {"mapping": save_mapping(chosen, out / "mapping.json")}
    for key, mapping in report.mappings().items():
        files[key] = save_mapping(mapping, out / f"mapping_{key}.json")
    data = report_to_dict(report)
    (out / "fit.json").write_text(json.dumps(data, indent=2) + "\n")
    files["report"] = out / "fit.json"
    files["plot"] = plot_fit(report, out / "isoflop.png")
    if args.json:
        print(json.dumps(data | {"files": {k: str(v) for k, v in files.items()}, "mapping": chosen.name}, indent=2))
    else:
        print(render_fit(report, chosen, files))
    return 0


def render_fit(report, chosen, files) -> str:
    from megascale.planner.fit import budget_of
    from megascale.planner.mappings import sci
    from megascale.planner.plan import human

    lines = [f"fit of {len(report.points)} runs at {len(report.groups)} budgets "
             f"(N = applied parameters incl. embeddings; C = {report.flops_model}; loss = final validation loss)"]
    for g in report.groups:
        sizes = ", ".join(f"{human(p.params)}:{p.loss:.3f}" for p in sorted(g, key=lambda p: p.params))
        lines.append(f"  C = {sci(budget_of(g))}  N:loss  {sizes}")
    if report.approach2:
        a2 = report.approach2
        ci = a2.ci.get("a")
        lines.append(f"approach 2  N_opt ∝ C^{a2.a:.3f}" + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                     + f", D_opt ∝ C^{a2.b:.3f}; N_opt({sci(a2.reference_flops)}) = {human(a2.params_opt(a2.reference_flops))}")
        for iso in a2.isoflops:
            if iso.params_opt:
                lines.append(f"  C = {sci(iso.flops)}: N_opt {human(iso.params_opt)}, D_opt {human(iso.tokens_opt)}, "
                             f"loss {iso.loss_opt:.3f}{'' if iso.inside else ' (extrapolated)'}")
    if report.approach3:
        a3 = report.approach3

        def ci(k):
            v = a3.ci.get(k)
            return f" [{v[0]:.3g}, {v[1]:.3g}]" if v else ""

        lines.append(f"approach 3  L = E + A/N^alpha + B/D^beta: E {a3.E:.3f}{ci('E')}, A {a3.A:.4g}{ci('A')}, "
                     f"B {a3.B:.4g}{ci('B')}, alpha {a3.alpha:.3f}{ci('alpha')}, beta {a3.beta:.3f}{ci('beta')}")
        lines.append(f"  a = beta/(alpha+beta) = {a3.beta / (a3.alpha + a3.beta):.3f}{ci('a')}; "
                     f"rms error of ln L {a3.rms_log_residual:.4f}; {a3.bootstrap_samples} bootstrap fits")
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"mapping for `plan --mapping`: {files['mapping']} ({chosen.name})")
    lines.append(f"report: {files['report']}   plot: {files['plot']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ sweep


def main_sweep(argv: list[str]) -> int:
    args = sweep_parser().parse_args(argv)
    import dataclasses

    from megascale.errors import MegascaleError
    from megascale.planner.mappings import get_mapping
    from megascale.planner.sweep import PRESETS, SweepSettings, plan_sweep, write_sweep

    if args.jobs < 1:
        raise MegascaleError(f"--jobs {args.jobs} must be >= 1 (runs trained at once with --run)")
    base = PRESETS[args.preset] if args.preset else None
    if base is None and not args.budgets:
        raise MegascaleError("give --budgets C1,C2,... (2 or more) or --preset cpu-demo")
    changes = {k: v for k, v in {
        "budgets": _budget_list(args.budgets) if args.budgets else None, "sizes": args.sizes, "spread": args.spread,
        "center": args.center,
        "vocab_size": _vocab(args) if (args.vocab or args.data or args.blend) else None, "seq_len": args.seq_len,
        "precision": args.precision, "data_path": args.data, "data_blend": args.blend,
        "micro_batch": args.micro_batch, "global_batch": args.global_batch, "tie_embeddings": args.tie_embeddings or None,
        "sharing": args.sharing if args.sharing != "none" else None,
    }.items() if v is not None}
    settings = dataclasses.replace(base, **changes) if base else SweepSettings(**changes)
    out = Path(args.out)
    runs_dir = args.runs_dir or str(out / "runs")
    prior = get_mapping(args.prior)
    runs = plan_sweep(settings, prior, runs_dir)
    manifest = write_sweep(runs, out, settings, prior)
    print(render_sweep(runs, manifest))
    if not args.run:
        print(f"\ntrain them: sh {out / 'run_sweep.sh'}   (or each line on its own GPU/node), then fit:\n"
              f"python launch/plan.py fit {runs_dir} --out {out / 'fit'}")
        return 0
    started = time.perf_counter()
    train_all([out / "configs" / f"{r.name}.yaml" for r in runs], args.jobs, out / "logs")
    trained = time.perf_counter() - started
    print(f"\ntrained {len(runs)} runs in {trained / 60:.1f} min; fitting ...", flush=True)
    code = main_fit([runs_dir, "--out", str(out / "fit")])
    print(f"sweep wall time (training + fit): {(time.perf_counter() - started) / 60:.1f} min")
    return code


def _budget_list(text: str) -> tuple[float, ...]:
    from megascale.errors import MegascaleError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MegascaleError(f"--budgets '{text}' must be comma-separated numbers, e.g. 1e18,3e18,1e19") from None


def render_sweep(runs, manifest: Path) -> str:
    from megascale.planner.plan import human

    lines = [f"IsoFLOP sweep: {len(runs)} runs at {len({r.budget for r in runs})} budgets (manifest {manifest})",
             f"  {'run':<22} {'params':>9} {'tokens':>9} {'D/N':>7} {'steps':>7} {'batch':>6} {'lr':>8}"]
    for r in runs:
        c, rec = r.plan.counts, r.plan.recipe
        lines.append(f"  {r.name:<22} {human(c.applied):>9} {human(rec.tokens):>9} {rec.tokens / c.applied:>7.1f} "
                     f"{rec.steps:>7,} {rec.global_batch:>6} {rec.lr:>8.2g}")
    return "\n".join(lines)


def train_all(configs: list[Path], jobs: int, log_dir: Path) -> None:
    """Train each config with `python launch/pretrain.py` (``jobs`` at a time); stops at the first failure."""
    from megascale.errors import MegascaleError

    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}

    def one(cfg: Path) -> tuple[Path, int, float]:
        t0 = time.perf_counter()
        with (log_dir / f"{cfg.stem}.log").open("w") as log:
            rc = subprocess.call([sys.executable, str(common.ROOT / "launch" / "pretrain.py"), "--config", str(cfg)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT)
        return cfg, rc, time.perf_counter() - t0

    with ThreadPoolExecutor(jobs) as pool:
        for cfg, rc, seconds in pool.map(one, configs):
            print(f"  {cfg.stem:<22} {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s", flush=True)
            if rc != 0:
                raise MegascaleError(f"training {cfg} failed (exit {rc}); see {log_dir / (cfg.stem + '.log')}")


# ------------------------------------------------------------------ mappings


def main_mappings(argv: list[str]) -> int:
    from megascale.planner.mappings import DEFAULT_MAPPING, PUBLISHED, TARGET_WORDS

    argparse.ArgumentParser(prog="launch/plan.py mappings", description="List the published allocation mappings.").parse_args(argv)
    for name, m in PUBLISHED.items():
        default = " (default)" if name == DEFAULT_MAPPING else ""
        print(f"{name}{default}: {m.title}\n  {m.formula()}\n  N counts {TARGET_WORDS[m.param_count]}\n  source: {m.source}\n"
              f"  parameters: {', '.join(f'{k}={v:g}' for k, v in m.values().items())}")
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "plan"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    return {"plan": main_plan, "fit": main_fit, "sweep": main_sweep, "mappings": main_mappings}[command](rest)


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
