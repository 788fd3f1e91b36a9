"""Atomic output files: write to a temporary sibling, rename on success, remove on failure.

- The temporary file is created with mode 0666 minus the umask (``os.open``), so the result has the
  mode any other file of the user would have (0644 under umask 0022), not ``mkstemp``'s 0600.
- Its name, ``.{name}.tmp-{16 hex}{suffix}``, belongs to one output only: a job killed while writing
  leaves such a file behind, and the next write of the same output removes it first
  (``remove_stale``). One writer per output is guaranteed by Snakemake (and by the training's lock
  on its checkpoint folder).
- A writer that fails because the disk is full (``ENOSPC``/``EDQUOT``, or any ``OSError`` /
  ``RuntimeError`` - torch reports ``basic_ios::clear: iostream error`` - while the filesystem has
  less free space than was written) becomes an ``InputError`` naming the path and the space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from deepnoise.errors import InputError

TMP_TAG = ".tmp-"
# Below this much free space, an OSError/RuntimeError of a writer is reported as a full disk.
LOW_SPACE = 64 * 2**20
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def temp_name(path: Path, suffix: str) -> str:
    return f".{path.name}{TMP_TAG}{secrets.token_hex(8)}{suffix}"


def stale_temps(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Temporary files an interrupted ``atomic_path(path, suffix)`` left next to ``path``."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    pattern = re.compile(rf"\.{re.escape(path.name)}{re.escape(TMP_TAG)}[0-9a-f]{{16}}{re.escape(suffix)}")
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    return sorted(Path(e.path) for e in entries if pattern.fullmatch(e.name))


def remove_stale(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove (and return) the temporary files of earlier, killed writes of ``path``."""
    removed = []
    for p in stale_temps(path, suffix):
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _disk_full(exc: BaseException, written: int, free: int) -> bool:
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in _FULL_ERRNOS:
            return True
        chain = chain.__cause__ or chain.__context__
    return isinstance(exc, OSError | RuntimeError) and free < max(written, LOW_SPACE)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _free(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    The temporary file lives in the same directory (same filesystem, so ``os.replace`` is atomic)
    and keeps the final suffix so libraries that dispatch on it (``np.savez``, ``torch.save``,
    matplotlib) behave. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, suffix)
    while True:
        tmp_path = path.parent / temp_name(path, suffix)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    os.close(fd)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        written = _size(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, InputError):
            free = _free(path.parent)
            if _disk_full(exc, written, free):
                needed = max(written, _size(path))
                raise InputError(
                    f"{path}: the disk is full: writing it failed after {_fmt_bytes(written)} "
                    f"({type(exc).__name__}: {exc}); {_fmt_bytes(free)} free on {path.parent}, "
                    f"at least {_fmt_bytes(needed)} needed: free space (or move results/) and rerun"
                ) from exc
        raise


def temp_dir(path: str | os.PathLike) -> Path:
    """A new empty folder next to ``path`` (mode 0777 minus the umask) to build a folder output in
    and ``os.replace`` onto ``path``; the folders of earlier, killed builds of ``path`` are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, "")
    while True:
        tmp = path.parent / temp_name(path, "")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
