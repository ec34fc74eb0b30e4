"""Write the full fp32 weights of a megascale checkpoint saved under any layout to one file.

    python launch/consolidate.py --checkpoint runs/tiny/checkpoints --out model_fp32.pt

DeepSpeed's own ``zero_to_fp32.py`` (copied into every checkpoints/ directory)
reads data-parallel ZeRO checkpoints; it cannot merge tensor- or pipeline-parallel
shards. This does: pipeline layer files are mapped back to the model's names and
tensor-parallel shards are concatenated along the dimension they were split on.
The result is the plain ``Transformer`` state dict (``torch.load`` + ``load_state_dict``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_* directory, a checkpoints/ directory or a run directory")
    p.add_argument("--out", required=True, type=Path, help="output .pt file")
    args = p.parse_args(argv)

    import torch

    from megascale.train.checkpoint import full_weights, read_meta, resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint, Path(args.checkpoint))
    meta = read_meta(path)
    state = full_weights(path, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    n = sum(t.numel() for name, t in state.items() if not (meta["config"]["model"]["tie_embeddings"] and name == "lm_head.weight"))
    print(f"{path} (layout {meta.get('layout')}, step {meta['step']}) -> {args.out}: {len(state)} tensors, {n:,} parameters")
    return 0


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
