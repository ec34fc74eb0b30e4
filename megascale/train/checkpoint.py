"""Checkpoints: DeepSpeed's own format plus ``megascale.json``, written atomically.

Layout of ``<out_dir>/checkpoints``::

    latest                 tag of the newest complete checkpoint (DeepSpeed's convention)
    zero_to_fp32.py        DeepSpeed's consolidation script, copied by DeepSpeed
    step_00000100/         DeepSpeed model/optimizer shards + megascale.json + tokenizer.model

A save goes to ``step_N.tmp`` first; rank 0 writes ``megascale.json`` into it,
renames it to ``step_N`` (an atomic rename) and only then moves ``latest``
(write-temp-then-replace). A crash at any point leaves ``latest`` pointing at
the previous complete checkpoint; leftover ``.tmp`` directories are removed by
the next save. A step saved again (a checkpoint converted into its own directory,
a run restarted from an earlier step) moves the old ``step_N`` aside to
``step_N.replaced`` until the new one has its name. If the new one never got it,
a resume reads the old one where it is and the next save puts it back.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megascale.errors import MegascaleError
from megascale.model.init import LazyWeights, Shard, Source, chunk_range, cut
from megascale.parallel.topology import kv_replicas
from megascale.train import zero_files
from megascale.train.engine import base_optimizer

log = logging.getLogger(__name__)

META_NAME = "megascale.json"
META_FORMAT = "megascale-checkpoint"
META_VERSION = 1
TOKENIZER_FILE = "tokenizer.model"  # the run's sentencepiece model, copied into every checkpoint
# Fault injection for the crash-safety tests: MEGASCALE_FAULT_DURING_SAVE=<step> makes rank 0
# die hard (os._exit) after the shards of that step's save are written, before it is published.
FAULT_ENV = "MEGASCALE_FAULT_DURING_SAVE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, root: Path, step: int, meta: dict[str, Any], is_main: bool, keep: int) -> Path:
    """Save a complete checkpoint for ``step`` (all ranks call this); returns its directory."""
    return start_save(engine, root, step, meta, is_main, keep).finish()


def start_save(engine, root: Path, step: int, meta: dict[str, Any], is_main: bool, keep: int) -> PendingSave:
    """Begin the save of ``step`` (all ranks): DeepSpeed writes its files into ``step_N.tmp``; with a
    ``HostSnapshotEngine`` installed (train.async_save) it only copies the state to host memory, and a
    thread writes the files. ``PendingSave`` publishes the checkpoint once they are all on disk."""
    tag = tag_for(step)
    meta = copy.deepcopy(meta)  # published later: not the live lists it was made from (the untie rules' history)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_partial_saves(root)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag + ".tmp", save_latest=False, client_state=optimizer_names(engine))
    take = getattr(engine.checkpoint_engine, "take", None)
    if take is None:
        return PendingSave(root, step, meta, is_main, keep)
    from megascale.train.async_save import BackgroundWrites  # noqa: PLC0415 (imports DeepSpeed)

    return PendingSave(root, step, meta, is_main, keep, BackgroundWrites(engine.checkpoint_engine, take()))


def optimizer_names(engine) -> dict[str, list[str]]:
    """For the model-states file at ZeRO-0: the module's names of the parameters the torch optimizer steps, in
    its order (its state is a list by index, and a pipeline stage's file holds no module to name them by)."""
    if engine.zero_optimization_stage() > 0:
        return {}  # ZeRO's files name every parameter's slice themselves
    named = {id(p): name for name, p in engine.module.named_parameters()}
    return {zero_files.OPTIMIZER_NAMES: [named.get(id(p), "") for g in engine.optimizer.param_groups for p in g["params"]]}


@dataclass
class PendingSave:
    """A save whose files are written (``writes`` None) or being written by a thread, not yet published."""

    root: Path
    step: int
    meta: dict[str, Any]
    is_main: bool
    keep: int
    writes: Any = None  # megascale.train.async_save.BackgroundWrites
    paused_seconds: float = 0.0  # how long training stood still to start it (the host copy)

    @property
    def path(self) -> Path:
        return self.root / tag_for(self.step)

    def written_everywhere(self, device: torch.device) -> bool:
        """Whether every rank's files are on disk: one all-reduce, all ranks together. A write that failed
        anywhere stops every rank with one line, before anything is published."""
        writes = self.writes
        state = torch.tensor([0.0 if writes is None or writes.done() else 1.0,
                              1.0 if writes is not None and writes.done() and writes.error else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(state)
        busy, failed = state.tolist()
        if failed:
            self._wait()  # this rank's own error, if it is one of them
            raise MegascaleError(f"writing checkpoint {self.path.name} failed on another rank (its log says why); "
                                 f"{self._previous()} is the latest complete one")
        return busy == 0

    def publish_written(self) -> Path:
        """Publish after ``written_everywhere()`` said so (all ranks call it; no write is left, none failed)."""
        self._publish()
        return self.path

    def finish(self) -> Path:
        """Wait for this rank's writes and every other rank's, then publish (all ranks call it)."""
        self._wait()
        _barrier()
        self._publish()
        _barrier()
        return self.path

    def _wait(self) -> None:
        if self.writes is None:
            return
        try:
            self.writes.wait()
        except Exception as err:  # noqa: BLE001 (disk full, a quota, a vanished mount: one line, not the thread's traceback)
            raise MegascaleError(f"writing checkpoint {self.path.name} failed ({err}); {self._previous()} is the "
                                 f"latest complete one; free space in {self.root} or set train.async_save=false") from None

    def _previous(self) -> str:
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.is_file() else "no checkpoint"

    def _publish(self) -> None:
        """Rank 0: metadata and tokenizer in, rename step_N.tmp to step_N, move ``latest``, prune."""
        if not self.is_main:
            return
        tag, tmp = self.path.name, self.root / (self.path.name + ".tmp")
        if os.environ.get(FAULT_ENV) == str(self.step):
            os._exit(17)
        _copy_tokenizer(self.meta, tmp)
        _atomic_write(tmp / META_NAME, json.dumps(self.meta, indent=2))
        aside = _aside(self.path)
        if self.path.exists():  # a step saved before (another timeline, a conversion): kept until replaced
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.path, aside)
        os.replace(tmp, self.path)
        _atomic_write(self.root / "latest", tag)
        shutil.rmtree(aside, ignore_errors=True)
        _prune(self.root, self.keep)


def _copy_tokenizer(meta: dict[str, Any], directory: Path) -> None:
    """Put the run's tokenizer beside the weights (meta["tokenizer"]["file"]), so the checkpoint
    stays usable when the data directory is rebuilt, deleted, or left on another machine."""
    tok = meta.get("tokenizer") or {}
    if not (tok.get("file") and tok.get("path")):
        return
    try:
        shutil.copyfile(tok["path"], directory / tok["file"])
    except OSError as err:  # the data directory went away mid-run: save the weights all the same
        log.warning("checkpoint saved without its tokenizer (%s); export with --tokenizer PATH", err)
        del tok["file"]


def tokenizer_path(path: Path, meta: dict[str, Any]) -> Path:
    """The tokenizer checkpoint ``path`` was trained with: its own copy, else (older checkpoints) the recorded path."""
    tok = meta.get("tokenizer") or {}
    own = path / tok["file"] if tok.get("file") else None
    return own if own is not None and own.is_file() else Path(tok.get("path", ""))


def _aside(path: Path) -> Path:
    """Where a step directory waits while a new save of the same step takes its name."""
    return path.with_name(path.name + ".replaced")


def _remove_partial_saves(root: Path) -> None:
    for partial in root.glob("step_*.tmp"):
        log.warning("removing incomplete checkpoint %s (a save was interrupted)", partial)
        shutil.rmtree(partial, ignore_errors=True)
    for aside in root.glob("step_*.replaced"):
        step_dir = aside.with_name(aside.name.removesuffix(".replaced"))
        if step_dir.exists():  # the new save of that step was published
            shutil.rmtree(aside, ignore_errors=True)
        else:  # interrupted between the two renames: the old one is still the complete checkpoint
            log.warning("restoring %s (a save that was replacing it was interrupted)", step_dir)
            os.replace(aside, step_dir)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".replaced")))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none yet."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir() and _aside(path).is_dir():
        # Stopped between the two renames of a save over an existing step: the old directory, moved aside, is
        # complete. Read it where it is (every rank may be reading; renaming here would race them); the next
        # save puts it back under its name.
        log.warning("%s names '%s', which a save was replacing when it stopped; using the complete %s",
                    pointer, path.name, _aside(path).name)
        return _aside(path)
    if not path.is_dir():
        raise MegascaleError(f"{pointer} names '{path.name}', which does not exist; point it at a step_* directory in {root}")
    return path


def resolve_checkpoint(spec: str, out_dir: Path) -> Path | None:
    """train.resume → a checkpoint directory: '' none, 'auto' latest in out_dir if any, else a path."""
    if not spec:
        return None
    if spec == "auto":
        return latest_checkpoint(out_dir / "checkpoints")
    path = Path(spec)
    for root in (path, path / "checkpoints"):  # a checkpoints/ directory or a run directory
        if (root / "latest").is_file() and not (path / META_NAME).exists():
            return latest_checkpoint(root)
    if not path.is_dir():
        raise MegascaleError(f"checkpoint '{path}' does not exist; pass a step_* directory, a checkpoints/ directory or a run directory")
    return path  # read_meta says so if it is not a megascale checkpoint


def read_meta(path: Path) -> dict[str, Any]:
    """Read and check ``megascale.json`` of a checkpoint directory."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise MegascaleError(f"{path} has no {META_NAME}: not a megascale checkpoint; pass a directory written by megascale")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MegascaleError(
            f"{meta_path} is unreadable ({type(err).__name__}); restore it from a copy or resume from an older step_* directory"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise MegascaleError(f"{meta_path} is not a megascale checkpoint description; pass a directory written by megascale")
    if meta.get("version", 0) > META_VERSION:
        raise MegascaleError(f"{meta_path} has format version {meta['version']} (> {META_VERSION}); upgrade megascale")
    return meta


# Fields that change the parameter set: a checkpoint only loads into the same ones.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "ffn_multiple_of", "tie_embeddings")


def check_compatible(meta: dict[str, Any], model_cfg: dict[str, Any], plan: list[int]) -> None:
    """Refuse, in one line, a checkpoint whose model shape or sharing plan differs from the config's."""
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}" for k in SHAPE_KEYS if saved.get(k) != model_cfg.get(k)]
    if meta.get("sharing_plan") != plan:
        diffs.append(f"sharing plan: checkpoint {meta.get('sharing_plan')} vs config {plan}")
    if diffs:
        raise MegascaleError(
            "checkpoint was saved for another model shape (" + "; ".join(diffs) + "); "
            "resume with the checkpoint's model.* settings or use a new train.out_dir"
        )


def load_checkpoint(engine, path: Path) -> None:
    """Load weights, optimizer and LR-scheduler state into the engine (all ranks).

    The optimizer's settings stay the config's: DeepSpeed's load brings back the saved param groups
    (betas, eps, weight decay, LR) and the scheduler's peak LR, which would silently override an
    optim.* changed for the resumed run. The LR is recomputed at the loaded step, as on a converted resume.
    """
    opt, scheduler = base_optimizer(engine), engine.lr_scheduler
    settings = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in opt.param_groups]
    peaks = list(scheduler.base_lrs) if scheduler is not None else []
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise MegascaleError(f"DeepSpeed could not load {path}; it may be incomplete — resume from an older step_* directory")
    for group, own in zip(opt.param_groups, settings, strict=True):
        group.update(own)
    if scheduler is not None:
        scheduler.base_lrs = peaks
        _schedule_at(scheduler, scheduler.last_epoch)  # the saved position: fp16 steps skipped on overflow did not count


# ------------------------------------------------------------ layout conversion
#
# A checkpoint saved under one (tp, pp, dp) layout resumes under another through
# full tensors by name: the plain model's state dict is rebuilt from the DeepSpeed
# files (pipeline layer files, per-tensor-rank model files or ZeRO partitions, TP
# shards concatenated), loaded into the fresh model, and the model is sharded anew.
# Adam's moments take the same way (megascale/train/zero_files.py reads them), and
# step, LR schedule and data position are restored: the run goes on as the saved one.

# Parameter-name suffixes → the dimension tensor parallelism splits (see parallel/tensor_parallel.py).
_TP_DIM0 = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "embed.weight", "lm_head.weight")
_TP_DIM1 = ("o_proj.weight", "down_proj.weight")
_KV = ("k_proj.weight", "v_proj.weight")


_load = zero_files.load


def _tp_dim(name: str) -> int | None:
    return 0 if name.endswith(_TP_DIM0) else 1 if name.endswith(_TP_DIM1) else None


def _merged(shards: list[dict[str, torch.Tensor | Source]], name: str, kv_copies: int = 1) -> Source:
    if name.endswith(_KV):
        shards = shards[::kv_copies]  # tp > n_kv_heads: runs of kv_copies ranks hold equal copies of one head
    dim = _tp_dim(name) if len(shards) > 1 else None
    parts = [s[name] for s in shards] if dim is not None else [shards[0][name]]  # replicated (norms): rank 0's

    def make() -> torch.Tensor:
        if dim is None:
            return _fp32(_read(parts[0]).clone())  # never the memory map itself
        return _fp32(torch.cat([_read(p) for p in parts], dim=dim))

    def piece(shard: Shard) -> torch.Tensor:
        if dim is not None and dim != shard.dim:
            return cut(make(), shard)
        start, end = chunk_range(shape[shard.dim], shard)
        chunks, offset = [], 0
        for part in parts:  # saved along shard.dim (or one replicated whole)
            size = part.shape[shard.dim]
            lo, hi = max(start, offset), min(end, offset + size)
            if lo < hi:
                chunks.append(_read(part).narrow(shard.dim, lo - offset, hi - lo))
            offset += size
        chunks = chunks or [_read(parts[0]).narrow(shard.dim, 0, 0)]  # an empty chunk, as torch.chunk's past the end
        return _fp32(torch.cat(chunks, dim=shard.dim))  # a copy: nothing keeps the memory map alive

    shape = list(parts[0].shape)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in parts)
    return Source(make, tuple(shape), piece)


def _read(part: torch.Tensor | Source) -> torch.Tensor:
    """A saved shard: a tensor of a memory-mapped file, or made from ZeRO's partitions when read."""
    return part.make() if isinstance(part, Source) else part


def _fp32(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.is_floating_point() else value


def merge_tp_shards(shards: list[dict[str, torch.Tensor | Source]], kv_copies: int = 1) -> dict[str, Source]:
    """Name → how to assemble it, over tensor-parallel shards of one state dict, split as each was;
    ``kv_copies`` tensor ranks in a row hold each KV head (megascale.parallel.topology.kv_replicas)."""
    return {name: _merged(shards, name, kv_copies) for name in shards[0]}


def _kv_replicas(meta: dict[str, Any], tp: int) -> int:
    m = meta["config"]["model"]
    return kv_replicas(tp, m.get("n_kv_heads") or m["n_heads"])


def _engine_state(path: Path, meta: dict[str, Any], tp: int) -> dict[str, Source]:
    kv_copies = _kv_replicas(meta, tp)
    if meta["config"]["train"]["zero_stage"] == 3 or _master_partitions(path, meta):
        return merge_tp_shards([zero_files.zero_tensors(path, rank, "fp32") for rank in range(tp)], kv_copies)
    if _sixteen_bit(meta):  # a 16-bit run at ZeRO-0 (before 2026-11-29): DeepSpeed's fp32 copies beside torch's state
        return merge_tp_shards([zero_files.torch_tensors(path, r, "fp32", _tied(meta)) for r in range(tp)], kv_copies)
    shards = [_load(path / f"mp_rank_{r:02d}_model_states.pt")["module"] for r in range(tp)]
    return merge_tp_shards(shards, kv_copies)


def _sixteen_bit(meta: dict[str, Any]) -> bool:
    return meta["config"]["train"]["precision"] in ("bf16", "fp16")


def _tied(meta: dict[str, Any]) -> set[str]:
    """The module state's names that are another parameter: the LM head tied to the embedding."""
    return {"lm_head.weight"} if meta["config"]["model"]["tie_embeddings"] else set()


def _master_partitions(path: Path, meta: dict[str, Any]) -> bool:
    """Whether to read the weights from ZeRO's fp32 master partitions: a 16-bit run's module states (and a
    pipeline's layer files) hold them rounded to 16 bits, and a run converted from those would start rounded."""
    return _sixteen_bit(meta) and zero_files.has_zero_files(path)


def _plain_name(name: str, plan: list[int]) -> str:
    """A pipeline module's parameter name as the plain model's: ``tied_modules.block3.block.X`` (a tie group's
    block) → ``blocks.3.X``, ``tied_modules.embed.embed.weight`` → ``embed.weight``, ``5.norm.weight`` →
    ``norm.weight`` (see parallel/pipeline.py's layer list)."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        return f"blocks.{int(key[5:])}.{rest.removeprefix('block.')}" if key.startswith("block") else rest
    return f"blocks.{plan[int(head) - 1]}.{rest.removeprefix('block.')}" if rest.startswith("block.") else rest


def _pipeline_zero_state(path: Path, meta: dict[str, Any], tp: int, pp: int) -> dict[str, Source]:
    """The plain model's fp32 masters from a pipeline's ZeRO partitions, stage by stage."""
    return _by_stage(meta, tp, pp, lambda rank: zero_files.zero_tensors(path, rank, "fp32"))


def _by_stage(meta: dict[str, Any], tp: int, pp: int, read) -> dict[str, Source]:
    """The plain model's tensors from a pipeline's per-rank state, ``read(model-parallel rank)`` by the pipeline
    module's names (a tie group held by two stages keeps equal replicas: either serves). DeepSpeed numbers a
    pipeline's model-parallel ranks stage-major (stage × tp + tensor rank)."""
    state, plan = {}, meta["sharing_plan"]
    for stage in range(pp):
        shards = [{_plain_name(k, plan): v for k, v in read(rank).items()} for rank in range(stage * tp, (stage + 1) * tp)]
        state.update(merge_tp_shards(shards, _kv_replicas(meta, tp)))
    return state


def _layer_file(path: Path, idx: int, tp_rank: int) -> Path:
    return path / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"  # DeepSpeed's PipelineModule naming


def _pipeline_state(path: Path, meta: dict[str, Any], tp: int) -> dict[str, Source]:
    """The plain model's tensors from pipeline layer files (see parallel/pipeline.py's layer list)."""
    plan = meta["sharing_plan"]
    n, kv_copies = len(plan), _kv_replicas(meta, tp)
    state = {}
    for idx in range(n + 3):
        if idx == n + 2 and meta["config"]["model"]["tie_embeddings"]:
            break  # the tied head is the embedding's weight, saved with layer 0
        layer = merge_tp_shards([_load(_layer_file(path, idx, r)) for r in range(tp)], kv_copies)
        for key, value in layer.items():
            if 1 <= idx <= n:
                key = f"blocks.{plan[idx - 1]}." + key.removeprefix("block.")
            state[key] = value
    return state


def lazy_full_weights(path: Path, meta: dict[str, Any]) -> LazyWeights:
    """The unsharded plain-model tensors of a checkpoint saved under any layout, each assembled when read (fp32)."""
    tp, pp = _layout(meta)
    if pp == 1:
        parts = _engine_state(path, meta, tp)
    elif _master_partitions(path, meta):
        parts = _pipeline_fp32_masters(path, meta, tp, pp)
    else:
        parts = _pipeline_state(path, meta, tp)
    return _plain_weights(parts, meta)


def _pipeline_fp32_masters(path: Path, meta: dict[str, Any], tp: int, pp: int) -> dict[str, Source]:
    try:
        return _pipeline_zero_state(path, meta, tp, pp)
    except zero_files.StateUnavailable as why:  # DeepSpeed's BF16 optimizer (a bf16 pipeline's at ZeRO-0 before 2026-11-29)
        log.warning("the weights come from the 16-bit layer files, rounded: %s", why)
        return _pipeline_state(path, meta, tp)


def _layout(meta: dict[str, Any]) -> tuple[int, int]:
    layout = meta.get("layout", {"tp": 1, "pp": 1})
    return layout["tp"], layout["pp"]


def _plain_weights(parts: dict[str, Source], meta: dict[str, Any]) -> LazyWeights:
    aliases = {name: "embed.weight" for name in _tied(meta)}
    for name in aliases:
        parts.pop(name, None)
    return LazyWeights(parts, aliases)


@dataclass
class AdamState:
    """A checkpoint's Adam state as full plain-model tensors: each moment by name, and the step count."""

    moments: dict[str, LazyWeights]  # "exp_avg", "exp_avg_sq"
    step: int


def lazy_adam_state(path: Path, meta: dict[str, Any]) -> AdamState:
    """The Adam moments of a checkpoint saved under any layout, each assembled when read (fp32).

    Raises ``zero_files.StateUnavailable`` (its message says why) where the saved
    format does not name them (a pipeline's ZeRO-0 state saved before megascale named it)."""
    tp, pp = _layout(meta)
    if zero_files.has_zero_files(path):
        read = lambda rank, key: zero_files.zero_tensors(path, rank, key)  # noqa: E731
    else:  # ZeRO-0: torch's state
        read = lambda rank, key: zero_files.torch_tensors(path, rank, key, _tied(meta))  # noqa: E731
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        if pp > 1:
            parts = _by_stage(meta, tp, pp, lambda rank: read(rank, key))
        else:
            parts = merge_tp_shards([read(rank, key) for rank in range(tp)], _kv_replicas(meta, tp))
        moments[key] = _plain_weights(parts, meta)
    return AdamState(moments, zero_files.adam_step(path))


def full_weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The unsharded plain-model state dict (fp32) of a checkpoint saved under any layout."""
    return lazy_full_weights(path, meta).to_dict()


def restore_schedule(engine, step: int) -> None:
    """Put the LR schedule and DeepSpeed's step counter at ``step`` (for a converted resume)."""
    engine.global_steps = step
    if engine.lr_scheduler is not None:
        _schedule_at(engine.lr_scheduler, step)


def _schedule_at(scheduler, step: int) -> None:
    """Set the optimizer's LR to the schedule's value at ``step`` (the scheduler's own position after it)."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
