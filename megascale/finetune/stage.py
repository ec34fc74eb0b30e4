"""Trace fine-tuning as a second stage of the pretraining loop (no second copy of the loop).

``finetune(cfg, ctx)`` = ``setup_run(cfg, ctx, TraceStage(...))`` + ``run_loop``: the
engine, ZeRO, tensor parallelism, checkpoints (exact resume), metrics JSONL and
TensorBoard are the pretraining ones. The stage plugs in

* ``open_data``: the pretraining tokenizer, examples (JSONL or generated), packed rows;
* ``initial_weights``: the pretraining checkpoint's full weights (any tp/pp/dp layout,
  tied or untied: ``checkpoint.full_weights``) with the vocabulary extended by the separators;
* ``batch``: (inputs, targets, weights, doc_ids, positions) for ``engine(*batch)``;
* ``evaluate``: generation accuracy and trace metrics on the held-out splits;
* ``meta``: what a fine-tuning checkpoint records beyond a pretraining one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megascale.config import Config, ModelConfig, validate
from megascale.data import Tokenizer
from megascale.errors import MegascaleError
from megascale.export.hf import hf_model_overrides, is_hf_directory, lazy_hf_weights
from megascale.finetune import data as fd
from megascale.finetune.arithmetic import Example, arithmetic_splits
from megascale.finetune.evaluate import evaluate_splits
from megascale.train import checkpoint as ckpt
from megascale.train.dist import DistContext
from megascale.train.loop import Data, RunSummary, inference_model, run_loop, setup_run
from megascale.train.metrics import new_axes, read_metrics, save_figure

log = logging.getLogger(__name__)

# Held-out in-range problems used for the validation *loss* (teacher forcing, weighted like training);
# the first finetune.eval_examples of them are also scored by generation.
VAL_LOSS_EXAMPLES = 512


def resolve_init(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The pretraining checkpoint named by finetune.init and its megascale.json (or a Hugging Face Llama directory's equivalent)."""
    if not cfg.finetune.init:
        raise MegascaleError("no pretraining checkpoint to start from: pass --init CHECKPOINT (e.g. runs/tiny/checkpoints) or set finetune.init")
    if is_hf_directory(Path(cfg.finetune.init)):
        return Path(cfg.finetune.init), hf_init_meta(Path(cfg.finetune.init))
    path = ckpt.resolve_checkpoint(cfg.finetune.init, Path(cfg.finetune.init))
    if path is None:
        raise MegascaleError(f"finetune.init={cfg.finetune.init} holds no checkpoint; run `make pretrain` first or pass a step_* directory")
    return path, ckpt.read_meta(path)


def hf_init_meta(directory: Path) -> dict[str, Any]:
    """What fine-tuning reads from a checkpoint's megascale.json, for a Hugging Face Llama directory."""
    model = ModelConfig(**hf_model_overrides(directory))
    tokenizer = directory / "tokenizer.model"
    if not tokenizer.is_file():
        raise MegascaleError(f"{directory} has no tokenizer.model (sentencepiece); fine-tuning needs the model's tokenizer beside it")
    return {"format": "huggingface", "config": {"model": dataclasses.asdict(model)}, "sharing_plan": list(range(model.n_layers)),
            "tokenizer": {"path": str(tokenizer.resolve()), "vocab_size": model.vocab_size}, "layout": "hugging face", "step": 0}


def init_weights(path: Path, meta: dict[str, Any]):
    """Full plain-model weights of the fine-tuning start: a megascale checkpoint of any layout, or a Hugging Face directory."""
    if meta.get("format") == "huggingface":
        return lazy_hf_weights(path)[1]
    return ckpt.lazy_full_weights(path, meta)  # both read one tensor at a time by build_engine


def finetune_config(cfg: Config) -> tuple[Config, Path, dict[str, Any]]:
    """``cfg`` with the model section taken from the init checkpoint (vocabulary extended); checks the layout."""
    path, meta = resolve_init(cfg)
    saved = meta["config"]["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    model.sharing = ",".join(str(g) for g in meta["sharing_plan"])  # tied, partly or fully untied alike
    model.vocab_size = fd.extended_vocab_size(saved["vocab_size"])
    model.attention = cfg.model.attention
    model.max_seq_len = max(model.max_seq_len, cfg.data.seq_len)
    out = dataclasses.replace(cfg, model=model)
    validate(out)
    return out, path, meta


@dataclass
class Splits:
    train: list[Example]
    val_loss: list[Example]
    held_out: dict[str, list[Example]]
    skipped_lines: int = 0


def load_examples(cfg: Config) -> Splits:
    """Training and held-out examples: from JSONL files, else the arithmetic generator."""
    f = cfg.finetune
    tasks = [t.strip() for t in f.tasks.split(",") if t.strip()]
    gen = arithmetic_splits(tasks, f.train_examples, max(f.eval_examples, VAL_LOSS_EXAMPLES), f.train_min_digits,
                            f.train_max_digits, f.eval_max_digits, f.seed)
    skipped = 0
    train = gen.train
    if f.train_file:
        train, bad = fd.read_jsonl(Path(f.train_file), f.skip_bad_examples)
        skipped += bad
    if f.eval_file:
        held, bad = fd.read_jsonl(Path(f.eval_file), f.skip_bad_examples)
        skipped += bad
        return Splits(train, held, {"in": held[: f.eval_examples]}, skipped)
    return Splits(train, gen.eval_in, {"in": gen.eval_in[: f.eval_examples], "out": gen.eval_out[: f.eval_examples]}, skipped)


class TraceStage:
    """The hooks ``setup_run`` / ``run_loop`` call for trace fine-tuning (see the module docstring)."""

    def __init__(self, cfg: Config, init_path: Path, init_meta: dict[str, Any]):
        self.cfg, self.init_path, self.init_meta = cfg, init_path, init_meta
        self.base_vocab = init_meta["config"]["model"]["vocab_size"]
        self.template: fd.Template | None = None
        self.splits: Splits | None = None
        self.stats: dict[str, Any] = {}

    # ---------------------------------------------------------------- setup_run hooks

    def open_data(self, cfg: Config, ctx: DistContext) -> Data:
        tok_path = ckpt.tokenizer_path(self.init_path, self.init_meta)
        tokenizer = Tokenizer(tok_path)
        f = cfg.finetune
        self.template = fd.Template(tokenizer, self.base_vocab, f.trace_in_input)
        self.splits = load_examples(cfg)
        weights = fd.weights_by_role(f.trace_weight, f.response_weight)
        seq = cfg.data.seq_len
        train_enc, long_train = fd.encode_all(self.splits.train, self.template, seq, f.skip_bad_examples, "training")
        val_enc, long_val = fd.encode_all(self.splits.val_loss, self.template, seq, f.skip_bad_examples, "held-out")
        train = fd.pack(train_enc, seq, tokenizer.pad_id, f.packing, weights)
        val = fd.pack(val_enc, seq, tokenizer.pad_id, f.packing, weights)
        self.stats = {"examples_train": len(train_enc), "skipped_bad": self.splits.skipped_lines + long_train + long_val,
                      **{f"train_{k}": v for k, v in fd.describe_rows(train).items()}}
        if ctx.is_main:
            log.info("trace fine-tuning data: %s; held-out %s; template separators at ids %d..%d, vocabulary %d -> %d",
                     self.stats, {k: len(v) for k, v in self.splits.held_out.items()}, self.base_vocab,
                     self.base_vocab + len(fd.SEPARATORS) - 1, self.base_vocab, cfg.model.vocab_size)
            if self.stats["skipped_bad"]:
                log.warning("skipped %d bad examples (finetune.skip_bad_examples=true)", self.stats["skipped_bad"])
        source = Path(f.train_file) if f.train_file else Path("generated-arithmetic")
        return Data(tokenizer, train, val, source)

    def initial_weights(self, model_cfg: ModelConfig):
        """Pretrained weights (full, from any layout) with the vocabulary grown by the separator rows."""
        state = fd.extend_vocab(init_weights(self.init_path, self.init_meta), model_cfg.vocab_size)
        log.info("initialised from %s (layout %s, sharing plan %s)", self.init_path,
                 self.init_meta.get("layout"), self.init_meta["sharing_plan"])
        return state

    def batch(self, split: fd.PackedRows, indices) -> tuple[torch.Tensor, ...]:
        return split.batch(indices)

    # ---------------------------------------------------------------- run_loop hooks

    def evaluate(self, run) -> dict[str, float]:
        f = self.cfg.finetune
        groups = run.groups
        # Generation runs whole sequences on every rank: context-parallel peers then score examples of their own,
        # as data-parallel ones do (the data-parallel group holds dp × cp ranks).
        with inference_model(run) as model:
            return evaluate_splits(model, self.template, self.splits.held_out, f.max_new_tokens,
                                   f.eval_batch_size, groups.dp_rank, groups.dims.dp_cp, groups.dp_group,
                                   stop_early=self.cfg.train.zero_stage < 3)

    def meta(self) -> dict[str, Any]:
        f = self.cfg.finetune
        return {"init": str(self.init_path.resolve()), "init_step": self.init_meta.get("step"),
                "base_vocab_size": self.base_vocab, "separators": {name: self.base_vocab + i for i, name in enumerate(fd.SEPARATORS)},
                "trace_weight": f.trace_weight, "response_weight": f.response_weight,
                "trace_in_input": f.trace_in_input, "packing": f.packing, **self.stats}


@dataclass
class FinetuneSummary:
    run: RunSummary
    accuracy_png: Path | None
    first: dict[str, float]
    last: dict[str, float]


def finetune(cfg: Config, ctx: DistContext) -> FinetuneSummary:
    """Trace fine-tuning from ``cfg.finetune.init``; every rank calls this."""
    cfg, path, meta = finetune_config(cfg)
    summary = run_loop(setup_run(cfg, ctx, TraceStage(cfg, path, meta)))
    records = [r for r in read_metrics(summary.metrics) if "acc_in" in r] if ctx.is_main and summary.metrics.exists() else []
    png = None
    if ctx.is_main and cfg.metrics.plot and records:
        png = plot_accuracy(records, summary.out_dir / "accuracy.png", title=f"trace fine-tuning: {summary.out_dir.name}")
    return FinetuneSummary(summary, png, records[0] if records else {}, records[-1] if records else {})


def plot_accuracy(records: list[dict[str, Any]], png_path: Path, title: str) -> Path:
    """Held-out response and step accuracy against optimizer steps."""
    fig, ax = new_axes()
    styles = {"acc_in": "o-", "acc_out": "s-", "step_acc_in": "o--", "step_acc_out": "s--", "trace_tok_acc_in": ":"}
    for key, style in styles.items():
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key, lw=1.3, ms=4)
    ax.set_ylim(-0.02, 1.02)
    return save_figure(fig, ax, png_path, "step", "held-out accuracy", title)
