"""Turn documents into a prepared data directory.

A prepared directory holds::

    tokenizer.model            sentencepiece model (trained here or copied in)
    train.{bin,docs.npy,idx.json}, val.{...}   token files (see tokens.py)
    manifest.json              written last: its presence means "complete"

``manifest.json``::

    {"format": "megascale-data", "version": 1,
     "tokenizer": "tokenizer.model",          # relative to the directory
     "vocab_size": 4096, "eos_id": 3, "seed": 0, "val_fraction": 0.02,
     "sources": {...},                        # free-form description
     "splits": {"train": {"prefix": "train", "documents": D, "tokens": N},
                "val":   {"prefix": "val",   "documents": D, "tokens": N}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from filelock import FileLock

from megascale.data.corpus import read_documents, stdlib_source_files
from megascale.data.tokenizer import Tokenizer, train_tokenizer
from megascale.data.tokens import TokenFileWriter
from megascale.errors import MegascaleError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megascale-data"
MANIFEST_VERSION = 1
TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "val")
# Documents per encode_batch call: enough to keep every thread busy.
ENCODE_BATCH_DOCS = 256

DocumentSource = Callable[[], Iterable[str]]


def _prepare_fix(data_dir: Path | str) -> str:
    return f"run `python launch/prepare_data.py --out {data_dir} --vocab-size N INPUT...`"


def _as_source(documents: Iterable[str] | DocumentSource) -> DocumentSource:
    """A callable that yields the documents afresh (several passes are needed)."""
    if callable(documents):
        return documents
    docs = documents if isinstance(documents, (list, tuple)) else list(documents)
    return lambda: docs


def _unit_hash(index: int, seed: int) -> float:
    """A stable uniform number in [0, 1) for document ``index`` (not Python's hash())."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def validation_mask(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents go to validation: bool array, at least one True and one False."""
    if not 0.0 <= val_fraction < 1.0:
        raise MegascaleError(f"val_fraction={val_fraction} must be in [0, 1); use e.g. 0.02")
    if num_docs < 2:
        raise MegascaleError(
            f"found {num_docs} document(s) but need at least 2 (one for training, one for "
            "validation); give more input files"
        )
    u = np.array([_unit_hash(i, seed) for i in range(num_docs)])
    is_val = u < val_fraction
    is_val[np.argmin(u)] = True  # a validation loss needs some data
    is_val[np.argmax(u)] = False  # and so does training
    return is_val


def _count(source: DocumentSource) -> int:
    docs = source()
    return len(docs) if isinstance(docs, (list, tuple)) else sum(1 for _ in docs)


def _install_tokenizer(
    source: DocumentSource, is_val: np.ndarray, out_dir: Path, vocab_size: int, seed: int,
    tokenizer_path: Path | None,
) -> Tokenizer:
    """Train a tokenizer on the training split, or copy the given one in."""
    target = out_dir / TOKENIZER_NAME
    if tokenizer_path is None:
        train_docs = (doc for doc, val in zip(source(), is_val) if not val)
        train_tokenizer(train_docs, out_dir / Path(TOKENIZER_NAME).stem, vocab_size, seed)
    elif not (target.exists() and Path(tokenizer_path).resolve() == target.resolve()):
        Tokenizer(tokenizer_path)  # fail with the one-line error before copying garbage
        tmp = target.with_name(f"{TOKENIZER_NAME}.tmp-{os.getpid()}")
        shutil.copyfile(tokenizer_path, tmp)  # a self-contained directory survives moves
        os.replace(tmp, target)
    tokenizer = Tokenizer(target)
    if tokenizer.vocab_size != vocab_size:
        raise MegascaleError(
            f"tokenizer {tokenizer_path or target} has {tokenizer.vocab_size} pieces but vocab_size={vocab_size} "
            f"was requested; pass --vocab-size {tokenizer.vocab_size} or train a new tokenizer"
        )
    return tokenizer


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(documents)
    while batch := list(islice(it, size)):
        yield batch


def _write_splits(source: DocumentSource, is_val: np.ndarray, tokenizer: Tokenizer, out_dir: Path) -> dict:
    """Tokenize every document once, streaming each into its split's token file."""
    writers = {
        name: TokenFileWriter(out_dir / name, tokenizer.vocab_size, tokenizer.eos_id) for name in SPLITS
    }
    with writers["train"], writers["val"]:
        index = 0
        for texts in _batches(source(), ENCODE_BATCH_DOCS):
            for ids in tokenizer.encode_batch(texts):
                writers["val" if is_val[index] else "train"].add(ids)
                index += 1
    return {
        name: {"prefix": name, "documents": w.num_documents, "tokens": w.num_tokens}
        for name, w in writers.items()
    }


def _write_json_atomically(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_dataset(
    documents: Iterable[str] | DocumentSource,
    out_dir: Path,
    vocab_size: int,
    val_fraction: float = 0.02,
    seed: int = 0,
    tokenizer_path: Path | None = None,
    *,
    sources: dict | str | None = None,
) -> Path:
    """Build a prepared directory (tokenizer, train/val token files, manifest).

    ``documents`` is a collection of strings, or a zero-argument callable
    returning a fresh iterable of them (so big corpora are streamed, not held).
    A document goes to validation when a stable hash of (seed, its index) falls
    below ``val_fraction``; there is always at least one validation and one
    training document. ``sources`` describes where the documents came from.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the directory is incomplete from here on
    source = _as_source(documents)
    start = time.perf_counter()
    is_val = validation_mask(_count(source), val_fraction, seed)
    tokenizer = _install_tokenizer(source, is_val, out_dir, vocab_size, seed, tokenizer_path)
    splits = _write_splits(source, is_val, tokenizer, out_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "seed": seed,
        "val_fraction": val_fraction,
        "sources": sources if sources is not None else "unspecified",
        "splits": splits,
    }
    _write_json_atomically(out_dir / MANIFEST_NAME, manifest)
    log.info("prepared %s in %.1fs: %s", out_dir, time.perf_counter() - start, splits)
    return out_dir


def load_manifest(data_dir: str | Path) -> dict:
    """Read ``data_dir/manifest.json``; a one-line MegascaleError if it is not usable."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise MegascaleError(f"data directory {data_dir} does not exist; {_prepare_fix(data_dir)}")
    if not path.is_file():
        raise MegascaleError(
            f"{path} is missing (data not prepared, or preparation was interrupted); {_prepare_fix(data_dir)}"
        )
    try:
        manifest = json.loads(path.read_text())
        ok = manifest["format"] == MANIFEST_FORMAT and all(s in manifest["splits"] for s in SPLITS)
        ok = ok and isinstance(manifest["tokenizer"], str) and isinstance(manifest["vocab_size"], int)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise MegascaleError(f"{path} is unreadable or not a megascale manifest; {_prepare_fix(data_dir)}")
    if manifest["version"] != MANIFEST_VERSION:
        raise MegascaleError(
            f"{path} has version {manifest['version']}, this code reads {MANIFEST_VERSION}; {_prepare_fix(data_dir)}"
        )
    return manifest


def require_tokenizer(data_dir: Path, tokenizer: Path, against: str, why: str = "") -> None:
    """Refuse in one line a prepared ``data_dir`` that another tokenizer model than ``tokenizer`` wrote.

    Byte equality of the model files: two tokenizers with equal vocabulary sizes still map
    text to different ids, and their tokens would train or score as noise.
    """
    if (data_dir / load_manifest(data_dir)["tokenizer"]).read_bytes() != tokenizer.read_bytes():
        raise MegascaleError(f"{data_dir} was tokenized with another tokenizer than {against}; prepare it again with "
                             f"launch/prepare_data.py --tokenizer {tokenizer}{why}")


def _stdlib_sources(max_bytes: int) -> dict:
    """Manifest description of the embedded corpus, used to detect stale builds."""
    return {"kind": "stdlib", "python": platform.python_version(), "max_bytes": max_bytes}


def _existing_stdlib_is_current(out_dir: Path, vocab_size: int, max_bytes: int, seed: int) -> bool:
    """True if ``out_dir`` already holds the stdlib corpus asked for; False if it holds no complete corpus.

    A built corpus is never replaced. A directory holding some other prepared corpus is an
    error, and so is a stdlib corpus built with another vocabulary, size or seed: checkpoints
    name their tokenizer by its path (megascale.json), so a rebuild in place would change the
    token ids under every run made from it. One built from another Python release's stdlib is
    kept as it is (it is still a consistent corpus).
    """
    try:
        manifest = load_manifest(out_dir)
    except MegascaleError:
        return False
    sources = manifest.get("sources")
    if not (isinstance(sources, dict) and sources.get("kind") == "stdlib"):
        raise MegascaleError(
            f"{out_dir} holds a prepared corpus that is not the embedded stdlib one; "
            "set data.corpus=prepared to use it, or choose another data.path"
        )
    asked = {"model.vocab_size": vocab_size, "data.stdlib_max_bytes": max_bytes, "seed": seed}
    built = {"model.vocab_size": manifest["vocab_size"], "data.stdlib_max_bytes": sources.get("max_bytes"), "seed": manifest.get("seed")}
    differ = [key for key in asked if built[key] != asked[key]]
    if differ:
        was = ", ".join(f"{key}={built[key]}" for key in differ)
        now = ", ".join(f"{key}={asked[key]}" for key in differ)
        raise MegascaleError(
            f"{out_dir} holds the stdlib corpus built with {was}, not {now}; it is not rebuilt in place (checkpoints "
            f"name its tokenizer): set data.path to a new directory (e.g. data.path={out_dir.parent / f'stdlib-{vocab_size}'}), "
            f"or delete {out_dir} if no run uses it"
        )
    if sources.get("python") != platform.python_version():
        log.info("using %s, built from Python %s's stdlib (this is %s)", out_dir, sources.get("python"), platform.python_version())
    return True


def ensure_stdlib_dataset(out_dir: Path, vocab_size: int, max_bytes: int, seed: int = 0) -> Path:
    """Build the embedded stdlib corpus at ``out_dir`` unless it is already there.

    Safe to call from every rank at once: a file lock lets one process build
    while the others wait, then find the manifest and return.
    """
    out_dir = Path(out_dir)
    if _existing_stdlib_is_current(out_dir, vocab_size, max_bytes, seed):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / ".lock")):
        if _existing_stdlib_is_current(out_dir, vocab_size, max_bytes, seed):
            return out_dir  # another process built it while we waited
        files = stdlib_source_files(max_bytes)
        log.info("building the stdlib corpus at %s from %d files", out_dir, len(files))
        prepare_dataset(
            lambda: read_documents(files), out_dir, vocab_size, seed=seed,
            sources={**_stdlib_sources(max_bytes), "files": len(files)},
        )
    return out_dir
