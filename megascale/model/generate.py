"""Greedy decoding: the simple end-of-run sample, and batched KV-cache generation for evaluation."""

from __future__ import annotations

import torch

from megascale.model.llama import LayerKV, Transformer


@torch.no_grad()
def greedy_generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop_id: int | None = None) -> list[int]:
    """Append ``max_new_tokens`` argmax tokens to ``prompt``; the window slides past max_seq_len."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        window = tokens[:, -model.cfg.max_seq_len :]
        next_id = model(window)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
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
    logits = model(tokens, positions=positions, mask=mask, cache=cache)[:, -1]  # (B, V)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(done, pad_id)  # (B,)
        out.append(nxt)
        done |= nxt == stop_id
        if step == max_new_tokens - 1 or (stop_early and bool(done.all())):
            break
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        logits = model(nxt[:, None], positions=next_pos, mask=valid[:, None, None, :], cache=cache)[:, -1]
        next_pos = next_pos + 1
    generated = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [row[: row.index(stop_id)] if stop_id in row else row for row in generated]
