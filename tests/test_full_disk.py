"""A full disk, for real: a stack, a training checkpoint and a predictions file written onto a small
tmpfs that runs out of space. Each fails with one line naming the path and the space, leaves no
partial output, and once space is freed the same command writes what it writes on an empty disk.

Needs root (``mount -t tmpfs``), as the loopback Slurm tests do; skipped elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from deepnoise import cli
from deepnoise.metadata import build_sites
from tests.fixtures import train as tf
from tests.fixtures.data import write_rxrx1


@pytest.fixture
def small_fs(tmp_path):
    """A 256 MB tmpfs (RAM only as written); ``fill(mnt, leave)`` leaves ``leave`` bytes free."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def unfill(mnt: Path) -> None:
    (mnt / "filler").unlink()


def leftovers(mnt: Path) -> list[str]:
    return sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file() and p.name != "filler")


def test_a_stack_on_a_full_disk(small_fs, tmp_path, capsys):
    root = write_rxrx1(tmp_path / "rxrx1", size=64)  # ~0.1 MB of images per plate
    df, _, _ = build_sites("rxrx1", root)
    df.to_csv(tmp_path / "sites.csv", index=False)
    args = ["stack", "--sites", str(tmp_path / "sites.csv"), "--experiment", "HUVEC-01", "--plate", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "ref.h5")]) == 0
    out = small_fs / "stacks" / "Plate1.h5"
    fill(small_fs, 16 * 1024)
    capsys.readouterr()
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: the disk is full" in err, err
    assert leftovers(small_fs) == [], leftovers(small_fs)  # no stack, no temporary file
    unfill(small_fs)
    assert cli.main([*args, "--out", str(out)]) == 0
    assert same_stack(out, tmp_path / "ref.h5")


def same_stack(a: Path, b: Path) -> bool:
    """Every dataset and attribute equal, but the time the stack was written (``created``)."""
    with h5py.File(a) as x, h5py.File(b) as y:
        attrs = [k for k in {*x.attrs, *y.attrs} if k != "created"]
        return (
            set(x) == set(y)
            and all(np.array_equal(x[k][()], y[k][()]) for k in x)
            and all(str(x.attrs.get(k)) == str(y.attrs.get(k)) for k in attrs)
        )


def test_a_checkpoint_on_a_full_disk(small_fs, tiny_screen, tmp_path, capsys):
    ref = tf.train_tiny(tiny_screen, tmp_path / "ref", {"epochs": 2})
    ckpt = small_fs / "ckpt"
    out = tmp_path / "run"
    out.mkdir()
    fill(small_fs, 16 * 1024)  # the checkpoint (student, teacher, Adam state, best model) cannot fit
    with pytest.raises(Exception) as err:
        tf.train_tiny(tiny_screen, out, {"epochs": 2}, checkpoint_dir=str(ckpt))
    text = str(err.value)
    assert f"{ckpt / 'last.pt'}: the disk is full" in text, text
    assert [p for p in leftovers(small_fs) if p != "ckpt/.lock"] == []  # no partial last.pt
    assert not (out / "weights.pt").exists()
    unfill(small_fs)
    got = tf.train_tiny(tiny_screen, out, {"epochs": 2}, checkpoint_dir=str(ckpt))
    assert got.keys() == ref.keys()
    for key in ref:
        if hasattr(ref[key], "keys"):
            for k in ref[key]:
                assert np.array_equal(np.asarray(ref[key][k]), np.asarray(got[key][k])), (key, k)


def test_predictions_on_a_full_disk(small_fs, tiny_screen, tiny_model, tmp_path, capsys):
    args = [
        "predict", "--weights", str(tiny_model), "--sites", str(tiny_screen.sites),
        "--stacks", *map(str, tiny_screen.stacks), "--stats", *map(str, tiny_screen.stats),
        "--cell-type", "HUVEC", "--experiments", "HUVEC-02", "HUVEC-03", "--batch-size", "4",
        "--threads", "1", "--num-workers", "0", "--device", "cpu",
    ]  # fmt: skip
    assert cli.main([*args, "--out", str(tmp_path / "ref.npz")]) == 0
    out = small_fs / "predictions" / "HUVEC.npz"
    fill(small_fs, 0)
    capsys.readouterr()
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: the disk is full" in err, err
    assert leftovers(small_fs) == []
    unfill(small_fs)
    assert cli.main([*args, "--out", str(out)]) == 0
    assert (tmp_path / "ref.npz").read_bytes() == out.read_bytes()


def test_stack_reference_is_a_real_plate(tmp_path):
    """The stack test's plate is big enough to overflow 16 KB (else it would prove nothing)."""
    root = write_rxrx1(tmp_path / "rxrx1", size=64)
    df, _, _ = build_sites("rxrx1", root)
    df.to_csv(tmp_path / "sites.csv", index=False)
    out = tmp_path / "p.h5"
    assert cli.main(["stack", "--sites", str(tmp_path / "sites.csv"), "--experiment", "HUVEC-01",
                     "--plate", "1", "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 64 * 1024
    with h5py.File(out) as f:
        assert f["images"].shape[-1] == 64
