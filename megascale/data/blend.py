"""A weighted mix of prepared corpora (Megatron's blended datasets), sampled like one token file.

``data.blend = "0.7 data/web, 0.3 data/code"``: sample v of the blend comes from part d
with frequency w_d. The blend has as many samples as its parts together (N = Σ n_d), so
part d appears T_d ≈ w_d·N times: a part weighted above its size repeats, one weighted
below it is thinned (N is rounded down to whole blocks, a few thousand samples at most). Its k-th
appearance is its sample ⌊k·n_d / T_d⌋, which spreads a
thinned part's samples evenly over the whole corpus and repeats a small part's evenly.

Epochs: sample i of epoch e is blend index e·N + i (the sampler hands out such indices
for a blend), and each part's samples there are shifted by e. A part thinned to every
r-th sample is then read whole within ⌈r⌉ epochs, as Megatron's blend reads on into a
dataset's next epoch, instead of the same 1/r of it every time.

The interleaving is exact and needs no index over N samples: the blend is cut into
blocks of ``block`` samples, part d's count at each block boundary is w_d times the
position rounded by largest remainder (so every prefix holds each part within a couple
of samples of its weight), and inside a block the parts' samples are laid out in the
order of their ideal times (k + ½) / c_d. A sample is found from its block alone, in
O(block) work, which is what the sampler's shuffled indices need. Nothing here depends
on the order the sampler asks in, so the mix is the same on every layout and resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from megascale.data.tokens import TokenFile
from megascale.errors import MegascaleError

BLOCK = 4096  # samples per block; raised for weights below 2 / BLOCK so every block's quotas stay >= 0


@dataclass(frozen=True)
class BlendPart:
    weight: float  # normalised: the parts' weights sum to 1
    path: Path


def parse_blend(spec: str) -> list[BlendPart]:
    """'0.7 data/web, 0.3 data/code' → parts with weights normalised to sum 1; one-line errors."""
    parts = []
    for item in (x.strip() for x in spec.split(",")):
        fields = item.split(maxsplit=1)
        if len(fields) != 2:
            raise MegascaleError(f"data.blend='{spec}': '{item}' is not 'WEIGHT PATH'; write e.g. data.blend='0.7 data/web, 0.3 data/code'")
        try:
            weight = float(fields[0])
        except ValueError:
            raise MegascaleError(f"data.blend='{spec}': '{fields[0]}' is not a number; write e.g. data.blend='0.7 data/web, 0.3 data/code'") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise MegascaleError(f"data.blend='{spec}': the weight of {fields[1]} must be positive, got {fields[0]}")
        parts.append((weight, Path(fields[1])))
    if len({p for _, p in parts}) != len(parts):
        raise MegascaleError(f"data.blend='{spec}' names a directory twice; give each corpus once, with its total weight")
    total = sum(w for w, _ in parts)
    return [BlendPart(w / total, p) for w, p in parts]


@dataclass(frozen=True)
class _Shape:
    """A blend at one sample length."""

    sizes: list[int]  # each part's samples (n_d)
    n: int  # the blend's samples
    weights: bytes  # float64 weights over the parts that hold a sample (the caches' key)
    counts: np.ndarray  # each part's appearances (T_d)


class Blend:
    """Token files mixed by weight, with TokenFile's ``num_samples`` / ``sample`` interface."""

    def __init__(self, files: list[TokenFile], weights: list[float], block: int = BLOCK):
        if len(files) != len(weights) or not files:
            raise ValueError("one weight per file, at least one file")
        self.files = files
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.block = max(block, math.ceil(2 / float(self.weights.min())))
        self._shapes: dict[int, _Shape] = {}  # per seq_len: what every sample's lookup reads

    def __repr__(self) -> str:
        return "Blend(" + ", ".join(f"{w:.3g} {f!r}" for w, f in zip(self.weights, self.files)) + ")"

    def num_samples(self, seq_len: int) -> int:
        """Σ n_d, down to whole blocks (under one block's worth: all of it, one block)."""
        return self._shape(seq_len).n

    def _shape(self, seq_len: int) -> _Shape:
        if seq_len not in self._shapes:
            sizes = [f.num_samples(seq_len) for f in self.files]
            total = sum(sizes)
            n = total if total < self.block else total - total % self.block
            # renormalised over the parts that hold a sample of this length (a small part's validation split may not)
            w = self.weights * (np.array(sizes) > 0)
            weights = (w / w.sum() if w.sum() else w).tobytes()
            counts = _quota(weights, n, self.block, math.ceil(n / self.block))
            self._shapes[seq_len] = _Shape(sizes, n, weights, counts)
        return self._shapes[seq_len]

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """Sample ``i`` of the blend: seq_len + 1 tokens of one part."""
        part, local = self.locate(i, seq_len)
        return self.files[part].sample(local, seq_len)

    def locate(self, i: int, seq_len: int) -> tuple[int, int]:
        """(part, the part's sample index) of blend sample ``i`` (epoch i // N, see the module docstring)."""
        shape = self._shape(seq_len)
        if i < 0:
            raise IndexError(f"sample {i} out of range for {shape.n} samples of length {seq_len}")
        epoch, i = divmod(i, shape.n)
        b, offset = divmod(i, self.block)
        parts, occurrence = _block_layout(shape.weights, shape.n, self.block, b)
        part, k = int(parts[offset]), int(occurrence[offset])
        size = shape.sizes[part]
        return part, (k * size // int(shape.counts[part]) + epoch) % size

    def counts(self, seq_len: int) -> np.ndarray:
        """Appearances of each part in the blend (T_d)."""
        return self._shape(seq_len).counts


@lru_cache(maxsize=4096)
def _quota(weights: bytes, n: int, block: int, b: int) -> np.ndarray:
    """Each part's appearances among the first min(b·block, n) samples: weight × position, rounded by
    largest remainder so the counts sum to the position exactly. Boundaries lie ``block`` apart (n is
    whole blocks, or less than one), each part gains >= 2·block·w >= 2 targets a block, so no count
    ever falls from one boundary to the next."""
    w = np.frombuffer(weights, dtype=np.float64)
    position = min(b * block, n)
    target = w * position
    counts = np.floor(target).astype(np.int64)
    short = position - int(counts.sum())
    if short:
        counts[np.argsort(-(target - counts), kind="stable")[:short]] += 1
    return counts


@lru_cache(maxsize=64)
def _block_layout(weights: bytes, n: int, block: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``b``'s samples: (part of each, that part's appearance count before it, over the whole blend)."""
    start, end = _quota(weights, n, block, b), _quota(weights, n, block, b + 1)
    here = end - start  # each part's samples in this block (>= 0, see _quota)
    parts = np.repeat(np.arange(len(here)), here)
    k = np.concatenate([np.arange(c) for c in here]) if len(parts) else np.zeros(0, dtype=np.int64)
    ideal = (k + 0.5) / np.repeat(here, here)  # spread each part evenly over the block
    order = np.lexsort((parts, ideal))
    return parts[order], (k + np.repeat(start, here))[order]
