"""Export a megascale checkpoint as a Hugging Face ``transformers`` Llama directory.

    python launch/export_hf.py --checkpoint runs/tiny/checkpoints --out exports/tiny-hf

The checkpoint may be saved under any (tp, pp, dp) layout and ZeRO stage, tied or
untied. Tied blocks are expanded (layer i gets a copy of its group's block), so
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads a plain Llama with
one block per applied layer; the sentencepiece tokenizer is copied alongside and
loads with ``AutoTokenizer.from_pretrained(OUT)``. OUT/megascale.json records the
source checkpoint, step, sharing plan and untie history.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_* directory, a checkpoints/ directory or a run directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (new, empty, or an earlier export to overwrite)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="sentencepiece tokenizer.model to ship (default: the one recorded in the checkpoint)")
    args = p.parse_args(argv)

    from megascale.export import export_hf

    out = export_hf(Path(args.checkpoint), args.out, tokenizer=args.tokenizer)
    note = json.loads((out / "megascale.json").read_text())
    config = json.loads((out / "config.json").read_text())
    print(f"{note['source']} (step {note['step']}, layout {note['layout']}, sharing plan {note['sharing_plan']}) -> {out}")
    print(f"  {note['applied_layers']} applied layers from {note['unique_blocks']} unique blocks (tied blocks expanded), "
          f"d_model {config['hidden_size']}, vocab {config['vocab_size']}, tie_word_embeddings {config['tie_word_embeddings']}")
    for name in note["files"] + ["megascale.json"]:
        print(f"  {name:24s} {(out / name).stat().st_size:>14,d} bytes")
    print(f"load with: transformers.AutoModelForCausalLM.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
