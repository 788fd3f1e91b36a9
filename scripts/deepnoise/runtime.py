"""Devices, DDP and GPU claims of the GPU jobs (``deepnoise train`` and ``deepnoise predict``).

- ``setup_runtime`` picks the device and, under ``torchrun`` (``WORLD_SIZE > 1``), joins the process
  group (NCCL on CUDA, gloo on CPU).
- ``launch`` runs at the start of ``deepnoise train``: it claims this job's GPUs (below), then, when
  the job has several processes to run, reruns the same command under ``torchrun``, one process per
  GPU (a Slurm job with ``gpu=2`` sees two GPUs). ``DEEPNOISE_DDP_PROCESSES=N`` sets the process
  count explicitly; with ``--device cpu`` that is N gloo processes on CPU through the very same
  relaunch (the tests use it; the GPU count is then ignored).
- ``claim_gpus``: a job that asked for ``DEEPNOISE_GPUS=n`` GPUs (the rules set it from their
  ``gpu`` resource) but sees more (a local multi-GPU machine, where nothing pins jobs to devices)
  takes ``n`` free devices with an exclusive ``flock`` on one lock file per device
  (``$DEEPNOISE_GPU_LOCK_DIR``, default ``/tmp/deepnoise-gpu-locks``), narrows
  ``CUDA_VISIBLE_DEVICES`` to them and holds the locks until the process exits; when fewer than
  ``n`` are free it waits. Under Slurm (``SLURM_JOB_ID``) nothing is claimed: Slurm already sets
  ``CUDA_VISIBLE_DEVICES`` to the job's GPUs. It runs before anything initialises CUDA, so the
  narrowed ``CUDA_VISIBLE_DEVICES`` is the one CUDA reads.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepnoise.errors import InputError

log = logging.getLogger(__name__)

DDP_PROCESSES_ENV = "DEEPNOISE_DDP_PROCESSES"
GPUS_ENV = "DEEPNOISE_GPUS"
LOCK_DIR_ENV = "DEEPNOISE_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/deepnoise-gpu-locks"
CLAIM_POLL_S = 2.0

# lock files held by this process (closing them would release the claim)
_claimed: list = []


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when a device is visible (an empty ``CUDA_VISIBLE_DEVICES`` means CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    has_cuda = visible is None or visible.strip() not in ("", "-1")
    has_cuda = has_cuda and torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not has_cuda:
            raise InputError("--device cuda: no CUDA device is available")
        return torch.device("cuda")
    if requested != "auto":
        raise InputError(f"--device: expected auto, cpu or cuda, got {requested!r}")
    return torch.device("cuda" if has_cuda else "cpu")


def setup_runtime(requested: str = "auto", threads: int | None = None) -> Runtime:
    if threads:
        torch.set_num_threads(int(threads))
    if requested != "cpu":
        claim_gpus()
    device = select_device(requested)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if device.type == "cuda":
            torch.cuda.set_device(0)
            device = torch.device("cuda", 0)
        return Runtime(device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, local_rank)


def _barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        if rt.cuda:
            dist.barrier(device_ids=[rt.local_rank])
        else:
            dist.barrier()


# ----------------------------------------------------------------------------------------------
# DDP relaunch


def ddp_launch_command(argv: list[str], n_gpus: int) -> list[str]:
    """The ``torchrun`` command that reruns this ``deepnoise`` invocation on ``n_gpus`` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n_gpus}",
        "-m",
        "deepnoise",
        *argv,
    ]


def _visible_gpus(device: str) -> int:
    if device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def _positive_int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    if not re.fullmatch(r"\s*[1-9][0-9]*\s*", raw):
        raise InputError(f"environment variable {name}={raw!r}: expected a positive integer")
    return int(raw)


def ddp_processes(device: str) -> int:
    """Processes this job trains with: ``$DEEPNOISE_DDP_PROCESSES`` when set, else the visible GPUs."""
    explicit = _positive_int_env(DDP_PROCESSES_ENV)
    if explicit is None:
        return _visible_gpus(device)
    if device != "cpu":
        gpus = _visible_gpus(device)
        if gpus and explicit > gpus:
            raise InputError(f"{DDP_PROCESSES_ENV}={explicit}: only {gpus} GPU(s) visible; use --device cpu")
    return explicit


def launch(argv: list[str], device: str) -> int | None:
    """Claim this job's GPUs; with several processes to run, rerun ``argv`` under ``torchrun``.

    Returns torchrun's exit status, or None when this process should train itself (one process, or
    already a torchrun worker)."""
    if device != "cpu":
        claim_gpus()
    if "WORLD_SIZE" in os.environ:
        return None
    n = ddp_processes(device)
    if n <= 1:
        return None
    cmd = ddp_launch_command(argv, n)
    log.info("%d processes (DDP): relaunching with %s", n, " ".join(cmd[:6]))
    return subprocess.run(cmd, check=False).returncode


# ----------------------------------------------------------------------------------------------
# Pinning jobs to free GPUs on a machine without a scheduler


def _listed_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi``'s UUIDs
    (queried outside this process, so CUDA is not initialised before the claim narrows the list)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    out = subprocess.run(
        [smi, "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _try_lock(path: Path):
    f = open(path, "a")  # noqa: SIM115 (held open: the lock lives as long as the file object)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def claim_gpus() -> list[str] | None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to ``$DEEPNOISE_GPUS`` free devices (see the module text).

    Returns the claimed ids, or None when nothing was claimed (no request, under Slurm, already
    claimed, or no more devices visible than requested)."""
    wanted = _positive_int_env(GPUS_ENV)
    if wanted is None or _claimed or "SLURM_JOB_ID" in os.environ:
        return None
    ids = _listed_gpus()
    if len(ids) <= wanted:
        return None
    lock_dir = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(lock_dir, 0o1777)  # shared by every user's jobs on this machine
    except PermissionError:
        pass
    waited = False
    while True:
        held = []
        for gpu in ids:
            f = _try_lock(lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock")
            if f is not None:
                held.append((gpu, f))
                if len(held) == wanted:
                    break
        if len(held) == wanted:
            break
        for _, f in held:
            f.close()
        if not waited:
            log.info("waiting for %d free GPU(s) of %s (locks in %s)", wanted, ",".join(ids), lock_dir)
            waited = True
        time.sleep(CLAIM_POLL_S)
    claimed = [gpu for gpu, _ in held]
    _claimed.extend(f for _, f in held)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    log.info("claimed GPU(s) %s of %s", ",".join(claimed), ",".join(ids))
    return claimed
