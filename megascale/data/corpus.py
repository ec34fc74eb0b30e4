"""Where documents come from: the embedded stdlib corpus and user files.

The default pretraining corpus is the Python standard library's own source,
present on every machine that runs megascale, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from megascale.errors import MegascaleError

# Directories of the stdlib that are not "the library": third-party packages,
# the regression tests (huge, repetitive, full of deliberately odd code) and
# applications/tools shipped alongside it.
EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
)
# Files above this size are generated tables (unicode data, encodings), not code.
MAX_STDLIB_FILE_BYTES = 200_000


def _stdlib_python_files(root: Path) -> list[Path]:
    """Every kept ``.py`` file under ``root``, sorted by relative path.

    Excluded directories are pruned during the walk rather than filtered after
    it: site-packages alone can hold far more files than the stdlib.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_source_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's own ``.py`` files, in a deterministic order.

    Sorted by path relative to the stdlib root so every rank and every machine
    with the same Python sees the same list. Files over MAX_STDLIB_FILE_BYTES
    are skipped. With ``max_bytes``, files are taken in that order until their
    cumulative size reaches ``max_bytes``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise MegascaleError(
            f"the Python standard library directory {root} is missing; "
            "use a full Python install or pass your own files to launch/prepare_data.py"
        )
    files: list[Path] = []
    total = 0
    for path in _stdlib_python_files(root):
        if max_bytes is not None and total >= max_bytes:
            break
        if not path.is_file():  # skips broken symlinks, which stat() would raise on
            continue
        size = path.stat().st_size
        if size <= MAX_STDLIB_FILE_BYTES:
            files.append(path)
            total += size
    return files


def _jsonl_documents(path: Path) -> Iterator[str]:
    """One document per non-blank line of a JSON Lines file (its "text" field)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MegascaleError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); "
                    'each line of a .jsonl file must be an object like {"text": "..."}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MegascaleError(
                    f'{path}:{lineno}: no string "text" field; '
                    'each line of a .jsonl file must be an object like {"text": "..."}'
                )
            yield record["text"]


def read_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield documents: one per file, or one per line of a ``.jsonl`` file.

    Non-JSONL files are read whole as UTF-8; undecodable bytes become U+FFFD
    rather than stopping a long preparation run on one bad file.
    """
    for path in map(Path, paths):
        if not path.is_file():
            raise MegascaleError(f"input file {path} does not exist; check the path")
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
