"""A sentencepiece BPE tokenizer that round-trips any text exactly.

Code is the default corpus, so whitespace matters: normalization is off, no
dummy prefix is added, runs of spaces may be single pieces (indentation), and
byte fallback encodes any character the vocabulary lacks as its UTF-8 bytes.
Together these give ``decode(encode(x)) == x`` for every string ``x``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megascale.errors import MegascaleError

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Training "sentences" are runs of whole lines up to this many characters, so
# pieces can learn "):\n" and newline-then-indent, while staying well under
# sentencepiece's max_sentence_length (bytes; a character is at most 4 bytes).
SENTENCE_CHARS = 1024
# Sentencepiece samples at most this many sentences (~2 GB of text at ~1 kB each).
INPUT_SENTENCE_CAP = 2_000_000
# Sentencepiece writes spaces as U+2581 internally, so a literal U+2581 in the
# input would decode as a space; we encode it as its UTF-8 bytes instead.
WHITESPACE_MARK = "\u2581"
MARK_BYTE_PIECES = ("<0xE2>", "<0x96>", "<0x81>")


def available_cpus() -> int:
    """CPUs this process may run on (respects SLURM/taskset affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _line_chunks(text: str, limit: int = SENTENCE_CHARS) -> Iterator[str]:
    """Split ``text`` into runs of whole lines of at most ``limit`` characters.

    Lines longer than ``limit`` (minified data, long literals) are cut.
    """
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        for start in range(0, len(line), limit):
            piece = line[start : start + limit]
            if buf and size + len(piece) > limit:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(piece)
            size += len(piece)
    if buf:
        yield "".join(buf)


def _training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """All documents as sentencepiece training sentences."""
    for doc in documents:
        yield from _line_chunks(doc)


def _trainer_error(err: RuntimeError, vocab_size: int) -> MegascaleError:
    """Turn sentencepiece's ``INTERNAL: file(line) [check] message`` into one line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else "unknown error"
    detail = re.sub(r"^\w+: \S+\(\d+\) \[[^\]]*\]\s*", "", first) or first
    return MegascaleError(
        f"sentencepiece cannot train a {vocab_size}-piece vocabulary on this corpus ({detail}); "
        "choose another vocab size or give it more text"
    )


def train_tokenizer(
    documents: Iterable[str], model_prefix: str | Path, vocab_size: int, seed: int = 0
) -> Path:
    """Train a byte-fallback BPE model on ``documents``; return ``<prefix>.model``.

    Writes to a temporary prefix and renames, so a concurrent reader or a crash
    never sees a half-written model.
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f"{prefix.name}.tmp-{os.getpid()}")
    spm.set_random_generator_seed(seed)  # sentence sampling/shuffling is random
    log.info("training a %d-piece BPE tokenizer -> %s.model", vocab_size, prefix)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(documents),
            model_prefix=str(tmp_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            max_sentence_length=4 * SENTENCE_CHARS,
            input_sentence_size=INPUT_SENTENCE_CAP,
            shuffle_input_sentence=True,
            num_threads=available_cpus(),
            minloglevel=2,  # sentencepiece writes straight to stderr; keep it to errors
        )
    except RuntimeError as err:
        raise _trainer_error(err, vocab_size) from None
    for ext in (".vocab", ".model"):  # .model last: its presence means "complete"
        os.replace(f"{tmp_prefix}{ext}", f"{prefix}{ext}")
    return Path(f"{prefix}.model")


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model, or raise a one-line MegascaleError."""
    fix = "run `python launch/prepare_data.py --out DIR --vocab-size N INPUT...` to train one"
    if not path.is_file():
        raise MegascaleError(f"tokenizer {path} does not exist; {fix}, or fix the path")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        raise MegascaleError(f"tokenizer {path} is not a readable sentencepiece model; {fix}") from None


class Tokenizer:
    """A trained sentencepiece model: ``encode`` adds no BOS/EOS."""

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._sp = _load_processor(self._path)
        if self._sp.eos_id() < 0:
            raise MegascaleError(
                f"tokenizer {self._path} has no EOS piece, which token files need between "
                "documents; train one with launch/prepare_data.py"
            )
        self._mark_ids = self._whitespace_mark_ids()

    def _whitespace_mark_ids(self) -> list[int] | None:
        """Byte-fallback ids spelling U+2581, or None if the model has no byte pieces."""
        ids = [self._sp.piece_to_id(p) for p in MARK_BYTE_PIECES]
        return None if self._sp.unk_id() in ids else ids

    # Pickle by path: DataLoader workers and spawned processes reload the model.
    def __getstate__(self) -> dict:
        return {"path": str(self._path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS)."""
        if self._mark_ids is not None and WHITESPACE_MARK in text:
            return self._encode_with_marks(text)
        return self._sp.encode(text, out_type=int)

    def _encode_with_marks(self, text: str) -> list[int]:
        """Encode text containing literal U+2581, spelling each one in bytes."""
        ids: list[int] = []
        for i, part in enumerate(text.split(WHITESPACE_MARK)):
            if i:
                ids.extend(self._mark_ids)
            ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts at once on all available CPUs."""
        texts = list(texts)
        batch = self._sp.encode(texts, out_type=int, num_threads=available_cpus())
        if self._mark_ids is not None:
            for i, text in enumerate(texts):
                if WHITESPACE_MARK in text:
                    batch[i] = self._encode_with_marks(text)
        return batch

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; control ids (pad/bos/eos) decode to nothing."""
        return self._sp.decode(np.asarray(ids, dtype=np.int64).tolist())
