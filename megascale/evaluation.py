"""A model's loss on prepared token files (``launch/evaluate.py``): nats per token, perplexity, bits per byte.

The samples are those training's validation reads: windows of ``seq_len + 1`` tokens at
stride ``seq_len``, the first ``max_samples`` of the split, so a checkpoint scored on its
own validation split with the run's batch count gives the run's logged ``val_loss``.
Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens decode to,
which compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megascale.data import Tokenizer, TokenFile, batch_from_indices, load_manifest, require_tokenizer
from megascale.errors import MegascaleError
from megascale.model.generate import reduce_logits
from megascale.parallel.topology import Replicas


@dataclass(frozen=True)
class Score:
    data: str
    split: str
    seq_len: int
    samples: int
    tokens: int
    bytes: int
    loss: float  # mean nats per scored token

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / max(1, self.bytes)

    def to_dict(self) -> dict:
        return asdict(self) | {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def open_split(data_dir: Path, split: str, tokenizer: Tokenizer) -> TokenFile:
    """``data_dir``'s ``split`` token file, refused in one line if another tokenizer wrote it."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise MegascaleError(f"{data_dir} has no '{split}' split; use one of {', '.join(manifest['splits'])}")
    require_tokenizer(data_dir, tokenizer.path, f"the model's ({tokenizer.path})")
    return TokenFile(data_dir / manifest["splits"][split]["prefix"])


@torch.no_grad()
def score(model, tokenizer: Tokenizer, data_dir: Path, split: str, seq_len: int, max_samples: int,
          batch_size: int, replicas: Replicas = Replicas()) -> Score:
    """Mean next-token loss of ``model`` over the first ``max_samples`` windows of ``data_dir``'s ``split``;
    ``replicas`` share the batches (the same score on every rank)."""
    file = open_split(data_dir, split, tokenizer)
    n = min(max_samples, file.num_samples(seq_len))
    if n == 0:
        raise MegascaleError(f"{data_dir} '{split}' holds no window of {seq_len + 1} tokens; lower --seq-len")
    device = next(model.parameters()).device
    like = torch.zeros((), dtype=torch.float32, device=device)
    total, tokens, nbytes = 0.0, 0, 0
    for b in replicas.mine(-(-n // batch_size)):
        start = b * batch_size
        inputs, targets = batch_from_indices(file, range(start, min(n, start + batch_size)), seq_len)  # (B, T) each
        targets = targets.to(device)

        def summed(logits: torch.Tensor) -> torch.Tensor:  # (B, T, V) → the batch's summed loss; a pipeline's last stage runs it
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")

        total += reduce_logits(model, summed, like, inputs.to(device)).item()
        tokens += targets.numel()
        nbytes += sum(len(tokenizer.decode(row).encode("utf-8")) for row in targets.tolist())
    total, tokens, nbytes = replicas.sum([total, tokens, nbytes], device)
    tokens, nbytes = int(tokens), int(nbytes)
    return Score(str(data_dir), split, seq_len, n, tokens, nbytes, total / tokens)
