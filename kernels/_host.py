"""Host-side helpers shared by the kernels' launchers (no Triton, no torch)."""

from __future__ import annotations

import math
import os

ORDER_HEADS_ENV = "MEGASCALE_ATTN_ORDER_HEADS"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): ``triton.next_power_of_2`` for host code.

    Triton's own is a ``constexpr_function`` (3.6, 3.9): 1.4 us a call from Python on this
    repository's CPU machine, against 0.03 us for this. The launchers call it on every
    launch (block widths, autotuning buckets, padded table lengths).
    """
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def order_heads(n_heads: int, most: int | None = None) -> int:
    """Heads whose blocks an attention kernel launches together, heaviest block first (``attention_gluon._lpt_block``,
    ``attention._launch_order``): the largest power of two up to ``most`` that divides ``n_heads`` (B · H, or
    B · H_kv for a backward's key blocks), so that the grid's groups are whole and the kernels' division a shift.

    ``most``: 8, or ``MEGASCALE_ATTN_ORDER_HEADS`` where set, for a benchmark's A/B: 1 is head by head, the
    order before 2026-11-27 (``bench/gpu_session.py``'s ``attention_gluon_order1`` job).
    """
    if most is None:
        value = os.environ.get(ORDER_HEADS_ENV, "8")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ORDER_HEADS_ENV} must be a positive integer (1: head by head), got {value!r}")
        most = int(value)
    return math.gcd(n_heads, 1 << (most.bit_length() - 1))
