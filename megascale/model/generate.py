"""Greedy decoding for the end-of-run sample (a KV-cache generator arrives with trace fine-tuning)."""

from __future__ import annotations

import torch

from megascale.model.llama import Transformer


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
