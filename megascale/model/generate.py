"""Greedy decoding: the simple end-of-run sample, and batched KV-cache generation for evaluation.

Both work on a plain model (any tensor-parallel rank) and on a pipelined one
(megascale.parallel.pipeline_infer.PipelinedLM) through ``reduce_logits``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
) -> list[list[int]]:
    """Greedy continuations of many prompts at once, with a KV cache; each stops after ``stop_id`` (not returned).

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
    greedy = reduce_logits(model, last_argmax, like, tokens, positions=positions, mask=mask, cache=cache)  # (B,)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        nxt = greedy.masked_fill(done, pad_id)  # (B,)
        out.append(nxt)
        done |= nxt == stop_id
        if step == max_new_tokens - 1 or (stop_early and bool(done.all())):
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        greedy = reduce_logits(model, last_argmax, like, nxt[:, None], positions=next_pos, mask=valid[:, None, None, :],
                               cache=cache)
        next_pos = next_pos + 1
    generated = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in generated]
