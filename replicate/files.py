"""Atomic writes: every file the package produces appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary file is created as `open()` creates files (mode 0666 less the umask, e.g. 0644), not with
    `tempfile.mkstemp`'s 0600, so what the package writes can be read like any other file of the user's.

    Args:
        path: the final file.
        suffix: suffix of the temporary name (some writers, e.g. Keras, insist on ".keras").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_beside(path, suffix or ".tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _create_beside(path: Path, suffix: str) -> Path:
    """A new empty file `.<name>.<random><suffix>` in `path`'s folder, created exclusively (never an existing one)."""
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, Paths: the only non-JSON types the package writes.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
