"""Turn a bench/gpu_session.py output folder into the Markdown for BENCHMARKS.md, targets checked.

    python bench/gpu_report.py runs/gpu/out              # Markdown on stdout
    python bench/gpu_report.py runs/gpu/out --md report.md

One section per job that ran: kernel tests (passed / failed / skipped, the
failures by name), attention (Triton against the best SDPA backend per shape),
the tied-gradient reduction (against the PyTorch composition and copy
bandwidth), fused ops, fused loss, and training throughput (MFU, tokens/s,
megascale/plain, memory), start-up, and an untie during a real run (its pause). Each target of issues #3 and #9 gets a met / not met
line computed from the figures; a job that did not run says so. Nothing here is
estimated: a figure is in the report only if a JSON holds it.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from pathlib import Path

import gpu_session  # beside this script: what its logs hold (imports no torch)

ATTENTION_FILES = ("attention_gluon.json", "attention_gluon_bwd.json", "attention_hd128_causal.json", "attention_rest.json",
                   "attention_hd64.json")
TRAIN_FILES = ("train_accum_tied.json", "train_options_1.3b.json", "train_accum.json", "train_small_auto.json", "train_350m.json",
               "train_1.3b_now.json", "train_125m_now.json", "train_ckpt_now.json", "train_small.json", "train_1.3b.json", "train_small_ckpt.json", "train_1.3b_ckpt.json",
               "train_options.json", "train_recompute.json")


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# --------------------------------------------------------------------------- sections


def session_section(folder: Path) -> list[str]:
    session = load(folder, "session.json")
    if session is None:
        return [f"No session.json in {folder}: not a bench/gpu_session.py output folder."]
    env = session["environment"]
    lines = [f"Device: {env.get('nvidia_smi') or 'no nvidia-smi (CPU)'}; date {env['date']}; Python {env['python']}, "
             f"torch {env['torch']}, triton {env['triton']}, DeepSpeed {env['deepspeed']}"
             + (" — **smoke run: the numbers mean nothing**" if session["smoke"] else ""), ""]
    rows = [[j["name"], "cut off / not started" if j["rc"] is None else j["rc"], j["seconds"], j["log"]] for j in session["jobs"]]
    return lines + table(["job", "exit", "seconds", "log"], rows)


def kernel_tests_section(folder: Path) -> list[str]:
    return (_pytest_log(folder / "gluon_tests.log", "The Gluon attention forward at real shapes (flash_attention(gluon=True))")
            + _pytest_log(folder / "gluon_bwd_tests.log",
                          "The Gluon attention backward at real shapes (flash_attention(gluon=True, deterministic=False))")
            + _pytest_log(folder / "new_tests.log", "New tests at real shapes (cuDNN attention as auto's choice, the reduction's layouts)")
            + _pytest_log(folder / "atomic_tests.log",
                          "Attention's one-kernel backward (dQ by atomics) at real shapes, bf16, first listed tile")
            + _pytest_log(folder / "cast_tests.log", "Kernels with fp32-cast float arguments at real shapes, bf16")
            + _pytest_log(folder / "tma_tests.log", "Attention through TMA at real shapes, bf16, first listed tile")
            + _pytest_log(folder / "kernel_tests.log", "Kernel tests at real shapes, first listed tile")
            + _pytest_log(folder / "kernel_tests_autotuned.log", "Kernel tests, autotuned tiles (bf16, head dim 128)"))


def _pytest_log(log: Path, title: str) -> list[str]:
    """Counts and failures from a ``pytest -v`` log (which survives a run cut off by its cap): each test's last
    outcome, as gpu_session.py may run the tests after one that left CUDA unusable again."""
    if not log.is_file():
        return [f"{title}: not run."]
    text = log.read_text()
    outcomes = gpu_session.test_outcomes(text)
    counts = {k: sum(o == k for o in outcomes.values()) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    failed = [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    hung, sticky = gpu_session.run_notes(text)
    summary = re.findall(r"^=+ (.* in [\d.]+s.*) =+$", text, re.M)
    if not any(counts.values()) and (collected := re.search(r"(\d+(?:/\d+)?) tests? collected", text)):
        return [f"{title}: {collected.group(1)} collected, none run (a smoke run only collects them)."]
    lines = [f"{title}: {counts['PASSED']} passed, {counts['FAILED']} failed, {counts['SKIPPED']} skipped, "
             f"{counts['ERROR']} errors" + (f", {len(hung)} hung" if hung else "")
             + (f" ({summary[-1]})" if summary else " (cut off)")]
    return (lines + [f"* failed: `{name}`" for name in failed]
            + [f"* hung: `{name}` (no output for {seconds} s: killed, the rest run without it)" for seconds, name in hung]
            + [f"* `{name}` left CUDA unusable ({message}); the tests after it ran again" for name, message in sticky])


# bench/attention.py's megascale providers and their columns
MEGASCALE_ATTENTION = {"triton": "triton", "triton-tma": "triton TMA", "triton-ws": "triton WS", "triton-gluon": "Gluon",
                       "triton-tma-atomic": "TMA, atomic dQ", "triton-ws-atomic": "WS, atomic dQ",
                       "triton-gluon-atomic": "Gluon fwd and bwd"}


def attention_section(folder: Path) -> list[str]:
    every = [r for name in ATTENTION_FILES if (d := load(folder, name)) for r in d["results"]]
    rows = [r for r in every if r.get("tflops")]
    if not rows:
        return ["Attention: not run."] if not every else ["Attention: no provider ran.", *unavailable_lines(every)]
    shapes = sorted({(r["D"], r["causal"], r["T"], r["mode"]) for r in rows})
    out, checks = [], []
    for D, causal, T, mode in shapes:
        here = [r for r in rows if (r["D"], r["causal"], r["T"], r["mode"]) == (D, causal, T, mode)]
        ours = [max((r["tflops"] for r in here if r["provider"] == name and r["tflops"]), default=None)
                for name in MEGASCALE_ATTENTION]
        # the targets are met by whichever megascale ships
        best = max((t for t in ours if t), default=None)
        sdpa = max(((r["tflops"], r["provider"]) for r in here if r["provider"].startswith("sdpa")), default=(None, None))
        ratio = best / sdpa[0] if best and sdpa[0] else None
        out.append([D, "causal" if causal else "full", T, mode, *ours, sdpa[0], sdpa[1], ratio])
        if D == 128 and causal and 4096 <= T <= 16384:
            checks.append((mode, T, best, ratio))
    lines = ["Attention, bf16 (TFLOP/s):", ""] + table(
        ["head dim", "mask", "T", "pass", *MEGASCALE_ATTENTION.values(), "best SDPA", "backend", "best triton/SDPA"],
        out) + [""]
    lines += gluon_lines(rows) + overhead_lines(rows) + unavailable_lines(every)
    fwd = [c for c in checks if c[0] == "fwd"]
    both = [c for c in checks if c[0] == "fwd+bwd"]
    lines.append(f"* target forward ≥ 550 TFLOP/s (hd 128, causal, 4k–16k): "
                 f"{verdict(all(t and t >= 550 for _, _, t, _ in fwd) if fwd else None)}")
    lines.append(f"* target forward+backward faster than the best SDPA (same shapes): "
                 f"{verdict(all(r and r > 1 for *_, r in both) if both else None)}")
    return lines


def launch_order_section(folder: Path) -> list[str]:
    """The attention launch order's A/B: the Gluon kernels with 8 heads together, heaviest blocks first (job
    ``attention_gluon_bwd``) against head by head (``attention_gluon_order1``), TFLOP/s and each against cuDNN's in its run
    (the two jobs are separate runs: cuDNN's rate in each says how far the machine's own speed moved between them)."""
    now, before = load(folder, "attention_gluon_bwd.json"), load(folder, "attention_gluon_order1.json")
    if not now or not before:
        return ["Attention launch order (8 heads together against head by head): not run."]

    def rates(data: dict) -> dict:
        return {(r["D"], r["causal"], r["T"], r["mode"], r["provider"]): r["tflops"] for r in data["results"]
                if r.get("tflops")}

    a, b = rates(now), rates(before)
    out = []
    for key in sorted(k for k in b if not k[4].startswith("sdpa") and k in a):
        D, causal, T, mode, provider = key
        cudnn_a, cudnn_b = a.get((*key[:4], "sdpa-cudnn")), b.get((*key[:4], "sdpa-cudnn"))
        out.append([D, "causal" if causal else "full", T, mode, provider, a[key], b[key], a[key] / b[key],
                    a[key] / cudnn_a if cudnn_a else None, b[key] / cudnn_b if cudnn_b else None])
    return ["Attention launch order (TFLOP/s): 8 heads together, heaviest blocks first, against head by head "
            "(MEGASCALE_ATTN_ORDER_HEADS=1), each in its own run beside cuDNN:", ""] + table(
        ["head dim", "mask", "T", "pass", "provider", "8 together", "head by head", "ratio", "8 together / cuDNN",
         "head by head / cuDNN"], out)


def unavailable_lines(rows: list[dict]) -> list[str]:
    """What failed or was refused (bench/attention.py's rows with an error), one line per provider and error."""
    failed: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("error"):
            failed.setdefault((r["provider"], r["error"]), []).append(r)
    lines = []
    for (provider, error), where in failed.items():
        modes = ", ".join(dict.fromkeys(r["mode"] for r in where))
        shapes = ", ".join(dict.fromkeys(f"hd {r['D']} {'causal' if r['causal'] else 'full'} T={r['T']}" for r in where))
        lines.append(f"* unavailable: {provider} ({modes}) at {shapes}: {error}")
    return lines + ([""] if lines else [])


def gluon_lines(rows: list[dict]) -> list[str]:
    """The Gluon kernels' tuned tiles and their forward's largest error against SDPA, per shape (bench/attention.py)."""
    gluon = [r for r in rows if r["provider"].startswith("triton-gluon")]
    if not gluon:
        return []
    out = []
    for D, causal, T in sorted({(r["D"], r["causal"], r["T"]) for r in gluon}):
        here = [r for r in gluon if (r["D"], r["causal"], r["T"]) == (D, causal, T)]
        tiles = {k: v for r in here for k, v in (r.get("tiles") or {}).items()}
        err = max((r["max_abs_err"] for r in here if r.get("max_abs_err") is not None), default=None)
        out.append([D, "causal" if causal else "full", T, tiles.get("gluon_fwd", "–"), tiles.get("gluon_bwd", "–"), err])
    lines = ["Gluon kernels: the tiles their tuner chose, and the forward's max |error| against SDPA:", ""] + table(
        ["head dim", "mask", "T", "forward tile", "backward tile", "max abs error"], out) + [""]
    return lines + candidate_lines(gluon) + phase_lines(gluon)


def overhead_lines(rows: list[dict]) -> list[str]:
    """Each call against its host time and its CUDA-graph replay (bench/attention.py --overhead): ``call - graph`` is
    what the call costs beyond its kernels; a host time above the graph's means the device waited for the host."""
    out = []
    for r in sorted((r for r in rows if "host_ms" in r), key=lambda r: (r["D"], not r["causal"], r["T"], r["provider"],
                                                                        r["mode"])):
        graph, host = r.get("graph_ms"), r.get("host_ms")
        out.append([r["D"], "causal" if r["causal"] else "full", r["T"], r["provider"], r["mode"], r["ms"] * 1e3,
                    graph * 1e3 if graph else None, host * 1e3 if host else None,
                    (r["ms"] - graph) * 1e3 if graph else None, r.get("overhead_error") or ""])
    if not out:
        return []
    return ["Each call timed as the table's (`ms`, L2 flushed), replayed from a CUDA graph (no host work) and its "
            "host time alone (µs; `--overhead`):", ""] + table(
        ["head dim", "mask", "T", "provider", "pass", "call µs", "graph µs", "host µs", "call − graph µs", "error"],
        out) + [""]


def phase_lines(gluon: list[dict]) -> list[str]:
    """The Gluon kernels alone against the provider's call, timed alike (bench/attention.py's ``gluon_phases``), and
    the backward's other passes: where a call's time goes beyond its kernel."""
    out = []
    fullest = _fullest_phases(gluon)
    for (D, causal, T), phases in sorted(fullest.items()):
        here = [r for r in gluon if (r["D"], r["causal"], r["T"]) == (D, causal, T)]
        if "error" in phases:
            out.append([D, "causal" if causal else "full", T, f"failed: {phases['error']}", *["–"] * 5])
            continue
        # the call beside it: the Gluon backward's provider, else (the forward, the same kernel) triton-gluon's
        call = {r["mode"]: r for name in ("triton-gluon", "triton-gluon-atomic")
                for r in here if r["provider"] == name and r.get("ms")}
        bwd_ms = call.get("bwd", {}).get("ms")
        passes = phases.get("bwd_passes_ms")
        out.append([D, "causal" if causal else "full", T, call.get("fwd", {}).get("tflops"),
                    phases.get("fwd_kernel_tflops"), call.get("bwd", {}).get("tflops"), phases.get("bwd_kernel_tflops"),
                    passes * 1e3 if passes else None, passes / bwd_ms if passes and bwd_ms else None])
    if not out:
        return []
    lines = ["Gluon: the provider's call (`triton-gluon-atomic`) against its kernel alone, timed alike (TFLOP/s), and "
             "the backward's other passes (Δ, zeroing dQ's fp32 buffer, its scale and rounding):", ""] + table(
        ["head dim", "mask", "T", "forward call", "forward kernel", "backward call", "backward kernel",
         "other passes µs", "of the backward call"], out) + [""]
    each = [[D, "causal" if causal else "full", T, name, ms * 1e3, phases["bwd_pass_gbps"][name]]
            for (D, causal, T), phases in sorted(fullest.items())
            for name, ms in (phases.get("bwd_pass_ms") or {}).items()]
    if each:
        lines += ["The backward's passes one by one (GB/s: the bytes each must move; against the copy bandwidth of "
                  "the reduction's table):", ""] + table(["head dim", "mask", "T", "pass", "µs", "GB/s"], each) + [""]
    return lines


def _fullest_phases(gluon: list[dict]) -> dict[tuple, dict]:
    """(head dim, causal, T) -> the fullest ``gluon_phases`` record of the shape (attention_gluon times the forward
    only; a failed timing has one key, so any other record of the shape wins over it)."""
    out: dict[tuple, dict] = {}
    for r in gluon:
        phases, key = r.get("gluon_phases"), (r["D"], r["causal"], r["T"])
        if phases and len(phases) > len(out.get(key, {})):
            out[key] = phases
    return out


def candidate_lines(gluon: list[dict]) -> list[str]:
    """Every Gluon candidate's TFLOP/s as its tuner timed it, fastest first, per shape and pass (bench/attention.py's
    ``candidates``; none where the tuner did not run)."""
    out, seen = [], set()
    for r in gluon:
        for kind, rates in (r.get("candidates") or {}).items():
            key = (r["D"], r["causal"], r["T"], kind)
            if key in seen:
                continue
            seen.add(key)
            for tile, tflops in sorted(rates.items(), key=lambda kv: -kv[1]):
                out.append([r["D"], "causal" if r["causal"] else "full", r["T"], kind.removeprefix("gluon_"), tile, tflops])
    if not out:
        return []
    return ["Gluon candidates as the tuner timed them (the kernel alone; TFLOP/s):", ""] + table(
        ["head dim", "mask", "T", "pass", "candidate", "TFLOP/s"], sorted(out, key=lambda x: (x[0], x[1], x[2], x[3]))) + [""]


def tied_grad_section(folder: Path) -> list[str]:
    data = load(folder, "tied_grad.json")
    if data is None:
        return ["Tied-gradient reduction: not run."]
    rows = [r for r in data["results"] if "triton_gbps" in r]
    out = [[r["K"], r["case"], r["size_mb"], r["triton_gbps"], r.get("fixed_gbps"), r.get("fitted_gbps"),
            r.get("columns_gbps"), r["torch_gbps"], r["copy_gbps"], r["of_copy"], r.get("fixed_of_copy"),
            r.get("fitted_of_copy"), r.get("columns_of_copy"), r.get("wide_of_copy"), r.get("prepared_of_copy"),
            r.get("last_of_copy"), r.get("kernel_of_copy"),
            r["vs_torch"], r.get("host_us"), r.get("plan_us"), r.get("run_us"), r.get("dispatch_us")] for r in rows]
    # The targets: #3's K = 2, 4, 8, 12 (K = 24 is in the table, not in the verdicts), tensors from 64 MB (small ones
    # are launch-bound: the targets are about bandwidth).
    big = [r for r in rows if r["size_mb"] >= 64 and r["K"] <= 12]
    lines = ["Tied-gradient reduction (GB/s):", ""] + table(
        ["K", "case", "MB", "triton", "fixed", "fitted", "columns", "PyTorch", "copy", "of copy", "fixed of copy",
         "fitted of copy", "columns of copy", "wide of copy", "prepared of copy", "default timed last of copy",
         "kernel alone of copy (before the one-launch sum)", "vs PyTorch",
         "host µs/call",
         "of it: checks + tables µs", "launch µs", "launch through Triton's dispatch µs"],
        out) + [""]
    lines.append(f"* target ≥ 85% of copy bandwidth (K = 2–12, tensors ≥ 64 MB): {verdict(all(r['of_copy'] >= 0.85 for r in big) if big else None)}")
    lines.append(f"* target ≥ 2× the PyTorch composition (K = 2–12, tensors ≥ 64 MB): {verdict(all(r['vs_torch'] >= 2 for r in big) if big else None)}")
    prepared = [r for r in big if "prepared_of_copy" in r]
    if prepared:  # the kernel's own bandwidth: the launch prepared once, outside the timed call
        lines.append(f"* prepared launch (the kernel without the host's per-call work), ≥ 85% of copy bandwidth "
                     f"(K = 2–12, tensors ≥ 64 MB): {verdict(all(r['prepared_of_copy'] >= 0.85 for r in prepared))}")
    last = [r for r in big if "last_of_copy" in r]
    if last:  # the default call again, after every other provider (is the first timing's deficit the order's?)
        lines.append(f"* the default timed last, ≥ 85% of copy bandwidth (K = 2–12, tensors ≥ 64 MB): "
                     f"{verdict(all(r['last_of_copy'] >= 0.85 for r in last))}")
    for layout in ("fixed", "fitted", "columns", "wide"):
        measured = [r for r in big if f"{layout}_of_copy" in r]
        if measured:
            lines.append(f"* layout `{layout}`, ≥ 85% of copy bandwidth (K = 2–12, tensors ≥ 64 MB): "
                         f"{verdict(all(r[f'{layout}_of_copy'] >= 0.85 for r in measured))}; ≥ 2× PyTorch: "
                         f"{verdict(all(r[f'{layout}_gbps'] >= 2 * r['torch_gbps'] for r in measured))}")
    profile = data.get("host_profile")
    if profile:  # where the Llama block's call at K = 2 spends its host time (cProfile: inflated, comparable)
        lines += ["", "Host profile of one call (Llama block, K = 2; µs per call under cProfile):", ""] + table(
            ["function", "own µs", "with callees µs", "calls"],
            [[r["function"], r["own_us"], r["cum_us"], r["calls_per_call"]] for r in profile])
    return lines


def fused_ops_section(folder: Path) -> list[str]:
    data = load(folder, "fused_ops.json")
    if data is None:
        return ["Fused RMSNorm / RoPE / SwiGLU: not run."]
    rows = [r for r in data["results"] if r.get("gbps")]
    keys = sorted({(r["op"], r["tokens"], r["width"], r["mode"]) for r in rows})
    out = []
    for key in keys:
        by = {r["provider"]: r["gbps"] for r in rows if (r["op"], r["tokens"], r["width"], r["mode"]) == key}
        best_other = max((v for p, v in by.items() if p != "triton"), default=None)
        out.append([*key, by.get("triton"), by.get("torch"), by.get("compile"),
                    by["triton"] / best_other if by.get("triton") and best_other else None])
    return ["Fused row-wise ops (GB/s):", ""] + table(
        ["op", "tokens", "width", "pass", "triton", "eager", "compile", "triton/best other"], out)


def fused_loss_section(folder: Path) -> list[str]:
    data = load(folder, "fused_loss.json")
    if data is None:
        return ["Fused LM head + loss: not run."]
    plain = {r["tokens"]: r["step_s"] for r in data["rows"] if r["mode"] == "plain"}
    out = []
    for r in sorted(data["rows"], key=lambda r: (r["tokens"], MODE_ORDER.get(r["mode"], 9), r.get("chunk_tokens", 0))):
        base = plain.get(r["tokens"])
        out.append([r["tokens"], r["mode"], r.get("chunk_tokens", 0) or "auto", r["peak_bytes"] / 2**20,
                    r["step_s"] * 1e3, base and base / r["step_s"]])
    return [f"Fused LM head + loss (D {data['d_model']}, V {data['vocab']}, {data['dtype']}):", ""] + table(
        ["tokens", "mode", "chunk", "peak MiB", "ms", "speed vs plain"], out)


MODE_ORDER = {"plain": 0, "fused": 1, "fused-triton": 2}


def train_section(folder: Path) -> list[str]:
    files = [d for name in TRAIN_FILES if (d := load(folder, name))]
    results = [(d["device"], r) for d in files for r in d["results"]]
    if not results:
        return ["Training throughput: not run."]
    out, best = [], {}
    plain = defaults = None
    for _, r in results:
        vs_defaults = None
        if r["trainer"] == "plain":
            plain, defaults = r, None  # each plain row opens a group: the megascale rows after it share its run
            ratio = None
        else:
            ratio = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
            if not r["variant"]:
                defaults = r
            elif defaults is not None:  # an option's before/after: against the defaults of the same run
                vs_defaults = r["tokens_per_s"] / defaults["tokens_per_s"]
            key = (r["config"], r["sharing"], r["ckpt"])
            if r["mfu"] is not None and (key not in best or r["mfu"] > best[key][0]["mfu"]):
                best[key] = (r, ratio)
        micro = f"{r['micro_batch']}×{r['accum']}" if r.get("accum", 1) > 1 else r["micro_batch"]
        out.append([r["config"], r["sharing"], "on" if r["ckpt"] else "off", r["trainer"], r["variant"] or "–",
                    micro, r["tokens_per_s"], r["tflops"], r["mfu"], r["peak_gib"], r.get("state_gib"), ratio,
                    vs_defaults])
    lines = [f"Training throughput on {files[0]['device']}, megascale and the plain loop in the same run:", ""] + table(
        ["config", "sharing", "act. ckpt", "trainer", "variant", "micro × accum", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
         "state GiB", "megascale/plain", "vs defaults"], out) + [""]
    # The targets are met by the fastest way megascale trains a config (a variant is a setting a user can choose).
    for config, target in (("1.3b", 0.50), ("350m", 0.40)):
        got = best.get((config, "none", False))
        lines.append(f"* target {config} MFU ≥ {target:.0%}: {verdict(None if got is None else got[0]['mfu'] >= target)}"
                     + (f" (best {got[0]['mfu']:.1%}, `{got[0]['variant'] or 'defaults'}`{_accum_words(got[0])})"
                        if got else ""))
    ratios = {key: ratio for key, (_, ratio) in best.items() if ratio is not None}
    low = min(ratios, key=ratios.get) if ratios else None
    lines.append(f"* target megascale ≥ 1.15× plain, each config's fastest variant: "
                 f"{verdict(ratios[low] >= 1.15 if low else None)}"
                 + (f" (lowest {ratios[low]:.3f}×: {low[0]}, sharing {low[1]}, act. ckpt {'on' if low[2] else 'off'})"
                    if low else ""))
    lines += [f"* variant failed: {f['config']}, sharing {f['sharing']}, act. ckpt {'on' if f['ckpt'] else 'off'}, "
              f"`{f['variant'] or 'defaults'}`: {f['error']}" for d in files for f in d.get("failed", [])]
    return lines + tied_checks(results)


def _accum_words(r: dict) -> str:
    accum = r.get("accum", 1)
    return f", {accum} micro-batches per optimizer step" if accum > 1 else ""


def tied_checks(results: list[tuple[str, dict]]) -> list[str]:
    """Tied (sharing all) against untied of the same config, checkpointing and variant: same MFU, less state."""
    ours = {(r["config"], r["ckpt"], r["variant"], r.get("accum", 1), r["sharing"]): r
            for _, r in results if r["trainer"] == "megascale"}
    lines = []
    for (config, ckpt, variant, accum, sharing), tied in sorted(ours.items()):
        untied = ours.get((config, ckpt, variant, accum, "none"))
        if sharing != "all" or untied is None or tied["mfu"] is None or untied["mfu"] is None:
            continue
        # Tying must cost no MFU: the same applied parameters, the same FLOPs counted. It may gain some, because
        # the optimizer step updates K times fewer parameters; that gain is named, not held against it.
        ratio = tied["mfu"] / untied["mfu"]
        faster = f"; tied {ratio - 1:.0%} faster: its optimizer step updates fewer parameters" if ratio > 1.05 else ""
        less = tied.get("state_gib") is not None and tied["state_gib"] < untied["state_gib"]
        lines.append(f"* {config}, act. ckpt {'on' if ckpt else 'off'}, `{variant or 'defaults'}`{_accum_words(tied)}: tied MFU "
                     f"{tied['mfu']:.1%} vs untied {untied['mfu']:.1%} (not 5% below it: {verdict(ratio >= 0.95)}{faster}); "
                     f"state {tied.get('state_gib', 0):.2f} vs {untied.get('state_gib', 0):.2f} GiB (lower: {verdict(less)})")
    return lines


def startup_section(folder: Path) -> list[str]:
    data = load(folder, "startup.json")
    if data is None:
        return ["Start-up (bench/startup.py): not run."]
    rows = [[r["rank"], r["model_s"], r["engine_s"], r["params_gib"], r.get("peak_device_gib"),
             r["peak_rss_before_deepspeed_gib"], r["peak_rss_gib"]] for r in data["ranks"]]
    return [f"Start-up, layout {data['layout']}, {data['params_unique']:,} parameters, {data['precision']}, "
            f"ZeRO {data['zero_stage']}:", ""] + table(
        ["rank", "build_model s", "build_engine s", "parameters GiB", "peak GPU GiB", "peak RSS before DeepSpeed GiB",
         "peak RSS GiB"], rows)


def untie_section(folder: Path) -> list[str]:
    """The untie job: a real run (launch/pretrain.py) tied until step 3, then untied with probe-scaled moments."""
    path = folder / "untie" / "metrics.jsonl"
    if not path.is_file():
        return ["Untie during training: not run."]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    unties = [r for r in records if r.get("event") == "untie"]
    losses = {r["step"]: r["loss"] for r in records if r.get("loss") is not None}
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    start = next((r for r in records if r.get("event") == "start"), {})
    if not unties:
        return [f"Untie during training: **no untie event** (steps logged: {sorted(losses)})."]
    lines = [f"Untie during training (launch/pretrain.py, {start.get('device', '?')}, "
             f"{start.get('params_applied', 0):,} applied parameters):", ""]
    rows = []
    for u in unties:
        factors = [f[:2] for f in u.get("moment_factors", {}).values()]
        first = [a for a, _ in factors]
        rows.append([u["step"], f"{u['params_unique_before']:,} → {u['params_unique_after']:,}", u.get("seconds"),
                     u.get("moments"), f"{min(first):.3f}–{max(first):.3f}" if first else "–"])
    lines += table(["step", "unique parameters", "pause s", "moments", "exp_avg factors"], rows)
    after = [v for s, v in losses.items() if s > unties[-1]["step"]]
    finite = bool(after) and all(v == v and abs(v) != float("inf") for v in after)
    lines += ["", f"Losses {', '.join(f'{s}: {v:.4f}' for s, v in sorted(losses.items()))}; validation "
              f"{', '.join(f'{s}: {v:.4f}' for s, v in vals)}. Training went on after the untie with finite losses: "
              f"{verdict(finite)}."]
    return lines


def step_profile_section(folder: Path) -> list[str]:
    data = load(folder, "step_profile.json")
    if data is None:
        return ["Step profile: not run."]
    rows = data["trainers"]
    labels = [r["label"] for r in rows]
    head = (f"Step profile, {data['config']}, micro-batch {data['micro_batch']}, activation checkpointing "
            f"{data['ckpt']} (`bench/step_profile.py`; phases run synchronised, one profiled step each):")
    phases = [[r["label"], phase, p["wall_ms"], p["device_ms"], p["launches"]]
              for r in rows for phase, p in r["phases"].items()]
    cats = sorted({c for r in rows for p in r["phases"].values() for c in p["categories"]})
    by_cat = [[c, *(sum(p["categories"].get(c, 0.0) for p in r["phases"].values()) for r in rows)] for c in cats]
    return ([head, ""] + table(["trainer", "phase", "wall ms", "device ms", "launches"], phases) + ["", "Device ms by "
            "kernel category, all phases:", ""] + table(["category", *labels], by_cat))


def report(folder: Path) -> str:
    sections = [session_section, kernel_tests_section, step_profile_section, attention_section, launch_order_section,
                tied_grad_section,
                fused_ops_section, fused_loss_section, train_section, startup_section, untie_section]
    return "\n\n".join("\n".join(section(folder)) for section in sections) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="the --out folder of bench/gpu_session.py, or its --pack archive (.tgz)")
    p.add_argument("--md", type=Path, help="also write the Markdown here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as unpacked:
        folder = args.folder
        if folder.is_file():
            try:
                with tarfile.open(folder) as tar:
                    tar.extractall(unpacked, filter="data")
            except tarfile.TarError as err:
                raise SystemExit(f"{folder} is not a folder nor a readable .tgz ({err}); pass what gpu_session.py wrote")
            folder = Path(unpacked)
        if not (folder / "session.json").is_file():
            raise SystemExit(f"{args.folder} holds no session.json; pass the --out folder of bench/gpu_session.py "
                             "or its --pack archive")
        text = report(folder)
    print(text, end="")
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
