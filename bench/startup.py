"""Start-up cost per rank: seconds and peak host memory to build the model and the DeepSpeed engine.

    torchrun --nproc-per-node 4 bench/startup.py --config configs/350m.yaml parallel.tp=2 parallel.pp=2 \
        train.precision=fp32 --json runs/bench/startup.json

Every rank builds the model the way ``launch/pretrain.py`` does (``build_model``,
then ``build_engine``: tensor parallelism, the pipeline split, DeepSpeed), with no
data and no step. Each reports the seconds that took, its peak resident memory
(``ru_maxrss``, the whole process: torch, DeepSpeed and the model; on a GPU also the
allocator's peak) at the end and
once its parameters exist but before DeepSpeed allocates its own buffers (the
model's part), and the bytes of the parameters it holds; rank 0 prints a table
and writes JSON. What it shows: whether a rank pays for the whole model or only
for its shard.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def current_rss_gib() -> float:
    """Resident memory now (Linux /proc; ru_maxrss gives only the peak)."""
    import os  # noqa: PLC0415

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def storage_bytes(module) -> int:
    """Bytes of ``module``'s parameters that have storage (not on the meta device), each tensor once.

    A ZeRO-3 parameter's own tensor is empty; its partition (``ds_tensor``) is what the rank holds.
    """
    held = [getattr(p, "ds_tensor", p) for p in module.parameters() if not p.is_meta]
    return sum(t.numel() * t.element_size() for t in held)


def start_weights(checkpoint: Path | None):
    """Full weights of ``checkpoint`` (a step directory, or a Hugging Face directory as ``train.init_hf``
    takes) the way start-up reads them (lazily where the code can), or None."""
    if checkpoint is None:
        return None
    from megascale.export import hf  # noqa: PLC0415
    from megascale.train import checkpoint as ckpt  # noqa: PLC0415

    if hf.is_hf_directory(checkpoint):
        if hasattr(hf, "lazy_hf_weights"):
            return hf.lazy_hf_weights(checkpoint)[1]
        return hf.import_hf(checkpoint)[1]  # commits before the lazy reader
    read = getattr(ckpt, "lazy_full_weights", ckpt.full_weights)  # the eager one on commits before the lazy reader
    return read(checkpoint, ckpt.read_meta(checkpoint))


def measure(config: str | None, overrides: list[str], checkpoint: Path | None = None) -> dict:
    import torch  # noqa: PLC0415

    from megascale.config import load_config  # noqa: PLC0415
    from megascale.train.dist import init_distributed  # noqa: PLC0415
    from megascale.train.engine import batch_layout, build_engine  # noqa: PLC0415
    from megascale.train.loop import build_model, make_groups  # noqa: PLC0415

    import megascale.train.engine as engine_module  # noqa: PLC0415

    ctx = init_distributed()
    # The model part of the peak: RSS once the rank's parameters exist, before DeepSpeed allocates its own.
    seen: dict[str, float] = {}
    plain_parallelize = engine_module.parallelize

    def parallelize(*args, **kwargs):
        module = plain_parallelize(*args, **kwargs)
        seen["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return module

    engine_module.parallelize = parallelize
    cfg = load_config(config, overrides)
    if checkpoint is not None and (checkpoint / "config.json").is_file():  # Hugging Face: its shape, as pretrain.py takes it
        from megascale.export.hf import with_hf_model  # noqa: PLC0415

        cfg = with_hf_model(cfg, checkpoint)
    groups = make_groups(cfg, ctx)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GiB
    start = time.perf_counter()
    model = build_model(cfg, ctx, quiet=True)
    built = time.perf_counter()
    unique = model.param_counts().unique  # before tensor parallelism shards the plain model in place
    rss_model = current_rss_gib()
    weights = start_weights(checkpoint)
    engine = build_engine(model, cfg, batch_layout(cfg, groups.dims.dp), ctx.device, groups, weights=weights)
    del weights
    done = time.perf_counter()
    held = storage_bytes(engine.module)
    row = {
        "rank": ctx.rank, "tp_rank": groups.tp_rank, "pp_stage": groups.stage,
        "model_s": round(built - start, 2), "engine_s": round(done - built, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_at_start_gib": round(rss_before, 3), "peak_rss_before_deepspeed_gib": round(seen["peak"], 3),
        "rss_after_model_gib": round(rss_model, 3), "rss_after_engine_gib": round(current_rss_gib(), 3),
        "params_gib": round(held / 2**30, 3), "params_bytes": held,
        "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if ctx.device.type == "cuda" else None,
        # The plain model's parameters that have storage: the engine's and no more (other stages' stay meta).
        "plain_model_bytes": storage_bytes(model),
    }
    rows = [None] * ctx.world_size
    torch.distributed.all_gather_object(rows, row)
    return {"layout": groups.dims.describe(), "weights": str(checkpoint) if checkpoint else None,
            "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
            "params_unique": unique, "ranks": rows, "is_main": ctx.is_main}


def table(result: dict) -> str:
    lines = [f"layout {result['layout']}, {result['params_unique']:,} parameters, {result['precision']}, "
             f"ZeRO {result['zero_stage']}",
             "| rank | tp | stage | build_model s | build_engine s | parameters held GiB | peak RSS before DeepSpeed GiB | peak RSS GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["ranks"]:
        lines.append(f"| {r['rank']} | {r['tp_rank']} | {r['pp_stage']} | {r['model_s']:.2f} | {r['engine_s']:.2f} | "
                     f"{r['params_gib']:.3f} | {r['peak_rss_before_deepspeed_gib']:.3f} | {r['peak_rss_gib']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="a YAML config (default: the built-in defaults)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-rank figures here (rank 0)")
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="start from these full weights: a checkpoint's step directory (as a resume into another "
                             "layout does) or a Hugging Face Llama directory (as train.init_hf does)")
    args, overrides = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    result = measure(args.config, overrides, args.weights)
    if not result.pop("is_main"):
        return
    print(table(result), flush=True)
    if args.json:
        import datetime as dt  # noqa: PLC0415

        import torch  # noqa: PLC0415

        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {**result, "date": dt.date.today().isoformat(), "torch": torch.__version__, "command": sys.argv}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
    from megascale.train.dist import exit_process  # noqa: PLC0415

    exit_process(0)
