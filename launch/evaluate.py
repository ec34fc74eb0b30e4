"""Score a checkpoint on prepared data: loss (nats/token), perplexity and bits per byte, per corpus.

    python launch/evaluate.py --checkpoint runs/tiny                       # its own validation data
    python launch/evaluate.py --checkpoint CKPT --data data/web --data data/code --samples 1024 --json scores.json

One process, or any multiple of tp × pp ranks under a launcher (--tp, --pp; the copies beyond
one share the batches), any checkpoint layout (or a Hugging Face export), as launch/generate.py
loads it. The samples are the ones training's validation reads: windows of seq_len + 1
tokens at stride seq_len, the first --samples of the split. So a pretraining checkpoint
scored on its own validation split over the run's eval_batches × micro_batch_size
samples gives the run's logged val_loss, and other checkpoints or other corpora are
scored on the same footing. Bits per byte (the loss over the UTF-8 bytes the scored
tokens decode to) compares models with different tokenizers. Every corpus must be
tokenized with the checkpoint's tokenizer (launch/prepare_data.py --tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--data", type=Path, action="append", default=[],
                   help="a prepared data directory (repeat for several; default: the ones the checkpoint trained on)")
    p.add_argument("--split", default="val", help="the split to score (default: val)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the checkpoint's data.seq_len)")
    p.add_argument("--samples", type=int, default=256, help="windows per corpus, from the split's start (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the scores here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from megascale.errors import MegascaleError  # noqa: PLC0415
    from megascale.evaluation import score  # noqa: PLC0415 (imports torch)

    for name, value in (("--samples", args.samples), ("--batch-size", args.batch_size), ("--seq-len", 1 if args.seq_len is None else args.seq_len)):
        if value < 1:
            raise MegascaleError(f"{name} {value}: use a positive number")
    model, reports = common.open_model(args)
    dirs = args.data or list(model.data_dirs)
    if not dirs:
        raise MegascaleError(f"{model.source} names no prepared data to score (a fine-tune or an export): pass --data DIR")
    seq_len = args.seq_len or model.seq_len or model.model.cfg.max_seq_len
    if seq_len > model.model.cfg.max_seq_len:
        raise MegascaleError(f"--seq-len {seq_len} is past the model's max_seq_len={model.model.cfg.max_seq_len}; lower it")
    scores = [score(model.model, model.tokenizer, d, args.split, seq_len, args.samples, args.batch_size, model.replicas)
              for d in dirs]
    if not reports:
        return 0  # every rank computed the same scores; one says them

    print(f"{model.source} on {model.device}{model.split_words}, {model.dtype_name}; {args.split} split, windows of {seq_len} tokens")
    width = max(len(s.data) for s in scores)
    print(f"  {'data':<{width}}  {'samples':>8} {'tokens':>10}  {'loss':>7} {'perplexity':>11} {'bits/byte':>9}")
    for s in scores:
        print(f"  {s.data:<{width}}  {s.samples:>8,} {s.tokens:>10,}  {s.loss:>7.4f} {s.perplexity:>11.3f} {s.bits_per_byte:>9.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": model.source, "scores": [s.to_dict() for s in scores]}, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
