"""Decoding: the greedy end-of-run sample, and batched KV-cache generation (evaluation, launch/generate.py).

Both work on a plain model (any tensor-parallel rank) and on a pipelined one
(megascale.parallel.pipeline_infer.PipelinedLM) through ``reduce_logits``. The next
token is the argmax, or a draw set by ``Sampling`` (temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megascale.errors import MegascaleError
from megascale.model.llama import LayerKV, Transformer


def reduce_logits(model, fn: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, tokens: torch.Tensor,
                  **kwargs) -> torch.Tensor:
    """``fn(logits)`` for the model's full-vocabulary logits on ``tokens`` (forward ``kwargs``: positions, mask, cache).

    A plain model applies ``fn`` itself. A pipelined model applies it on its last stage and
    hands every stage the result, shaped and typed like ``like``: next token ids or a few
    sums instead of (B, T, V) logits.
    """
    if hasattr(model, "reduce_logits"):
        return model.reduce_logits(fn, like, tokens, **kwargs)
    return fn(model(tokens, **kwargs))


def last_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) → the greedy next token of each row, (B,)."""
    return logits[:, -1].argmax(-1)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits: the argmax at temperature 0, else a draw.

    A draw is from softmax(logits / temperature), cut to the ``top_k`` most likely ids (0: no
    cut) and to the nucleus: the fewest most likely ids whose probability reaches ``top_p``
    (1: no cut), in that order, as Hugging Face's warpers apply them. Ties at the k-th logit stay.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if not self.temperature >= 0:
            raise MegascaleError(f"--temperature {self.temperature}: use 0 (greedy) or a positive number")
        if self.top_k < 0:
            raise MegascaleError(f"--top-k {self.top_k}: use 0 (every token) or a positive count")
        if not 0 < self.top_p <= 1:
            raise MegascaleError(f"--top-p {self.top_p}: use a probability in (0, 1]; 1 keeps every token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        cuts = [f"top-k {self.top_k}"] * bool(self.top_k) + [f"top-p {self.top_p:g}"] * (self.top_p < 1)
        return ", ".join([f"sampled at temperature {self.temperature:g}", *cuts])

    def picker(self, valid: int | None = None, generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """(B, T, V) logits → the next id of each row, (B,), among ids below ``valid`` (default: all).

        ``valid`` keeps out the rows a vocabulary is padded with (fine-tuning rounds it up to a
        multiple of 64); draws come from ``generator``, so a seed fixes them.
        """
        def pick(logits: torch.Tensor) -> torch.Tensor:
            last = logits[:, -1, :valid].float()  # (B, V')
            return last.argmax(-1) if self.greedy else self._draw(last, generator)

        return pick

    def _draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = logits / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = x.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            before = probs.cumsum(-1) - probs  # the mass of the more likely ids: 0 for the first, always kept
            ordered = ordered.masked_fill(before >= self.top_p, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, ordered)
        return torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def greedy_generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
    """Append ``max_new_tokens`` argmax tokens to ``prompt``; the window slides past max_seq_len."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    like = torch.empty(1, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        window = tokens[:, -model.cfg.max_seq_len :]
        next_id = reduce_logits(model, last_argmax, like, window)[:, None]  # (1, 1)
        tokens = torch.cat([tokens, next_id], dim=1)
        if stop_id is not None and int(next_id) == stop_id:
            break
    return tokens[0, len(prompt) :].tolist()


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_id: int,
    pad_id: int = 0,
    stop_early: bool = True,
    pick: Callable[[torch.Tensor], torch.Tensor] = last_argmax,
) -> list[list[int]]:
    """Continuations of many prompts at once, with a KV cache; each stops after ``stop_id`` (not returned).

    ``pick`` chooses each row's next token from the (B, T, V) logits: greedy by default,
    ``Sampling(...).picker(...)`` to draw.

    Prompts of different lengths are left-padded: every row's next token is then at
    the last column. Padding is kept out of attention by an explicit mask (a padded
    key is never attended; a pad query attends to itself only, so no row is empty),
    and positions count real tokens only, so a row's output equals decoding it alone.
    ``stop_early=False`` always runs ``max_new_tokens`` forwards (ZeRO-3 needs every
    data-parallel rank to run the same number of collective forwards).
    """
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        valid[row, P - len(prompt) :] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, P): 0 at each row's first real token
    eye = torch.eye(P, dtype=torch.bool, device=device)
    mask = (valid[:, None, None, :] & torch.ones(P, P, dtype=torch.bool, device=device).tril()) | eye  # (B, 1, P, P)
    cache = [LayerKV() for _ in model.plan.group_of]
    like = torch.empty(B, dtype=torch.long, device=device)
    chosen = reduce_logits(model, pick, like, tokens, positions=positions, mask=mask, cache=cache)  # (B,)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        nxt = chosen.masked_fill(done, pad_id)  # (B,)
        out.append(nxt)
        done |= nxt == stop_id
        if step == max_new_tokens - 1 or (stop_early and bool(done.all())):
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        chosen = reduce_logits(model, pick, like, nxt[:, None], positions=next_pos, mask=valid[:, None, None, :],
                               cache=cache)
        next_pos = next_pos + 1
    generated = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in generated]
