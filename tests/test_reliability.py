"""Bad configuration, corrupt intermediate files, label leakage and unsafe metadata: each is caught
with a message naming the key, file, plate, well or site at fault, and never silently used.

The configuration and metadata cases run the real `snakemake` (a few seconds each) in an empty
working directory and check that no job started; the file cases call the CLI the rules call.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from deepnoise import checkpoint, cli, configcheck, data, layout, metadata, models, stacks, train
from deepnoise import weights as weights_file
from deepnoise.ensemble import load_predictions, save_predictions
from deepnoise.errors import InputError
from tests.fixtures import train as tf
from tests.fixtures.rxrx1 import metadata as rxrx1_metadata
from tests.fixtures.workflow import REPO, load_tiny, snakemake, write_config

# ------------------------------------------------------------------------------------------------
# Configuration: rejected before any job starts, naming the key and the allowed values

BAD_CONFIGS = {
    "unknown top-level key": ({"round": 2}, r"config round: unknown key \(did you mean rounds\?\)"),
    "unknown training key": ({"train.lrr": 0.1}, r"config train\.lrr: unknown key \(did you mean lr\?\)"),
    "unknown model key": ({"models.r10.epoch": 3}, r"config models\.r10\.epoch: unknown key"),
    "wrong type": ({"train.epochs": "ten"}, r"config train\.epochs: expected integer, got a string"),
    "wrong type in a model": (
        {"models.r18.seed": 1.5},
        r"config models\.r18\.seed: expected integer, got a number",
    ),
    "value outside an enum": (
        {"balance.method": "exakt"},
        r"config balance\.method: 'exakt' is not allowed \(did you mean exact\?\); "
        r"allowed values: groups, exact, paper, none",
    ),
    "renamed balancing method": (
        {"balance.method": "iterative"},
        r"config balance\.method: 'iterative' is not allowed \(the old 'iterative' is now paper "
        r".*groups.*\); "
        r"allowed values: groups, exact, paper, none",
    ),
    "unknown model name": (
        {"models.r10.backbone": "resnet10"},
        r"config models\.r10\.backbone: 'resnet10' is not a timm .* model .*did you mean resnet10t",
    ),
    "cell type not in the metadata": (
        {"cell_types": ["HEPG2"]},
        r"config cell_types: 'HEPG2' is not a cell type of the data; allowed values: HUVEC, RPE",
    ),
    "round count below 1": ({"rounds": 0}, r"config rounds: must be >= 1, got 0"),
    "missing data path": (
        {"data.source": "rxrx1", "data.root": "/nonexistent/rxrx1"},
        r"config data\.root: '/nonexistent/rxrx1' is not a folder",
    ),
    "unknown synthetic key": (
        {"synthetic.pixel_nois": 3.0},
        r"config synthetic: unknown key 'pixel_nois' \(did you mean pixel_noise[,?]",
    ),
    "validation experiment that is not labelled": (
        {"split.validation_experiments": ["HUVEC-03"]},
        r"config split\.validation_experiments: 'HUVEC-03' is not a labelled experiment; "
        r"allowed values: HUVEC-01, HUVEC-02, RPE-01, RPE-02",
    ),
}


def set_dotted(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        cfg = cfg[key]
    cfg[last] = value


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_rejected_before_any_job(case, tmp_path):
    changes, expected = BAD_CONFIGS[case]
    cfg = load_tiny()
    for key, value in changes.items():
        set_dotted(cfg, key, value)
    configfile = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(configfile), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert re.search(expected, text), text[-3000:]
    started = [p.name for p in tmp_path.iterdir() if p.name in {"results", "resources", "logs"}]
    assert not started, f"jobs started despite the bad config: {started}"


def test_shipped_configs_pass_the_checks():
    schema = configcheck.load_schema(REPO / "workflow/schemas/config.schema.yaml")
    for name in (
        "config/config.yaml",
        "config/rxrx1.yaml",
        "tests/configs/tiny.yaml",
    ):
        cfg = yaml.safe_load((REPO / name).read_text())
        assert configcheck.schema_problems(cfg, schema) == [], name
        assert configcheck.train_problems(cfg) == [], name


def test_timm_registry_read_from_source_equals_timm():
    import timm

    assert configcheck.timm_models() == frozenset(timm.list_models())
    assert configcheck.backbone_problem("legacy_xception", "k") is None
    assert configcheck.backbone_problem("resnet18.a1_in1k", "k") is None  # a pretrained tag
    assert configcheck.backbone_problem("xception_wide", "k") is None
    assert "did you mean" in configcheck.backbone_problem("legacy_xceptoin", "models.a.backbone")
    # the alias users type: the recipe's legacy_xception and our wide one come first
    assert "(did you mean legacy_xception, xception_wide, " in configcheck.backbone_problem("xception", "k")


# ------------------------------------------------------------------------------------------------
# Safety: metadata values cannot reach a shell; checkpoints load without unpickling code


def test_metadata_with_shell_syntax_is_rejected_at_parse_time(tmp_path):
    data_dir = tmp_path / "rxrx1"
    data_dir.mkdir()
    df = rxrx1_metadata(1)
    evil = "HUVEC-01;touch PWNED"
    df.loc[df.index[5:], "experiment"] = evil
    df.to_csv(data_dir / "metadata.csv", index=False)
    cfg = load_tiny(**{"data.source": "rxrx1", "data.root": str(data_dir)})
    configfile = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(configfile), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"metadata.csv: row 7: experiment '{evil}' is not a valid name" in text, text[-3000:]
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


@pytest.mark.parametrize(
    "column, value",
    [("experiment", "HUVEC-01$(id)"), ("well", "B02`id`"), ("cell_type", "HUVEC 2"), ("experiment", "../x")],
)
def test_site_table_rejects_unsafe_names(column, value):
    df = rxrx1_metadata(1).head(8).copy()
    df.loc[3, column] = value
    with pytest.raises(
        InputError, match=rf"site {re.escape(df.site_id[3])}: {column} .* is not a valid name"
    ):
        metadata.validate(df, None)


def _shell_templates() -> list[tuple[str, str]]:
    """(file, shell string) of every rule (adjacent string literals joined)."""
    out = []
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = path.read_text()
        for block in re.findall(r"^    shell:\n((?:        .*\n?)+)", text, re.M):
            out.append((path.name, "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block))))
    return out


def test_every_shell_word_from_paths_params_or_wildcards_is_quoted():
    templates = _shell_templates()
    assert len(templates) >= 15, templates
    for name, shell in templates:
        for field in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", shell):
            if field == "threads":
                continue  # an int from the rule
            assert field.endswith(":q"), f"{name}: {{{field}}} is not shell-quoted in: {shell}"


def test_wildcard_constraints_escape_names():
    text = (REPO / "workflow/rules/common.smk").read_text()
    constraints = text.split("wildcard_constraints:", 1)[1].split("\n\n", 1)[0]
    for name in ("experiment", "cell_type", "model"):
        assert re.search(rf"{name}=one_of\(", constraints), constraints
    assert "re.escape" in text.split("def one_of", 1)[1].split("\n\n", 1)[0]


class Evil:
    """Unpickling this object runs code (writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def evil_file(tmp_path, monkeypatch):
    # make torch's default the unsafe one, so only an explicit weights_only=True protects
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"student": Evil(str(marker)), "teacher": {}, "model_config": {}}, path)
    return path, marker


@pytest.mark.parametrize(
    "loader",
    [checkpoint.load_checkpoint, weights_file.load_weights, models._load_state_file],
    ids=lambda f: f.__name__,
)
def test_checkpoints_load_without_running_pickled_code(evil_file, loader):
    path, marker = evil_file
    with pytest.raises(InputError, match=re.escape(str(path))):
        loader(path)
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"


def test_predictions_are_read_without_pickle(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, well_id=np.array([{"a": 1}], dtype=object), probs=np.ones((1, 2)))
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_predictions(path)


# ------------------------------------------------------------------------------------------------
# No leakage: the test experiments' labels never reach training or pseudo labels


def test_test_labels_do_not_reach_the_site_table(tmp_path):
    """RxRx1's metadata.csv carries every label; shuffling the test experiment's labels changes the
    truth file only, never the site table or the classes that training reads."""
    df = rxrx1_metadata(2)
    df.loc[df.experiment == "RPE-01", "dataset"] = "test"
    runs = []
    for shuffle in (False, True):
        d = df.copy()
        if shuffle:
            rng = np.random.default_rng(0)
            treat = (d.dataset == "test") & (d.well_type == "treatment") & (d.site == 1)
            for plate in layout.PLATES:
                rows = d.index[treat & (d.plate == plate)]
                perm = rng.permutation(len(rows))
                for col in ("sirna", "sirna_id"):
                    first = d.loc[rows, col].to_numpy()[perm]
                    d.loc[rows, col] = first
                    d.loc[rows + 1, col] = first  # site 2 follows site 1
        root = tmp_path / f"data{int(shuffle)}"
        root.mkdir()
        d.to_csv(root / "metadata.csv", index=False)
        sites, truth, classes = metadata.build_sites("rxrx1", root, check_images=False)
        runs.append((sites.drop(columns="path"), truth, classes))
    (s0, t0, c0), (s1, t1, c1) = runs
    test_rows = s0[s0.dataset == "test"]
    assert len(test_rows) and (test_rows[test_rows.well_type == "treatment"].sirna_id == -1).all()
    assert s0.equals(s1) and c0 == c1
    assert not t0.equals(t1)  # the labels did change, in the truth file only


def test_training_never_takes_labels_of_test_experiments(tiny_screen):
    """Even a site table that carried the test labels would not label a test well for training: the
    labelled set is `dataset == train` minus validation; unlabelled targets are pseudo labels only."""
    sites = metadata.read_sites(tiny_screen.sites)
    test = sites["dataset"] == "test"
    sites.loc[test, "sirna_id"] = [tiny_screen.truth[w] for w in sites.loc[test, "well_id"]]  # leaked
    a_test_well = sites.loc[test, "well_id"].iloc[0]
    td = train.select_wells(
        sites,
        json.loads(tiny_screen.classes.read_text()),
        data.StackIndex.build(tiny_screen.stacks),
        train.TrainConfig(),
        "all",
        ["HUVEC-02"],
        {a_test_well: 1},
    )
    assert set(td.labelled["experiment"]) == {"HUVEC-01"}
    assert set(td.validation["experiment"]) == {"HUVEC-02"}
    targets = dict(zip(td.unlabelled["well_id"], td.unlabelled["pseudo"], strict=True))
    assert targets.pop(a_test_well) == 1 and set(targets.values()) == {-1}


def test_truth_is_no_input_of_training_or_pseudo_labels(tmp_path):
    from tests.fixtures.workflow import plan

    configfile = write_config(tmp_path, load_tiny())
    jobs = plan(tmp_path, configfile, "--forceall")
    consumers = {j.rule for j in jobs if "test_truth" in j.input}
    assert consumers <= {"sites", "metrics"}, consumers
    assert "metrics" in consumers


# ------------------------------------------------------------------------------------------------
# Corrupt intermediate files: named, never used, no output left behind


# tiny_screen and tiny_model (tests/conftest.py) are shared by the whole session: a test that damages
# a stack damages a copy (_copy_screen); outputs go to the test's tmp_path.


def _copy_screen(scr, tmp_path):
    """A copy of the screen's stacks whose first stack the test may damage."""
    stacks_copy = []
    for p in scr.stacks:
        dst = tmp_path / "stacks" / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
        stacks_copy.append(dst)
    return stacks_copy


def _predict(scr, weights, stack_files, out, workers=0):
    return cli.main(
        [
            "predict", "--weights", str(weights), "--sites", str(scr.sites),
            "--stacks", *map(str, stack_files), "--stats", *map(str, scr.stats),
            "--cell-type", "HUVEC", "--experiments", "HUVEC-02", "HUVEC-03", "--out", str(out),
            "--batch-size", "4", "--threads", "1", "--num-workers", str(workers), "--device", "cpu",
        ]
    )  # fmt: skip


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def edit_pixels(path: Path, row: int = 3) -> None:
    with h5py.File(path, "r+") as f:
        img = f["images"][row]
        img[0, 0, 0] ^= 0xFF
        f["images"][row] = img


def duplicate_well(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        wells = f["well"][()]
        wells[2] = wells[0]
        f["well"][...] = wells


def drop_checksums(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["crc32"]


def short_sites_without_ids(path: Path) -> None:
    """A stack written by other code (no site_id) whose `site` dataset lost a row."""
    with h5py.File(path, "r+") as f:
        sites = f["site"][()]
        del f["site"]
        if "site_id" in f:
            del f["site_id"]
        f["site"] = sites[:-1]


STACK_DAMAGE = {
    "truncated": (truncate, r"cannot open the HDF5 plate stack \(truncated"),
    "sites short, no site ids": (short_sites_without_ids, r"dataset 'site' has \d+ rows for \d+ sites"),
    "pixels edited": (edit_pixels, r"site HUVEC-01_1_\w+_\d \(row 3\) does not match the checksum"),
    "well duplicated": (duplicate_well, r"well \w+ site \d occurs more than once"),
    "checksums removed": (drop_checksums, r"plate stack lacks datasets \['crc32'\]"),
}


@pytest.mark.parametrize("damage", list(STACK_DAMAGE))
def test_damaged_stack_is_named_by_plate_stats(tiny_screen, tmp_path, damage, capsys):
    harm, expected = STACK_DAMAGE[damage]
    stack = _copy_screen(tiny_screen, tmp_path)[0]
    harm(stack)
    out = tmp_path / "stats.json"
    assert cli.main(["plate-stats", "--stack", str(stack), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(stack) in err and re.search(expected, err), err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "pixels edited", "well duplicated"])
@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_stack_is_never_used_for_prediction(
    tiny_screen, tiny_model, tmp_path, damage, workers, capsys
):
    harm, expected = STACK_DAMAGE[damage]
    stack_files = _copy_screen(tiny_screen, tmp_path)
    victim = next(p for p in stack_files if p.parent.name == "HUVEC-02")
    harm(victim)
    out = tmp_path / "pred.npz"
    assert _predict(tiny_screen, tiny_model, stack_files, out, workers) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and re.search(expected.replace("HUVEC-01", "HUVEC-02"), err), err
    assert not out.exists() and not list(tmp_path.glob(".pred.npz*"))


def test_damaged_stack_stops_training(tiny_screen, tmp_path):
    stack_files = _copy_screen(tiny_screen, tmp_path)
    with h5py.File(stack_files[0]) as f:
        n_sites = f["images"].shape[0]
    for row in range(n_sites):  # every site: training reads one random site per well
        edit_pixels(stack_files[0], row=row)
    with pytest.raises(
        InputError, match=rf"{re.escape(str(stack_files[0]))}: site .* does not match the checksum"
    ):
        tf.train_tiny(tiny_screen, tmp_path / "m", {"epochs": 1}, stacks=[str(p) for p in stack_files])
    assert not (tmp_path / "m" / "weights.pt").exists()


def test_corrupt_resume_checkpoint_is_named_and_kept(tiny_screen, tmp_path):
    ckpt = tmp_path / "m" / "ckpt" / checkpoint.CHECKPOINT_NAME
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(InputError, match=rf"{re.escape(str(ckpt))}: cannot read the resume checkpoint.*rm "):
        tf.train_tiny(tiny_screen, tmp_path / "m", {"epochs": 1})
    assert ckpt.read_bytes().startswith(b"PK\x03\x04 not")  # not silently replaced
    torch.save({"epoch": 0}, ckpt)
    with pytest.raises(InputError, match="not a deepnoise resume checkpoint"):
        tf.train_tiny(tiny_screen, tmp_path / "m", {"epochs": 1})
    assert not (tmp_path / "m" / "weights.pt").exists()


def test_second_training_into_the_same_checkpoints_is_refused(tiny_screen, tmp_path):
    ckpt_dir = tmp_path / "m" / "ckpt"
    with checkpoint.checkpoint_lock(ckpt_dir):
        with pytest.raises(
            InputError, match=rf"{re.escape(str(ckpt_dir))}: checkpoint directory in use by pid {os.getpid()}"
        ):
            tf.train_tiny(tiny_screen, tmp_path / "m", {"epochs": 1})
    tf.train_tiny(tiny_screen, tmp_path / "m", {"epochs": 1})  # the lock went with its holder


def test_the_lock_dies_with_the_trainer_whatever_its_loader_workers_do(tmp_path):
    """kill -9 of a process holding the checkpoint lock frees the directory at once, while a forked
    child (a DataLoader worker) of it still lives: the lock is the process's, not inherited."""
    import signal
    import subprocess
    import time

    ckpt_dir = tmp_path / "ckpt"
    ready = tmp_path / "ready"
    code = f"""
import os, time
from deepnoise import checkpoint
with checkpoint.checkpoint_lock({str(ckpt_dir)!r}):
    child = os.fork()
    if child == 0:  # a loader worker: inherits the open lock file, lives on
        time.sleep(60)
        os._exit(0)
    open({str(ready) + ".tmp"!r}, "w").write(str(child))
    os.replace({str(ready) + ".tmp"!r}, {str(ready)!r})
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 300  # importing torch takes long on a loaded machine
        while not (ready.exists() and ready.read_text()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        assert proc.poll() is None, f"the lock holder died: {proc.returncode}"
        child = int(ready.read_text())
        with pytest.raises(InputError, match=f"in use by pid {proc.pid} on "):
            with checkpoint.checkpoint_lock(ckpt_dir):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(child, 0)  # the worker still lives
        with checkpoint.checkpoint_lock(ckpt_dir):  # and the directory is free
            pass
    finally:
        proc.kill()
        if ready.exists() and ready.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(ready.read_text()), signal.SIGKILL)


def test_corrupt_or_foreign_weights_are_named(tiny_screen, tiny_model, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(tiny_model.read_bytes()[:1000])
    assert _predict(tiny_screen, bad, tiny_screen.stacks, tmp_path / "p.npz") == 2
    assert f"{bad}: cannot read weights (truncated or corrupt" in capsys.readouterr().err
    state = torch.load(tiny_model, weights_only=True)
    torch.save({**state, "scope": "RPE"}, bad)
    assert _predict(tiny_screen, bad, tiny_screen.stacks, tmp_path / "p.npz") == 2
    assert f"{bad}: weights fine-tuned for 'RPE', not for cell type HUVEC" in capsys.readouterr().err
    assert not (tmp_path / "p.npz").exists()


@pytest.fixture(scope="module")
def predictions(tiny_screen, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "pred.npz"
    assert _predict(tiny_screen, tiny_model, tiny_screen.stacks, out) == 0
    return tiny_screen, out


def _balance(scr, pred, out, *extra):
    return cli.main(
        [
            "balance",
            "--predictions",
            str(pred),
            "--sites",
            str(scr.sites),
            "--method",
            "none",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_predictions_with_a_foreign_well_are_refused(predictions, tmp_path, capsys):
    scr, path = predictions
    p = load_predictions(path)
    p.well_id[0] = "HUVEC-09_1_B02"
    bad = tmp_path / "bad.npz"
    save_predictions(p, bad)
    out = tmp_path / "balanced.npz"
    assert _balance(scr, bad, out) == 2
    assert f"{bad}: well HUVEC-09_1_B02 is not a treatment well of the site table" in capsys.readouterr().err
    assert not out.exists()


def test_predictions_with_mislabelled_or_missing_wells_are_refused(predictions, tmp_path, capsys):
    scr, path = predictions
    p = load_predictions(path)
    moved = p.take(np.arange(len(p)))
    moved.plate[0] = 2 if moved.plate[0] == 1 else 1
    bad = tmp_path / "moved.npz"
    save_predictions(moved, bad)
    out = tmp_path / "balanced.npz"
    assert _balance(scr, bad, out) == 2
    assert f"{bad}: well {p.well_id[0]} has plate" in capsys.readouterr().err
    short = tmp_path / "short.npz"
    save_predictions(p.take(np.arange(1, len(p))), short)
    assert _balance(scr, short, out) == 2
    assert f"{short}: lacks well {p.well_id[0]}" in capsys.readouterr().err
    assert not out.exists()
    assert _balance(scr, short, out, "--allow-missing") == 0  # when the user says so
    assert _balance(scr, path, out) == 0


def test_stack_check_reports_structure(tiny_screen):
    info = stacks.check_stack(tiny_screen.stacks[0])
    assert info.attrs["experiment"] == "HUVEC-01" and len(info.crc32) == info.shape[0]
    index = data.StackIndex.build(tiny_screen.stacks)
    assert len(index.crcs) == len(tiny_screen.stacks)


# ------------------------------------------------------------------------------------------------
# Outputs: the umask's modes, no leftovers of killed writes, a full disk named (issue 16)

from deepnoise import atomic  # noqa: E402


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_outputs_honour_the_umask(tmp_path, umask_022):
    writers = {
        "a.txt": lambda p: p.write_text("x"),
        "b.npz": lambda p: np.savez(p, x=np.ones(2)),
        "c.pt": lambda p: torch.save({"x": torch.ones(2)}, p),
        "d.h5": lambda p: h5py.File(p, "w").close(),
    }
    for name, write in writers.items():
        with atomic.atomic_path(tmp_path / "out" / name) as tmp:
            write(tmp)
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    folder = atomic.temp_dir(tmp_path / "images")
    assert folder.stat().st_mode & 0o777 == 0o755


def test_the_next_write_removes_a_killed_writes_temporary_file(tmp_path):
    out = tmp_path / "results" / "x.h5"
    # a real kill -9 inside the atomic block leaves the temporary file behind
    code = (
        "import os, sys; from deepnoise.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as t:\n    t.write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n"
    )
    proc = __import__("subprocess").run([sys.executable, "-c", code, str(out)], env=os.environ)
    assert proc.returncode == -9
    left = atomic.stale_temps(out)
    assert len(left) == 1 and left[0].stat().st_size == 1000
    others = [
        tmp_path / "results" / ".x.h5.tmp-0123456789abcdef.npz",  # another suffix: another output
        tmp_path / "results" / ".y.h5.tmp-0123456789abcdef.h5",  # another output
        tmp_path / "results" / ".x.h5.tmp-notarandomname.h5",  # not our naming
        tmp_path / "results" / "x.h5.bak",
    ]
    for p in others:
        p.write_text("keep")
    with atomic.atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert atomic.stale_temps(out) == [] and not left[0].exists()
    assert all(p.exists() for p in others)


def test_a_killed_synthesize_leaves_no_folder_after_the_rerun(tmp_path):
    images = tmp_path / "images"
    stale = tmp_path / ".images.tmp-0123456789abcdef"
    (stale / "HUVEC-01").mkdir(parents=True)
    fresh = atomic.temp_dir(images)
    assert not stale.exists() and fresh.is_dir()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos; basic_ios::clear: iostream error"
        ),
        OSError(28, "No space left on device"),
    ],
    ids=["torch", "enospc"],
)
def test_a_full_disk_is_named_with_the_path_and_the_space(tmp_path, monkeypatch, error):
    out = tmp_path / "results" / "weights.pt"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(InputError) as info:
        with atomic.atomic_path(out) as tmp:
            tmp.write_bytes(b"x" * 300_000)
            raise error
    msg = str(info.value)
    assert msg.startswith(f"{out}: the disk is full"), msg
    assert "after 293.0 KiB" in msg and "4.0 KiB free" in msg and "at least 293.0 KiB needed" in msg, msg
    assert info.value.__cause__ is error
    assert list(out.parent.iterdir()) == []


def test_other_writer_errors_pass_unchanged_when_there_is_space(tmp_path):
    out = tmp_path / "weights.pt"
    with pytest.raises(RuntimeError, match="a bug"):
        with atomic.atomic_path(out) as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []
