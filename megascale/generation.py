"""A checkpoint as a text generator (``launch/generate.py``): the full weights, its own tokenizer; one process,
or split over tp × pp ranks, with data-parallel copies sharing the batches.

The checkpoint may be saved under any layout: its weights are read as export and
consolidation read them (``train.checkpoint.lazy_full_weights``) into the plain
``Transformer`` with the checkpoint's sharing plan, so tied blocks stay tied. A Hugging
Face Llama directory with a sentencepiece ``tokenizer.model`` (a megascale export) is
read as training's ``init_hf`` reads it. A trace
fine-tuned checkpoint brings its separators: queries are formatted as fine-tuning's
evaluation formats them, and the answer is split into trace steps and response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megascale.config import ModelConfig
from megascale.data import Tokenizer
from megascale.errors import MegascaleError
from megascale.finetune.data import SEPARATORS, Template
from megascale.finetune.arithmetic import Example
from megascale.model.generate import Sampling, generate_batch
from megascale.model.init import check_full_weights, materialize
from megascale.model.llama import Transformer
from megascale.parallel.topology import Replicas

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(spec: str) -> torch.device:
    """``auto`` → the first GPU if there is one, else the CPU; anything else as torch spells it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MegascaleError(f"--device {spec} is not a device; pass auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MegascaleError(f"--device {spec}: this machine has no CUDA device; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise MegascaleError(f"--device {spec}: generation runs on cpu or cuda; pass one of them")
    return device


@dataclass
class Generator:
    model: Transformer  # or, split over ranks, a tensor-parallel Transformer or a PipelinedLM stage
    tokenizer: Tokenizer
    template: Template | None  # a trace fine-tuned checkpoint's separators; None after pretraining
    source: str  # "<step dir> (step N)"
    device: torch.device
    dtype_name: str
    data_dirs: tuple[Path, ...] = ()  # the prepared corpora a pretraining checkpoint trained on (none otherwise)
    seq_len: int | None = None  # its training sequence length
    split: tuple[int, int] = (1, 1)  # (tp, pp) the model is split over
    replicas: Replicas = Replicas()  # data-parallel copies of the (split) model sharing the batches

    @property
    def split_words(self) -> str:
        (tp, pp), dp = self.split, self.replicas.size
        if tp * pp * dp == 1:
            return ""
        return f" ×{tp * pp * dp} (tp {tp}, pp {pp}" + (f", dp {dp}" if dp > 1 else "") + ")"

    @classmethod
    def from_checkpoint(cls, spec: str | Path, device: str = "auto", dtype: str = "auto", *, tp: int = 1, pp: int = 1,
                        ctx=None) -> Generator:
        """From a megascale checkpoint (step, checkpoints/ or run directory), or a Hugging Face Llama directory
        with a sentencepiece ``tokenizer.model`` (a megascale export: it keeps a fine-tune's separators).

        With ``ctx`` (a ``train.dist.DistContext`` of a multiple of tp × pp ranks) the model is split as
        training splits it: each rank holds its tensor shard of its pipeline stage, cut from the full weights,
        and the world / (tp × pp) copies share the batches of a request (``Replicas``). Every rank then
        calls the same methods; the results are the same on every rank.
        """
        from megascale.export.hf import is_hf_directory  # noqa: PLC0415

        where = ctx.device if ctx is not None else pick_device(device)
        dtype_name = dtype if dtype != "auto" else ("bf16" if where.type == "cuda" else "fp32")
        src = (_hf_source if is_hf_directory(Path(spec)) else _checkpoint_source)(Path(spec))
        if not src.tokenizer.is_file():
            raise MegascaleError(f"{src.name} names tokenizer {src.tokenizer}, which does not exist; restore it there")
        tokenizer = Tokenizer(src.tokenizer)
        with torch.device("meta"):  # shapes only: no random init to overwrite, no fp32 copy on the host
            model = Transformer(src.cfg)
        replicas = Replicas()
        if ctx is None or ctx.world_size == tp * pp == 1:
            check_full_weights(model, src.weights)
            materialize(model, 0, where, src.weights)  # each tensor read (lazily) and moved one at a time
            model = model.to(dtype=DTYPES[dtype_name]).eval()
        else:
            model, replicas = _split(model, src, tp, pp, ctx, DTYPES[dtype_name])
        f = src.finetune
        template = Template(tokenizer, f["base_vocab_size"], f.get("trace_in_input", True)) if f else None
        split = (tp, pp) if ctx is not None else (1, 1)
        return cls(model, tokenizer, template, src.name, where, dtype_name, src.data_dirs, src.seq_len, split, replicas)

    @property
    def valid_ids(self) -> int:
        """Ids that are tokens: the tokenizer's, plus the separators after fine-tuning (the rest pad the vocabulary)."""
        base = self.tokenizer.vocab_size
        return base + len(SEPARATORS) if self.template is not None else base

    def check_request(self, n_prompts: int, n_queries: int, max_new_tokens: int, batch_size: int, sampling: Sampling) -> None:
        """One line for a request that cannot run, before anything is computed."""
        if n_prompts + n_queries == 0:
            raise MegascaleError("nothing to generate: pass --prompt TEXT, --prompt-file FILE or --query TEXT")
        if n_queries and self.template is None:
            raise MegascaleError(f"{self.source} was not trace fine-tuned, so it has no query format; "
                                 "pass the text as --prompt, or a checkpoint of launch/finetune_trace.py")
        if max_new_tokens < 1:
            raise MegascaleError(f"--max-new-tokens {max_new_tokens}: ask for at least 1 token")
        if batch_size < 1:
            raise MegascaleError(f"--batch-size {batch_size}: decode at least 1 prompt at a time")
        sampling.check()

    def complete(self, prompts: list[str], max_new_tokens: int, sampling: Sampling, seed: int = 0,
                 batch_size: int = 8) -> list[dict[str, Any]]:
        """Continue each text; an empty one starts a document (after the end-of-document token)."""
        ids = [self.tokenizer.encode(p) or [self.tokenizer.eos_id] for p in prompts]
        out = []
        for text, prompt, (new, stopped) in zip(prompts, ids, self._generate(ids, max_new_tokens, sampling, seed, batch_size)):
            out.append({"prompt": text, "completion": self.decode(new), "prompt_tokens": len(prompt),
                        "new_tokens": len(new), "stopped": stopped, "ids": new})
        return out

    def answer(self, queries: list[str], max_new_tokens: int, sampling: Sampling, seed: int = 0,
               batch_size: int = 8) -> list[dict[str, Any]]:
        """Answer each query as trace fine-tuning taught: ⟨q⟩ query ⟨t⟩ → trace steps ⟨r⟩ response."""
        if not queries:
            return []
        ids = [self.template.prompt(Example(q, [], "")) for q in queries]
        out = []
        for query, prompt, (new, stopped) in zip(queries, ids, self._generate(ids, max_new_tokens, sampling, seed, batch_size)):
            trace, response = self.template.split_generation(new)
            out.append({"query": query, "trace": trace, "response": response, "prompt_tokens": len(prompt),
                        "new_tokens": len(new), "stopped": stopped, "ids": new})
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; a separator is written as its name (``<|trace|>``)."""
        base, parts, run = self.tokenizer.vocab_size, [], []
        for i in ids:
            if i < base:
                run.append(i)
                continue
            parts.append(self.tokenizer.decode(run))
            run = []
            parts.append(SEPARATORS[i - base] if i - base < len(SEPARATORS) else f"<|{i}|>")
        return "".join(parts + [self.tokenizer.decode(run)])

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, seed: int,
                  batch_size: int) -> list[tuple[list[int], bool]]:
        """(new ids, whether it stopped at end of document) per prompt, ``batch_size`` prompts at a time."""
        limit = self.model.cfg.max_seq_len
        for n, prompt in enumerate(prompts, 1):
            if len(prompt) + max_new_tokens > limit:
                raise MegascaleError(f"prompt {n} has {len(prompt)} tokens, and {max_new_tokens} new ones would take it past "
                                     f"the model's max_seq_len={limit}; shorten it or lower --max-new-tokens")
        batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
        done = {}
        for b in self.replicas.mine(len(batches)):
            # Each batch draws from its own stream, seeded by (seed, batch): a replica that runs
            # batch b draws what one process would, however many replicas share the request.
            generator = torch.Generator(device=self.device).manual_seed(batch_seed(seed, b))
            rows = generate_batch(self.model, batches[b], max_new_tokens, self.tokenizer.eos_id,
                                  pad_id=self.tokenizer.pad_id, pick=sampling.picker(self.valid_ids, generator))
            done[b] = [(row, len(row) < max_new_tokens) for row in rows]
        done = self.replicas.gather(done)
        return [result for b in range(len(batches)) for result in done[b]]


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of a request's batch ``batch`` (batch 0 keeps ``seed``)."""
    return seed + 1_000_003 * batch


def _split(model: Transformer, src: _Source, tp: int, pp: int, ctx, dtype: torch.dtype):
    """This rank's part of ``model`` under tp × pp, weights from ``src``, and the data-parallel copies
    (world / (tp × pp)) it shares requests with."""
    from megascale.config import Config, ParallelConfig  # noqa: PLC0415
    from megascale.train.engine import parallelize  # noqa: PLC0415 (imports deepspeed)
    from megascale.train.loop import make_groups  # noqa: PLC0415

    if ctx.world_size % (tp * pp):
        raise MegascaleError(f"{ctx.world_size} process{'es' * (ctx.world_size != 1)} for --tp {tp} × --pp {pp}; launch a multiple "
                             f"of tp × pp = {tp * pp} (the copies beyond one share the prompts or samples)")
    cfg = Config(model=src.cfg, parallel=ParallelConfig(tp=tp, pp=pp))
    groups = make_groups(cfg, ctx)
    module = parallelize(model, cfg, groups, ctx.device, weights=src.weights).to(dtype).eval()
    if pp == 1:
        return module, Replicas.of(groups)
    from megascale.parallel.pipeline_infer import PipelinedLM  # noqa: PLC0415 (the pipeline imports Triton)

    return PipelinedLM(module, groups, model.cfg, model.plan, model.full_logits).eval(), Replicas.of(groups)


@dataclass
class _Source:
    """What a checkpoint or Hugging Face directory holds for a Generator."""

    cfg: ModelConfig
    weights: Mapping[str, torch.Tensor]  # full plain-model weights by name, read when indexed
    tokenizer: Path
    finetune: dict | None  # the fine-tune record (separators), if any
    name: str  # "<dir> (step N)"
    data_dirs: tuple[Path, ...] = ()
    seq_len: int | None = None


def _checkpoint_source(spec: Path) -> _Source:
    """A megascale checkpoint saved under any layout."""
    from megascale.export.hf import model_config_of  # noqa: PLC0415
    from megascale.train.checkpoint import lazy_full_weights, read_meta, resolve_checkpoint, tokenizer_path  # noqa: PLC0415

    path = resolve_checkpoint(str(spec), spec)
    if path is None:
        raise MegascaleError(f"{spec} holds no checkpoint yet; pass a step_* directory, a checkpoints/ directory or a run directory")
    meta = read_meta(path)
    data, dirs = meta.get("data", {}), ()
    if "finetune" not in meta:  # a fine-tune's data are its examples, not token files
        dirs = tuple(Path(p) for _, p in data["blend"]) if "blend" in data else (Path(data["path"]),) if "path" in data else ()
    return _Source(model_config_of(meta), lazy_full_weights(path, meta), tokenizer_path(path, meta), meta.get("finetune"),
                   f"{path} (step {meta.get('step')})", dirs, meta["config"]["data"]["seq_len"])


def _hf_source(directory: Path) -> _Source:
    """A Hugging Face Llama directory; megascale.json (an export's) names the step and any fine-tune."""
    import json  # noqa: PLC0415

    from megascale.export.hf import TOKENIZER_NAME, lazy_hf_weights  # noqa: PLC0415

    overrides, weights = lazy_hf_weights(directory)
    if not (directory / TOKENIZER_NAME).is_file():
        raise MegascaleError(f"{directory} has no {TOKENIZER_NAME}: generation reads sentencepiece tokenizers; "
                             "pass a megascale export (launch/export_hf.py) or put the model's tokenizer.model there")
    note_path = directory / "megascale.json"
    note = json.loads(note_path.read_text()) if note_path.is_file() else {}
    step = f" (exported at step {note['step']})" if "step" in note else ""
    return _Source(ModelConfig(**overrides, attention="torch"), weights, directory / TOKENIZER_NAME,
                   note.get("finetune"), f"{directory}{step}")
