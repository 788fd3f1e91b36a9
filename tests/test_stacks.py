"""PNG -> HDF5 plate stacks: content, threads, compression, and one test per bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from deepnoise.cli import main
from deepnoise.metadata import build_sites
from tests.fixtures.data import site_image, write_png, write_rxrx1

EXPERIMENT, PLATE = "HUVEC-02", 2


@pytest.fixture
def release(tmp_path):
    root = write_rxrx1(tmp_path / "rel")
    df, _, _ = build_sites("rxrx1", root)
    df.to_csv(tmp_path / "sites.csv", index=False)
    return root, tmp_path / "sites.csv", df


def stack(sites, out, *extra):
    return main(
        [
            "stack",
            "--sites",
            str(sites),
            "--experiment",
            EXPERIMENT,
            "--plate",
            str(PLATE),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "options", [[], ["--threads", "3"], ["--compression", "lzf"], ["--compression", "gzip-1"]]
)
def test_stack_content(release, tmp_path, options):
    _, sites, df = release
    out = tmp_path / "stacks" / EXPERIMENT / f"Plate{PLATE}.h5"
    assert stack(sites, out, *options) == 0
    plate = df[(df.experiment == EXPERIMENT) & (df.plate == PLATE)].reset_index(drop=True)
    with h5py.File(out) as f:
        images = f["images"]
        assert images.shape == (len(plate), 6, 16, 16) and images.dtype == np.uint8
        assert images.chunks == (1, 6, 16, 16)
        for i, r in plate.iterrows():
            np.testing.assert_array_equal(images[i], site_image(EXPERIMENT, PLATE, r.well, r.site))
        assert list(f["well"].asstr()[:]) == list(plate.well)
        assert list(f["well_id"].asstr()[:]) == list(plate.well_id)
        assert list(f["well_type"].asstr()[:]) == list(plate.well_type)
        assert list(f["dataset"].asstr()[:]) == ["test"] * len(plate)
        assert f["site"].dtype == np.int8 and list(f["site"][:]) == list(plate.site)
        assert f["sirna_id"].dtype == np.int32 and list(f["sirna_id"][:]) == list(plate.sirna_id)
        attrs = dict(f.attrs)
    assert attrs["experiment"] == EXPERIMENT and attrs["plate"] == PLATE and attrs["cell_type"] == "HUVEC"
    assert attrs["n_sites"] == len(plate) and attrs["image_size"] == 16
    assert {"source", "created", "deepnoise_version"} <= set(attrs)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def _bad_png_cases():
    def missing(path):
        path.unlink()

    def truncated(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def not_png(path):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(path, format="JPEG")

    def wrong_size(path):
        write_png(path, np.zeros((16, 20), np.uint8))

    def sixteen_bit(path):
        Image.fromarray(np.full((16, 16), 1000, np.uint16)).save(path, format="PNG")

    def rgb(path):
        write_png(path, np.zeros((16, 16, 3), np.uint8))

    return {
        "missing": (missing, "is missing"),
        "truncated": (truncated, "truncated"),
        "not_png": (not_png, "not a PNG"),
        "wrong_size": (wrong_size, "image size 20x16, expected 16x16"),
        "16bit": (sixteen_bit, "expected 8-bit grayscale"),
        "rgb": (rgb, "got mode RGB"),
    }


BAD = _bad_png_cases()


def _assert_failed(capsys, rc, out, *needles):
    assert rc == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temp file either


@pytest.mark.parametrize("victim", ["C05_s2_w3.png", "B02_s1_w1.png"])  # B02_s1_w1: the plate's first PNG
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_png(release, tmp_path, capsys, case, threads, victim):
    root, sites, _ = release
    victim = root / "images" / EXPERIMENT / f"Plate{PLATE}" / victim
    damage, message = BAD[case]
    damage(victim)
    out = tmp_path / "stacks" / EXPERIMENT / f"Plate{PLATE}.h5"
    _assert_failed(capsys, stack(sites, out, "--threads", threads), out, str(victim), message)


def test_png_without_site_row(release, tmp_path, capsys):
    root, sites, _ = release
    extra = root / "images" / EXPERIMENT / f"Plate{PLATE}" / "K11_s1_w1.png"
    write_png(extra, np.zeros((16, 16), np.uint8))
    out = tmp_path / "stacks" / f"Plate{PLATE}.h5"
    _assert_failed(capsys, stack(sites, out), out, f"{extra}: image has no")


def test_unknown_plate_and_compression(release, tmp_path, capsys):
    _, sites, _ = release
    out = tmp_path / "stacks" / "x.h5"
    rc = main(["stack", "--sites", str(sites), "--experiment", "HUVEC-09", "--plate", "1", "--out", str(out)])
    _assert_failed(capsys, rc, out, "no sites for experiment HUVEC-09 plate 1")
    _assert_failed(capsys, stack(sites, out, "--compression", "zstd"), out, "'zstd'")


# ------------------------------------------------------------------------------------------------
# Stacks know their PNGs: a real tiny snakemake run (stacks and plate statistics of 2 experiments)
# on an rxrx1-layout release; the outputs get the umask's modes

import os  # noqa: E402
import stat  # noqa: E402

from tests.fixtures.workflow import load_tiny, plan, snakemake, write_config  # noqa: E402

RUN_EXPERIMENTS = ("HUVEC-01", "RPE-01")


def _targets():
    return [f"results/stats/plate/{e}/Plate{p}.json" for e in RUN_EXPERIMENTS for p in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    old = os.umask(0o022)
    try:
        synth = tmp_path_factory.mktemp("synth")
        cfg = load_tiny()
        configfile = write_config(synth, cfg)
        snakemake(synth, "resources/synthetic/metadata.csv", "--cores", "2", "--configfile", str(configfile))
        run = tmp_path_factory.mktemp("run")
        cfg = load_tiny(**{"data.source": "rxrx1", "data.root": str(synth / "resources/synthetic")})
        configfile = write_config(run, cfg)
        snakemake(run, *_targets(), "--cores", "2", "--configfile", str(configfile))
    finally:
        os.umask(old)
    return run, configfile, synth / "resources/synthetic/images"


def test_outputs_have_the_modes_of_the_umask(stacked):
    run, _, images = stacked
    paths = [p for top in (run / "results", run / "logs", images.parent) for p in [top, *top.rglob("*")]]
    assert len(paths) > 30
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"


def _planned(stacked):
    run, configfile, _ = stacked
    return sorted(
        (j.rule, j.wc("experiment"), j.wc("plate"))
        for j in plan(run, configfile, "--cores", "1", *_targets())
    )


def test_nothing_changed_nothing_planned(stacked):
    assert _planned(stacked) == []


@pytest.mark.parametrize("change", ["touch", "replace", "add", "delete"])
def test_a_changed_png_reruns_exactly_its_plates_stack(stacked, change):
    _, _, images = stacked
    folder = images / "RPE-01" / "Plate3"
    victim = sorted(folder.iterdir())[5]
    before = victim.read_bytes(), victim.stat()
    extra = folder / "P24_s1_w1.png"
    try:
        if change == "touch":
            os.utime(victim, ns=(before[1].st_atime_ns, before[1].st_mtime_ns + 10**9))
        elif change == "replace":  # another PNG of the same size, renamed over it (as cp/rsync do)
            tmp = folder / "new.tmp"
            tmp.write_bytes(sorted(folder.iterdir())[6].read_bytes())
            tmp.replace(victim)
        elif change == "add":
            extra.write_bytes(before[0])
        else:
            victim.unlink()
        assert _planned(stacked) == [("plate_stats", "RPE-01", "3"), ("stack", "RPE-01", "3")]
    finally:
        extra.unlink(missing_ok=True)
        victim.write_bytes(before[0])
        os.utime(victim, ns=(before[1].st_atime_ns, before[1].st_mtime_ns))
    assert _planned(stacked) == []


def test_the_stack_refuses_pngs_that_differ_from_the_plan(release, tmp_path, capsys):
    root, sites, _ = release
    out = tmp_path / "stacks" / EXPERIMENT / f"Plate{PLATE}.h5"
    folder = root / "images" / EXPERIMENT / f"Plate{PLATE}"
    from deepnoise.metadata import png_fingerprint

    planned = png_fingerprint(folder)
    victim = folder / "C05_s2_w3.png"
    os.utime(victim, ns=(0, victim.stat().st_mtime_ns + 1))
    rc = stack(sites, out, "--pngs", planned)
    _assert_failed(capsys, rc, out, f"{folder}: the plate's PNGs changed before", planned)
    assert stack(sites, out, "--pngs", png_fingerprint(folder)) == 0
