"""Prepare a corpus for pretraining: train a tokenizer, write train/val token files.

    python launch/prepare_data.py --out data/mycorpus --vocab-size 8000 INPUT...

INPUT is a text file, a .jsonl file (one {"text": ...} per line), a directory
(searched recursively for *.txt, *.md, *.py, *.jsonl; hidden entries skipped),
or the word ``stdlib`` for the Python standard library's own sources.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Run from a fresh checkout without installing: the repo root is launch/'s parent.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megascale.data import (  # noqa: E402
    Tokenizer,
    load_manifest,
    prepare_dataset,
    read_documents,
    stdlib_source_files,
)
from megascale.errors import MegascaleError  # noqa: E402

INPUT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories, or 'stdlib'")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, help="tokenizer size (default: that of --tokenizer)")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and tokenizer sampling")
    parser.add_argument("--tokenizer", type=Path, help="reuse this sentencepiece .model instead of training")
    parser.add_argument("--max-bytes", type=int, help="cap on the 'stdlib' input, in bytes of source")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print the summary")
    return parser.parse_args(argv)


def _directory_files(root: Path) -> list[Path]:
    """Input files under ``root``, sorted, skipping hidden files and folders (.git, .venv)."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix in INPUT_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def collect_files(inputs: list[str], max_bytes: int | None) -> list[Path]:
    """Expand INPUT arguments into a deterministic list of files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if item == "stdlib":
            files += stdlib_source_files(max_bytes)
        elif path.is_dir():
            files += _directory_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise MegascaleError(f"input {item} does not exist; pass existing files, directories or 'stdlib'")
    if not files:
        raise MegascaleError(
            f"no input files found in {' '.join(inputs)} (looked for {', '.join(INPUT_SUFFIXES)}); "
            "pass files that contain text"
        )
    return files


def resolve_vocab_size(args: argparse.Namespace) -> int:
    """--vocab-size, or the size of the --tokenizer being reused."""
    if args.vocab_size is not None:
        if args.vocab_size <= 0:
            raise MegascaleError(f"--vocab-size {args.vocab_size} must be positive; use e.g. --vocab-size 8000")
        return args.vocab_size
    if args.tokenizer is None:
        raise MegascaleError("--vocab-size is required unless --tokenizer is given; add e.g. --vocab-size 8000")
    return Tokenizer(args.tokenizer).vocab_size


def summary(out_dir: Path, manifest_splits: dict, vocab_size: int) -> str:
    lines = [f"prepared {out_dir}", f"  tokenizer  {out_dir / 'tokenizer.model'} (vocab {vocab_size})"]
    for name, split in manifest_splits.items():
        lines.append(f"  {name:<9}  {split['documents']:>10,} docs  {split['tokens']:>14,} tokens")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    """Prepare the dataset; return the summary text."""
    vocab_size = resolve_vocab_size(args)
    files = collect_files(args.inputs, args.max_bytes)
    sources = {"kind": "files", "inputs": args.inputs, "files": len(files), "max_bytes": args.max_bytes}
    out_dir = prepare_dataset(
        lambda: read_documents(files), args.out, vocab_size, val_fraction=args.val_fraction,
        seed=args.seed, tokenizer_path=args.tokenizer, sources=sources,
    )
    return summary(out_dir, load_manifest(out_dir)["splits"], vocab_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        print(run(args))
    except MegascaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
