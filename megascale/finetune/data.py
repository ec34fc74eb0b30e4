"""Trace fine-tuning data: JSONL examples → template with separator tokens → per-token roles → packed rows.

The template (one example; ``⟨q⟩ ⟨t⟩ ⟨s⟩ ⟨r⟩`` are the separator tokens, ``eos`` the tokenizer's)::

    ⟨q⟩ query ⟨t⟩ step_1 ⟨s⟩ step_2 ⟨s⟩ … step_n ⟨r⟩ response eos
    └──── role: query ────┘└──────── role: trace ────────┘└ response ┘

Roles are those of the *target* token at each position: the model is given
``⟨q⟩ query ⟨t⟩`` (the prompt) and must produce the trace, the ``⟨r⟩`` that ends
it, the response and ``eos``. Query tokens — and padding — carry weight 0;
trace tokens (and ``⟨r⟩``) ``finetune.trace_weight``; response tokens (and
``eos``) ``finetune.response_weight``. With ``trace_in_input=False`` the trace
is dropped and ``⟨r⟩`` joins the prompt (the direct-answer baseline).

Separator tokens: sentencepiece cannot add pieces to a trained model, so the
separators are new ids just past the checkpoint's vocabulary; the embedding and
LM head grow by a block of 64 rows (a multiple of 64 keeps the vocabulary
divisible by any tp up to 64) initialised to the mean of the existing rows, so
a new token starts as an "average" token instead of a random direction (see
``extend_vocab``). Rows beyond the four separators are never used.

Packing: examples are laid end to end in rows of ``seq_len + 1`` tokens in file
order; an example that does not fit starts a new row, the rest is padding.
Each token carries its example's id (attention is block-diagonal causal) and
its position within the example (RoPE restarts at 0), so a token's output does
not depend on what is packed beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megascale.data import Tokenizer
from megascale.errors import MegascaleError
from megascale.finetune.arithmetic import Example

log = logging.getLogger(__name__)

PAD, QUERY, TRACE, RESPONSE = 0, 1, 2, 3  # per-token roles
ROLE_NAMES = ("pad", "query", "trace", "response")
SEPARATORS = ("<|query|>", "<|trace|>", "<|step|>", "<|response|>")
VOCAB_BLOCK = 64


# ------------------------------------------------------------------ vocabulary


def extended_vocab_size(base: int) -> int:
    """The checkpoint's vocabulary plus the separators, rounded up to a multiple of 64."""
    return -(-(base + len(SEPARATORS)) // VOCAB_BLOCK) * VOCAB_BLOCK


def extend_vocab(state, new_size: int):
    """Grow ``embed.weight`` and ``lm_head.weight`` to ``new_size`` rows, new rows = mean of the old ones.

    The mean embedding is a neutral start (the new tokens' inputs look like an average
    token; their logits start at the mean logit rather than a random one). A tied head
    (the same tensor) stays tied.
    """
    grown: dict[int, torch.Tensor] = {}
    values = {}
    for key in ("embed.weight", "lm_head.weight"):
        w = state[key]
        if id(w) not in grown:
            extra = w.mean(dim=0, keepdim=True).expand(new_size - w.shape[0], -1)
            grown[id(w)] = torch.cat([w, extra], dim=0)
        values[key] = grown[id(w)]
    # Lazy checkpoint weights (train.checkpoint.LazyWeights) stay lazy: only these two are read.
    return state.replaced(values) if hasattr(state, "replaced") else {**state, **values}


@dataclass(frozen=True)
class Template:
    """Token ids of the separators and how an example becomes ids and roles."""

    tokenizer: Tokenizer
    base_vocab: int
    trace_in_input: bool = True

    @property
    def query_id(self) -> int:
        return self.base_vocab

    @property
    def trace_id(self) -> int:
        return self.base_vocab + 1

    @property
    def step_id(self) -> int:
        return self.base_vocab + 2

    @property
    def response_id(self) -> int:
        return self.base_vocab + 3

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def prompt(self, ex: Example) -> list[int]:
        """What the model is given at evaluation: ⟨q⟩ query ⟨t⟩ (and ⟨r⟩ without a trace)."""
        ids = [self.query_id, *self.tokenizer.encode(ex.query), self.trace_id]
        return ids if self.trace_in_input else ids + [self.response_id]

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        """(token ids, role of each token as a *target*) for a whole example."""
        prompt = self.prompt(ex)
        ids, roles = list(prompt), [QUERY] * len(prompt)
        if self.trace_in_input:
            for i, step in enumerate(ex.trace):
                piece = ([self.step_id] if i else []) + self.tokenizer.encode(step)
                ids += piece
                roles += [TRACE] * len(piece)
            ids.append(self.response_id)
            roles.append(TRACE)  # deciding that the trace is over is part of the trace
        answer = self.tokenizer.encode(ex.response) + [self.eos_id]
        return ids + answer, roles + [RESPONSE] * len(answer)

    def split_generation(self, ids: list[int]) -> tuple[list[str], str]:
        """Generated ids (after the prompt, eos removed) → (trace steps, response text)."""
        if self.trace_in_input:
            trace, response = (ids[: ids.index(self.response_id)], ids[ids.index(self.response_id) + 1 :]) \
                if self.response_id in ids else (ids, [])
        else:
            trace, response = [], ids
        steps, current = [], []
        for t in trace + [self.step_id]:
            if t == self.step_id:
                steps.append(self._decode(current))
                current = []
            else:
                current.append(t)
        return (steps if trace else []), self._decode(response)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size]).strip()


# ------------------------------------------------------------------ reading


class BadExample(MegascaleError):
    pass


def parse_line(line: str, where: str) -> Example:
    """One JSONL line → Example; raise BadExample naming ``where`` (file:line) and what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadExample(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise BadExample(f"{where}: expected a JSON object with query, trace, response")
    missing = [k for k in ("query", "trace", "response") if k not in obj]
    if missing:
        raise BadExample(f"{where}: missing field(s) {', '.join(missing)}")
    query, trace, response = obj["query"], obj["trace"], obj["response"]
    if isinstance(trace, str):
        trace = [s for s in trace.split("\n") if s.strip()]
    if not (isinstance(query, str) and isinstance(response, str) and isinstance(trace, list)
            and all(isinstance(s, str) for s in trace)):
        raise BadExample(f"{where}: query and response must be strings, trace a string or a list of strings")
    if not query.strip() or not response.strip():
        raise BadExample(f"{where}: empty query or response")
    return Example(query, tuple(trace), response)


def read_jsonl(path: Path, skip_bad: bool) -> tuple[list[Example], int]:
    """Examples of a JSONL file and the number of bad lines skipped (``skip_bad``) — else the first bad line stops."""
    if not path.is_file():
        raise MegascaleError(f"fine-tuning data {path} does not exist; fix finetune.train_file / finetune.eval_file")
    examples, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_line(line, f"{path}:{number}"))
            except BadExample as err:
                if not skip_bad:
                    raise MegascaleError(f"{err}; fix the line or set finetune.skip_bad_examples=true") from None
                bad += 1
                log.warning("skipping bad example %s", err)
    return examples, bad


# ------------------------------------------------------------------ packing


@dataclass
class PackedRows:
    """Rows of seq_len + 1 tokens with roles, example ids and positions (numpy, int64)."""

    tokens: np.ndarray  # (N, L+1)
    roles: np.ndarray  # (N, L+1)
    docs: np.ndarray  # (N, L+1): example index within the row, -1 for padding
    positions: np.ndarray  # (N, L+1)
    weights_by_role: tuple[float, float, float, float]

    def num_samples(self, seq_len: int) -> int:  # the DistributedBatchSampler's view
        return len(self.tokens)

    def batch(self, indices) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, weights, doc_ids, positions), each (B, L); the engine's forward arguments."""
        idx = np.asarray(indices, dtype=np.int64)
        tok, roles = torch.from_numpy(self.tokens[idx]), torch.from_numpy(self.roles[idx])
        weights = torch.tensor(self.weights_by_role, dtype=torch.float32)[roles[:, 1:]]
        docs, pos = torch.from_numpy(self.docs[idx]), torch.from_numpy(self.positions[idx])
        return tok[:, :-1], tok[:, 1:], weights, docs[:, :-1], pos[:, :-1]


def pack(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packing: bool,
         weights_by_role: tuple[float, float, float, float]) -> PackedRows:
    """Lay examples into rows of ``seq_len + 1`` (several per row when ``packing``, else one)."""
    width = seq_len + 1
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = width
    for ids, roles in encoded:
        if not packing or used + len(ids) > width:
            rows.append([])
            used = 0
        rows[-1].append((ids, roles))
        used += len(ids)
    n = len(rows)
    tokens = np.full((n, width), pad_id, dtype=np.int64)
    role_arr = np.full((n, width), PAD, dtype=np.int64)
    docs = np.full((n, width), -1, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for d, (ids, roles) in enumerate(row):
            end = start + len(ids)
            tokens[r, start:end], role_arr[r, start:end] = ids, roles
            docs[r, start:end], pos[r, start:end] = d, np.arange(len(ids))
            start = end
    return PackedRows(tokens, role_arr, docs, pos, weights_by_role)


def encode_all(examples: list[Example], template: Template, seq_len: int, skip_bad: bool,
               source: str) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encode examples; one longer than seq_len + 1 is bad (stops, or is skipped and counted)."""
    out, too_long = [], 0
    for i, ex in enumerate(examples):
        ids, roles = template.encode(ex)
        if len(ids) > seq_len + 1:
            if not skip_bad:
                raise MegascaleError(
                    f"{source} example {i + 1} has {len(ids)} tokens, more than data.seq_len+1={seq_len + 1}; "
                    f"raise data.seq_len, shorten it, or set finetune.skip_bad_examples=true"
                )
            too_long += 1
            continue
        out.append((ids, roles))
    return out, too_long


def weights_by_role(trace_weight: float, response_weight: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, float(trace_weight), float(response_weight))  # indexed by PAD, QUERY, TRACE, RESPONSE


def describe_rows(rows: PackedRows) -> dict[str, Any]:
    counts = np.bincount(rows.roles.reshape(-1), minlength=4)
    return {"rows": len(rows.tokens), **{f"tokens_{ROLE_NAMES[r]}": int(counts[r]) for r in range(4)}}
