"""Files the package writes: atomic writes (every file appears whole or not at all), block checksums that
tell a damaged file from a whole one, and folder locks that keep a second process out.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# 16 MiB blocks: a 10 GB cache has 640 checksums (a few KB of metadata), and each read is large enough to go
# at the disk's full speed; a damaged block is found without telling where in it.
CHECKSUM_BLOCK_BYTES = 1 << 24


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary file is created as `open()` creates files (mode 0666 less the umask, e.g. 0644), not with
    `tempfile.mkstemp`'s 0600, so what the package writes can be read like any other file of the user's.

    An `OSError` that names no file (a full disk fails a write with ENOSPC and no name) is raised again
    naming `path`, so that the one-line error of the command line says which file could not be written.

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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
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


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """`numpy.savez` of `arrays`, written atomically like every file of a run."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as temporary:
        np.savez(temporary, **arrays)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, Paths: the only non-JSON types the package writes.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def checksums(path: str | os.PathLike, block_bytes: int = CHECKSUM_BLOCK_BYTES, workers: int = 1) -> dict:
    """The SHA-256 of every `block_bytes` block of a file, computed in `workers` threads (reading and
    hashing release the GIL). Compare them with `checksum_mismatch`.

    Returns:
        {"bytes": the file's size, "block_bytes": block_bytes, "sha256": [hex digest per block]}.
    """
    size = os.path.getsize(path)
    handle = os.open(path, os.O_RDONLY)
    try:

        def block_sha256(start: int) -> str:
            digest, position, end = hashlib.sha256(), start, min(start + block_bytes, size)
            while position < end:
                data = os.pread(handle, end - position, position)
                if not data:  # the file shrank meanwhile: the digest differs from the recorded one
                    break
                digest.update(data)
                position += len(data)
            return digest.hexdigest()

        offsets = range(0, size, block_bytes)
        if workers > 1 and len(offsets) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(workers, len(offsets))) as executor:
                digests = list(executor.map(block_sha256, offsets))
        else:
            digests = [block_sha256(offset) for offset in offsets]
    finally:
        os.close(handle)
    return {"bytes": size, "block_bytes": block_bytes, "sha256": digests}


def checksum_mismatch(path: str | os.PathLike, recorded: dict, workers: int = 1) -> str | None:
    """How a file differs from the checksums recorded for it (`checksums`), or None when it matches."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return f"{path.name} has {size} bytes, {recorded['bytes']} recorded"
    block = recorded["block_bytes"]
    actual = checksums(path, block, workers)["sha256"]
    bad = [index for index, (a, b) in enumerate(zip(actual, recorded["sha256"], strict=True)) if a != b]
    if not bad:
        return None
    first = bad[0] * block
    more = f" (and {len(bad) - 1} more block{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return f"bytes {first}..{min(first + block, size) - 1} of {path.name} differ from their checksum{more}"


def verified_cache(folder: str | os.PathLike, workers: int = 1) -> tuple[dict | None, str | None]:
    """Open a finished cache folder: its `meta.json`, once every file named in its "checksums" matches them.

    Returns:
        (metadata, None) for a whole cache; (None, None) where there is no folder; (None, what is wrong) for
        a damaged one or one without checksums, e.g. "is damaged (bytes 0..4095 of x.npy differ ...)".
    """
    folder = Path(folder)
    if not folder.exists():
        return None, None
    try:
        meta = read_json(folder / "meta.json")
    except FileNotFoundError:
        return None, "is damaged (meta.json is missing)"
    except ValueError:
        return None, "is damaged (meta.json is not valid JSON)"
    if "checksums" not in meta:
        return None, "has no checksums (an earlier version wrote it)"
    for file_name, recorded in meta["checksums"].items():
        try:
            problem = checksum_mismatch(folder / file_name, recorded, workers)
        except OSError as error:  # e.g. removed meanwhile by a process rebuilding it
            problem = f"{file_name} cannot be read ({error.strerror})"
        if problem:
            return None, f"is damaged ({problem})"
    return meta, None


def cache_key(params: Any, paths: Sequence[str | os.PathLike]) -> str:
    """The key of a cache computed from files: a hash of `params` (JSON: everything that changes the
    numbers) and of every file's absolute path, size and modification time, in order. A changed file or
    parameter gives another key; the same inputs, the same key.

    Raises:
        OSError: a file cannot be read (`stat`); the caller names what it is.
    """
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_folder(
    folder: str | os.PathLike,
    build: Callable[[Path], dict],
    *,
    what: str = "cache",
    workers: int = 1,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """A cache folder built once and checked every time it is opened; returns its metadata (`meta.json`).

    The usual case, a whole cache, is read without a lock (`verified_cache`). Otherwise, under
    `folder_lock`: a damaged cache is removed (said on `log`) and `build(partial)` writes the cache's files
    into `.<name>.partial` beside the folder and returns its metadata; the SHA-256 block checksums of every
    file it wrote are added (`checksums`), `meta.json` is written, and the partial folder is renamed into
    place, so a cache appears whole or not at all.

    Args:
        folder: the cache folder, e.g. `<cache_dir>/<name>-<cache_key(...)>`.
        build: writes the files into the (existing) partial folder; returns JSON-able metadata.
        what: what the cache is, for messages ("feature cache", "token cache").
        workers: threads that compute and check the checksums.
        resume: keep what an interrupted `build` left in the partial folder (a builder that resumes);
            otherwise it is emptied first.
        log: where a damaged cache is said.

    Raises:
        LockedError: another process is building the same cache.
    """
    folder = Path(folder)
    meta, _ = verified_cache(folder, workers)
    if meta is not None:
        return meta
    with folder_lock(folder, what):
        meta, problem = verified_cache(folder, workers)  # another process may have built it meanwhile
        if meta is not None:
            return meta
        if problem is not None:
            log(f"{what} {folder} {problem}; computing it again")
            shutil.rmtree(folder)
        partial = folder.parent / f".{folder.name}.partial"
        if not resume:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        meta = build(partial)
        meta["checksums"] = {
            path.name: checksums(path, workers=workers)
            for path in sorted(partial.iterdir())
            if path.is_file() and path.name != "meta.json"
        }
        write_json(partial / "meta.json", meta)
        os.replace(partial, folder)  # the lock keeps other processes from building it meanwhile
    return meta


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


class LockedError(RuntimeError):
    """A folder is in use by another process; the message names the folder and the process."""


_held_locks: dict[str, list] = {}  # real path of a lock file → [file descriptor, depth], for this process
_held_locks_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder", hint: str = "wait for it to finish"):
    """Hold an exclusive lock on `folder` (which need not exist yet) for this process, or fail at once.

    The lock is `fcntl.flock` on `.<name>.lock` beside the folder, with this process's id written in it
    for the message of the next one. The kernel drops the lock when the process ends, however it ends,
    so a lock file left by a killed process blocks nothing. Taking a lock that this process already holds
    nests (the run folder is locked by the command line and again by the training it calls).

    Args:
        folder: the folder to keep other processes out of.
        what: what the folder is, for the message (e.g. "run folder").
        hint: what the user can do, for the message.

    Raises:
        LockedError: another process holds the lock: "<what> <folder> is in use by process <pid>; <hint>".
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = os.path.realpath(folder.parent / f".{folder.name}.lock")
    with _held_locks_guard:
        held = _held_locks.get(lock_path)
        if held is not None:
            held[1] += 1
    if held is None:
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            os.close(handle)
            raise LockedError(f"{what} {folder} is in use by {holder}; {hint}") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        with _held_locks_guard:
            _held_locks[lock_path] = held = [handle, 1]
    try:
        yield
    finally:
        with _held_locks_guard:
            held[1] -= 1
            if held[1] == 0:
                del _held_locks[lock_path]
                os.close(held[0])  # releases the lock (the file stays: removing it would race with a new holder)


def _lock_holder(handle: int) -> str:
    """ "process <pid>" from a held lock file (its holder writes the pid just after locking)."""
    for _ in range(50):
        text = os.pread(handle, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f"process {text}"
        time.sleep(0.01)
    return "another process"
