"""Files the stages write and read: written atomically, read with errors that name the file.

A stage killed mid-write (SIGKILL, out of memory, a node preempted) must leave either the old file or
none, never half of a new one that the next stage reads as valid: every writer here writes a temporary
file in the destination's folder, flushes it to disk and renames it over the destination (`os.replace`,
atomic on POSIX file systems). The readers turn a truncated or corrupt file into a `ValueError` that names
the path and says how to recover, instead of numpy's or json's bare message without a file name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

RECOVER = "delete it and rerun the stage that writes it"


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block ends without error.

    The temporary name keeps `path`'s suffix, so writers that choose the format from it (PIL, np.savez,
    torch.save) behave as for `path`. On an error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the data reaches the disk before the rename makes it visible
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Write `data` as JSON (with a final newline), atomically."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (a CSV, a markdown report), atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def savez_atomic(path: str | Path, *, compressed: bool = True, **arrays: Any) -> None:
    """`np.savez_compressed` (or `np.savez` with compressed=False) to exactly `path`, atomically.

    Written through an open file, so numpy does not append `.npz` to a name that lacks it.
    """
    save = np.savez_compressed if compressed else np.savez
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        save(f, **arrays)


def read_npz(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` (only `keys` when given), loaded into memory and the file closed.

    Raises FileNotFoundError for a missing file, KeyError naming the file and its keys for a missing key,
    and ValueError naming the file for a truncated or corrupt one. Never unpickles objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys or () if k not in z.files]
            if missing:
                raise KeyError(f"{path} lacks {missing} (has {sorted(z.files)})")
            return {k: z[k] for k in (keys if keys is not None else z.files)}
    except (KeyError, PermissionError, MemoryError):
        raise
    except Exception as e:
        # a truncated zip loses its central directory (BadZipFile); a damaged member fails its CRC or
        # inflates short (zlib.error, EOFError) or to the wrong size (ValueError); a damaged array header
        # fails numpy's parser (SyntaxError, tokenize.TokenError)
        raise ValueError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}; {RECOVER}") from e


def read_json(path: str | Path) -> Any:
    """A JSON file's content; ValueError naming the file when it is truncated or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}; {RECOVER}") from e
