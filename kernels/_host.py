"""Host-side helpers shared by the kernels' launchers (no Triton, no torch)."""

from __future__ import annotations

import math


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): ``triton.next_power_of_2`` for host code.

    Triton's own is a ``constexpr_function`` (3.6, 3.9): 1.4 us a call from Python on this
    repository's CPU machine, against 0.03 us for this. The launchers call it on every
    launch (block widths, autotuning buckets, padded table lengths).
    """
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def order_heads(n_heads: int, most: int = 8) -> int:
    """Heads whose blocks an attention kernel launches together, heaviest block first (``attention_gluon._lpt_block``,
    ``attention._launch_order``): the largest power of two up to ``most`` that divides ``n_heads`` (B · H, or
    B · H_kv for a backward's key blocks), so that the grid's groups are whole and the kernels' division a shift."""
    return math.gcd(n_heads, most)
