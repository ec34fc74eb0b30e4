"""How much of a causal attention kernel's time its launch order loses to the tail: a list-scheduling model.

    python bench/launch_order.py                       # the forward, 16,384 tokens a call, 132 SMs, one block each
    python bench/launch_order.py --sms 132 --heads-together 4,8,16

A model, not a measurement: the GPU starts blocks in the order of their linear index
(x fastest), each on the first SM that frees up, and a causal block's time is its
number of key blocks (query block m of 128 rows: m + 1 blocks of 128 keys) plus one
for its start and end. It compares the makespan against the work divided evenly over
the SMs, for

* ``head-major``: the order until 2026-11-27, head by head, each head's query blocks
  heaviest first (grid (query blocks, B·H) with program_id(0) the reversed block);
* ``grouped G``: ``kernels/attention_gluon.py``'s ``_lpt_block``: heads G at a time,
  within a group block by block, heaviest first, each over the group's heads.

The backward's key blocks mirror the forward's query blocks (the first ones see the
most queries), so the same figures hold for it.

The persistent forward (``attention_gluon``'s PERSISTENT: one block an SM, each taking
query blocks in turn in the grouped order) gets two more rows: ``persistent in turn``,
block p taking tiles p, p + SMs, ... (the kernel until 2026-11-28), and ``persistent
scheduled``, the tiles the host hands out (``attention_gluon.persistent_schedule``).
"""

from __future__ import annotations

import argparse
import heapq

from _common import checkout_kernels


def makespan(durations: list[float], sms: int) -> float:
    """When the last block ends, each block started in order on the first free SM."""
    free = [0.0] * sms
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def block_time(m: int) -> float:
    """Causal query block m (128 rows): its m + 1 key blocks (128 keys each), and one for its start and end."""
    return m + 2.0


def orders(n_blocks: int, n_heads: int, together: list[int]) -> dict[str, list[float]]:
    """Each launch order's block times, in launch order (heaviest block: n_blocks - 1)."""
    heaviest_first = [block_time(n_blocks - 1 - i) for i in range(n_blocks)]
    out = {"head-major": [t for _ in range(n_heads) for t in heaviest_first]}
    for g in together:
        out[f"grouped {g}"] = [t for first in range(0, n_heads, g) for t in heaviest_first
                               for _ in range(min(g, n_heads - first))]
    return out


def persistent(gluon, T: int, n_heads: int, sms: int, ideal: float) -> dict[str, float]:
    """The persistent forward's share lost to its last block, its tiles (128 x 128, causal, 8 heads together) taken
    in turn and as ``persistent_schedule`` (of the ``attention_gluon`` module ``gluon``) hands them out (each tile's
    key blocks + 1, as ``block_time``)."""
    costs = gluon.tile_costs(T, 128, 128, n_heads, gluon.order_heads(n_heads, 8), True)
    blocks = min(sms, len(costs))
    scheduled = gluon.persistent_schedule(costs, blocks)
    return {"persistent in turn": 1 - ideal / max(sum(costs[p::blocks]) for p in range(blocks)),
            "persistent scheduled": 1 - ideal / max(sum(costs[t] for t in tiles) for tiles in scheduled)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens a call (B = tokens / T)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (model dim 2048 / head dim 128)")
    p.add_argument("--lengths", default="2048,4096,8192,16384")
    p.add_argument("--sms", type=int, default=132, help="blocks running at once (H100/H200 SMs, one block each)")
    p.add_argument("--heads-together", default="8", help="group sizes G to model")
    args = p.parse_args(argv)
    rows, (gluon,) = [], checkout_kernels("attention_gluon")
    for T in map(int, args.lengths.split(",")):
        n_blocks, n_heads = T // 128, (args.tokens // T) * args.heads
        timings = orders(n_blocks, n_heads, [int(g) for g in args.heads_together.split(",")])
        ideal = sum(timings["head-major"]) / args.sms
        row = {"T": T, **{name: 1 - ideal / makespan(d, args.sms) for name, d in timings.items()},
               **persistent(gluon, T, n_heads, args.sms, ideal)}
        rows.append(row)
        print(f"T={T:>6}  " + "  ".join(f"{name}: {lost:5.1%} lost" for name, lost in row.items() if name != "T"))
    return rows


if __name__ == "__main__":
    main()
