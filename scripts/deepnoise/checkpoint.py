"""Resume checkpoints of one training run (``<checkpoint-dir>/last.pt``): the record, its fingerprint,
the lock that keeps one training per directory, and what happens to a checkpoint of other settings.

A checkpoint is resumed only when it was written by the same recipe (hyper-parameters without the
runtime knobs), the same model configuration and the same input *contents*; any other checkpoint is
moved aside to ``last.pt.stale`` with a warning naming the reason, and the run starts as a fresh run
would (from ``--init`` for a fine-tune), so a rerun after a config change equals a fresh run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from deepnoise.atomic import atomic_path
from deepnoise.errors import InputError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
STALE_SUFFIX = ".stale"
LOCK_NAME = ".lock"
# what every checkpoint holds (``Trainer.state_dict()`` adds the model, optimiser and EMA state)
CHECKPOINT_KEYS = ("epoch", "hparams", "model_config", "inputs", "log", "rng", "trainer")


def resume_key(hparams: dict) -> dict:
    """The recipe: hparams without the runtime knobs, which do not change the trained weights (a
    checkpoint resumes across them)."""
    from deepnoise.hparams import RUNTIME_KEYS

    return {k: v for k, v in hparams.items() if k not in RUNTIME_KEYS}


# ---------------------------------------------------------------- random state
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- fingerprint of the inputs
def _file_digest(path: str) -> str:
    """Content digest of one input. A plate stack is identified by its per-site CRC-32s and image
    shape (written by ``deepnoise stack``, so no 100 MB read); any other file by its bytes."""
    h = hashlib.sha256()
    if path.endswith((".h5", ".hdf5")):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                h.update(np.asarray(f["crc32"][()], np.uint32).tobytes())
                h.update(repr(tuple(f["images"].shape)).encode())
        except (OSError, KeyError) as exc:
            raise InputError(f"{path}: cannot read the plate stack's CRCs ({exc})") from exc
        return h.hexdigest()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise InputError(f"{path}: cannot read input ({exc})") from exc
    return h.hexdigest()


def inputs_fingerprint(files: list[str | None], extra: dict) -> str:
    """Identity of a run's inputs: the *contents* of every input file (not paths or mtimes, so a
    rebuilt but identical stack still resumes and a changed one never does) plus ``extra``."""
    parts = [json.dumps(extra, sort_keys=True)]
    parts += [_file_digest(str(f)) for f in files if f]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------- the record
def save_checkpoint(path: Path, record: dict) -> None:
    missing = [k for k in CHECKPOINT_KEYS if k not in record]
    if missing:
        raise ValueError(f"checkpoint record lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_checkpoint(path: Path) -> dict:
    """A resume checkpoint; ``InputError`` naming the file when it cannot be read (never skipped:
    silently restarting would throw away the epochs it holds)."""
    hint = f"delete it to train this model from scratch: rm {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint names the file
        raise InputError(
            f"{path}: cannot read the resume checkpoint (truncated or corrupt: {exc}); {hint}"
        ) from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path}: not a deepnoise resume checkpoint (lacks {missing}); {hint}")
    return state


def mismatch(ckpt: dict, hparams: dict, model_config: dict, fingerprint: str) -> str | None:
    """Why ``ckpt`` cannot be resumed by this run (``None``: it can)."""
    old, new = resume_key(ckpt.get("hparams", {})), resume_key(hparams)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        return "hyper-parameters changed: " + ", ".join(
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed
        )
    if ckpt.get("model_config") != model_config:
        return "model configuration changed"
    if ckpt.get("inputs") != fingerprint:
        return "input contents changed (stacks, statistics, site table, --init weights or pseudo labels)"
    return None


def set_aside(path: Path, reason: str) -> Path:
    """Move a checkpoint that this run must not resume to ``<path>.stale`` (replacing an older one)."""
    stale = path.with_name(path.name + STALE_SUFFIX)
    os.replace(path, stale)
    log.warning("%s: not resumed (%s); moved to %s, training as a fresh run", path, reason, stale)
    return stale


def remove(checkpoint_dir: str | os.PathLike) -> None:
    """Delete a finished run's resume state (checkpoint, stale checkpoint); the lock file stays."""
    for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + STALE_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            (Path(checkpoint_dir) / name).unlink()


# checkpoint directories locked by this process (a POSIX lock does not conflict with its own process)
_HELD: set[str] = set()


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: str | os.PathLike):
    """Hold an exclusive lock on a checkpoint directory for the whole training run.

    A second training of the same model and round (a rerun started while an orphaned job still
    runs, or a second lock in this process) fails at once instead of interleaving its checkpoints
    with the first. The lock is a POSIX record lock (``lockf``): it belongs to this process alone,
    so forked loader workers do not inherit it, and the kernel drops it the moment the process
    dies, whatever the signal and whatever its workers still do. File systems without POSIX locks
    only get a warning.
    """
    import fcntl
    import socket

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        raise InputError(
            f"{directory}: checkpoint directory in use by pid {os.getpid()} on {socket.gethostname()} "
            "(this process); two trainings of the same model would overwrite each other's checkpoints"
        )
    with open(path, "a+") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError) as exc:  # EAGAIN or EACCES: held elsewhere
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise InputError(
                f"{directory}: checkpoint directory in use by {holder}; two trainings of the same "
                "model would overwrite each other's checkpoints. Wait for it or kill it, then rerun"
            ) from exc
        except OSError as exc:
            log.warning("%s: cannot lock (%s); continuing without a lock", path, exc)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
