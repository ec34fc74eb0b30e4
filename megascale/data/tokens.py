"""Memory-mapped token files: any corpus size, constant memory.

A token file with prefix ``P`` is three files:

* ``P.bin``      -- every document's tokens followed by EOS, one flat array
                    (uint16 when the vocabulary fits, else uint32);
* ``P.docs.npy`` -- int64 start offset of each document in ``P.bin``;
* ``P.idx.json`` -- format version, dtype, token/document counts, vocab size.

The index is written last and atomically, and removed first when a file is
rewritten, so an index never describes a partial or foreign ``.bin``.
Training samples are windows of ``seq_len + 1`` tokens at stride ``seq_len``
that run across document boundaries (the EOS tells the model where one ends).
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from megascale.errors import MegascaleError

log = logging.getLogger(__name__)

FORMAT_NAME = "megascale-tokens"
FORMAT_VERSION = 1
# Tokens buffered before a write: large writes are fast, and 4M tokens stay small.
FLUSH_TOKENS = 1 << 22
REBUILD_FIX = "rebuild it with `python launch/prepare_data.py --out DIR ...`"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """(bin, docs, index) paths; suffixes are appended, never substituted."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.docs.npy"), Path(f"{prefix}.idx.json")


def _tmp(path: Path) -> Path:
    """A sibling temporary name unique to this process."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _replace_durably(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` then rename it over ``final`` (atomic on POSIX)."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class TokenFileWriter:
    """Streams documents into a token file; ``close()`` publishes it.

    Use as a context manager: on an exception the temporary files are removed
    and any existing token file at the prefix is left untouched.
    """

    def __init__(self, prefix: str | Path, vocab_size: int, eos_id: int):
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary of size {vocab_size}")
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = token_dtype(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._docs, self._index = _paths(prefix)
        self._file = _tmp(self._bin).open("wb")
        self._doc_starts = array("q")  # 8 bytes per document, not per token
        self._num_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._eos = np.array([eos_id], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        """Tokens added so far, EOS included."""
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        return len(self._doc_starts)

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document (EOS is added after it)."""
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self._doc_starts.append(self._num_tokens)
        self._pending += (arr, self._eos)
        self._num_tokens += arr.size + 1
        self._pending_tokens += arr.size + 1
        if self._pending_tokens >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        """Check the buffered ids against the vocabulary and write them."""
        if not self._pending:
            return
        flat = np.concatenate(self._pending)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = int(flat.max() if flat.max() >= self.vocab_size else flat.min())
            raise MegascaleError(
                f"token id {bad} is outside the vocabulary of size {self.vocab_size} while writing "
                f"{self.prefix}; use the tokenizer's own vocab size"
            )
        self._file.write(flat.astype(self.dtype).tobytes())
        self._pending, self._pending_tokens = [], 0

    def close(self) -> Path:
        """Publish the file: .bin, then .docs.npy, then the index; return the prefix."""
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._index.unlink(missing_ok=True)  # never let an old index describe the new .bin
        _replace_durably(_tmp(self._bin), self._bin)
        with _tmp(self._docs).open("wb") as f:
            np.save(f, np.frombuffer(self._doc_starts, dtype=np.int64))
        _replace_durably(_tmp(self._docs), self._docs)
        _tmp(self._index).write_text(json.dumps(self._index_record(), indent=2) + "\n")
        _replace_durably(_tmp(self._index), self._index)
        log.info("wrote %s: %d documents, %d tokens", self._bin, len(self._doc_starts), self._num_tokens)
        return self.prefix

    def _index_record(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "num_tokens": self._num_tokens,
            "num_documents": len(self._doc_starts),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bin": self._bin.name,
            "docs": self._docs.name,
        }

    def abort(self) -> None:
        """Drop everything written so far."""
        self._file.close()
        for path in (self._bin, self._docs, self._index):
            _tmp(path).unlink(missing_ok=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_token_file(
    prefix: str | Path, docs: Iterable[Sequence[int]], vocab_size: int, eos_id: int
) -> Path:
    """Stream ``docs`` (token id sequences) into a token file at ``prefix``."""
    with TokenFileWriter(prefix, vocab_size, eos_id) as writer:
        for doc in docs:
            writer.add(doc)
    return Path(prefix)


def _read_index(path: Path) -> dict:
    """Load and check a ``.idx.json``; every failure is a one-line MegascaleError."""
    if not path.is_file():
        raise MegascaleError(f"token index {path} does not exist; {REBUILD_FIX} or fix the data path")
    try:
        index = json.loads(path.read_text())
        counts = (index["num_tokens"], index["num_documents"], index["vocab_size"])
        np.dtype(index["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MegascaleError(f"token index {path} is unreadable ({type(err).__name__}); {REBUILD_FIX}") from None
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise MegascaleError(
            f"token index {path} has format {index.get('format')} v{index.get('version')}, "
            f"this code reads {FORMAT_NAME} v{FORMAT_VERSION}; {REBUILD_FIX}"
        )
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        raise MegascaleError(f"token index {path} has invalid counts; {REBUILD_FIX}")
    return index


def _map_tokens(path: Path, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    """Memory-map the token array after checking its size against the index."""
    if not path.is_file():
        raise MegascaleError(f"token file {path} does not exist but its index does; {REBUILD_FIX}")
    expected = num_tokens * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise MegascaleError(
            f"token file {path} has {actual} bytes but its index says {num_tokens} {dtype.name} "
            f"tokens ({expected} bytes), so it is truncated or stale; {REBUILD_FIX}"
        )
    if num_tokens == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _load_doc_starts(path: Path, num_documents: int, num_tokens: int) -> np.ndarray:
    """Memory-map the document offsets and check they fit the token array."""
    try:
        starts = np.load(path, mmap_mode="r") if num_documents else np.zeros(0, dtype=np.int64)
    except (OSError, ValueError):
        raise MegascaleError(f"document offsets {path} are missing or unreadable; {REBUILD_FIX}") from None
    if starts.shape != (num_documents,) or (num_documents and starts[-1] >= num_tokens):
        raise MegascaleError(f"document offsets {path} do not match their index; {REBUILD_FIX}")
    return starts


class TokenFile:
    """A read-only, memory-mapped token file (see the module docstring)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        bin_path, docs_path, index_path = _paths(self.prefix)
        self._index = _read_index(index_path)
        self._dtype = np.dtype(self._index["dtype"])
        self._tokens = _map_tokens(bin_path, self._dtype, self.num_tokens)
        self._doc_starts = _load_doc_starts(docs_path, self.num_documents, self.num_tokens)

    # Pickle by path: a memmap would otherwise be pickled as a full in-memory copy.
    def __getstate__(self) -> dict:
        return {"prefix": str(self.prefix)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"TokenFile({str(self.prefix)!r}, tokens={self.num_tokens}, documents={self.num_documents})"

    @property
    def num_tokens(self) -> int:
        return self._index["num_tokens"]

    @property
    def num_documents(self) -> int:
        return self._index["num_documents"]

    @property
    def vocab_size(self) -> int:
        return self._index["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def tokens(self) -> np.ndarray:
        """The whole flat token array (read-only memmap)."""
        return self._tokens

    def num_samples(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` (targets need one more)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return max(0, (self.num_tokens - 1) // seq_len)

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """Sample ``i``: ``tokens[i*seq_len : (i+1)*seq_len + 1]`` as int64."""
        if not 0 <= i < self.num_samples(seq_len):
            raise IndexError(f"sample {i} out of range for {self.num_samples(seq_len)} samples of length {seq_len}")
        start = i * seq_len
        return np.array(self._tokens[start : start + seq_len + 1], dtype=np.int64)

    def document(self, j: int) -> np.ndarray:
        """Tokens of document ``j`` without its trailing EOS, as int64."""
        if not 0 <= j < self.num_documents:
            raise IndexError(f"document {j} out of range for {self.num_documents} documents")
        start = int(self._doc_starts[j])
        end = int(self._doc_starts[j + 1]) if j + 1 < self.num_documents else self.num_tokens
        return np.array(self._tokens[start : end - 1], dtype=np.int64)
