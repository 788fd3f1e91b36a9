"""The training keys have one definition (deepnoise.hparams.TrainConfig): the schema's training
sections and config/README.md's key table are generated from it, the job's checks and the schema
agree on every key, one merge gives each model's keys, and a value that would fail a job or learn
nothing is refused at parse time by a real `snakemake -n`, once, naming its key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import jsonschema
import pandas as pd
import pytest

from deepnoise import configcheck, hparams, split
from deepnoise.errors import InputError
from deepnoise.hparams import TrainConfig
from deepnoise.layout import Experiment
from tests.fixtures.rxrx1 import metadata as rxrx1_metadata
from tests.fixtures.workflow import REPO, load_tiny, snakemake, write_config

SCHEMA = configcheck.load_schema(REPO / "workflow/schemas/config.schema.yaml")


def test_generated_schema_and_key_table_are_current():
    """Fails when TrainConfig changed and `python -m deepnoise.hparams --write` was not run."""
    for path, text in hparams.generated(REPO).items():
        assert path.read_text() == text, (
            f"{path} drifted: run PYTHONPATH=scripts python -m deepnoise.hparams --write"
        )
    assert hparams.main(["--check"]) == 0


def test_conda_env_pins_the_package_dependencies():
    """envs/deepnoise.yaml (the jobs' environment under --sdm conda) pins exactly pyproject.toml's
    runtime dependencies: nothing missing, nothing only the tests need."""
    import tomllib

    import yaml

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs/deepnoise.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    assert sorted(pip) == sorted(project)


def test_check_reports_a_drifted_file(tmp_path: Path):
    for name in (hparams.SCHEMA_FILE, hparams.README_FILE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((REPO / name).read_text())
    readme = tmp_path / hparams.README_FILE
    readme.write_text(readme.read_text().replace("| `lr` |", "| `learning_rate` |"))
    assert hparams.main(["--check", "--repo", str(tmp_path)]) == 1
    assert hparams.main(["--write", "--repo", str(tmp_path)]) == 0
    assert hparams.main(["--check", "--repo", str(tmp_path)]) == 0


PROBES = [
    -2,
    -1,
    0,
    0.5,
    1,
    1.0,
    2,
    3,
    64,
    True,
    False,
    "x",
    "",
    None,
    [],
    [0.5, 1.0],
    [1, 2],
    [-1],
    [2.0, 1.0],
]


@pytest.mark.parametrize("name", list(TrainConfig.keys()))
def test_schema_and_job_checks_agree_on_every_key(name):
    """The schema (parse time) and TrainConfig.from_dict (the job) accept exactly the same values."""
    section = hparams.section_schema("train")
    for value in PROBES:
        schema_ok = jsonschema.Draft202012Validator(section).is_valid({name: value})
        try:
            TrainConfig.from_dict({name: value})
            job_ok = True
        except InputError:
            job_ok = False
        if job_ok != schema_ok and name in ("lr_milestones", "lr_values", "aug_crop_scale"):
            job_ok = not TrainConfig.key_problems({name: value}, "x")  # cross-key rules are not the schema's
        assert job_ok == schema_ok, (name, value, schema_ok, job_ok)


def test_merge_order_and_per_model_finetune():
    cfg = load_tiny()
    cfg["models"]["r18"]["finetune"] = {"lr": 0.05, "epochs": 7}
    cfg["models"]["r18"]["lr"] = 0.002
    assert hparams.merged(cfg, "r18")["lr"] == 0.002
    assert hparams.merged(cfg, "r18", finetune=True)["lr"] == 0.05  # models.<m>.finetune wins
    assert hparams.merged(cfg, "r18", finetune=True)["epochs"] == 7
    assert hparams.merged(cfg, "r10", finetune=True)["lr"] == cfg["finetune"]["lr"]  # the global one
    assert "finetune" not in hparams.merged(cfg, "r18", finetune=True)
    assert hparams.origin(cfg, "r18", True, "lr") == "models.r18.finetune"
    assert hparams.origin(cfg, "r10", True, "lr") == "finetune"
    assert hparams.origin(cfg, "r10", False, "seed") == "train"


def test_recipe_leaves_out_the_runtime_knobs_and_the_job_takes_them_as_flags():
    cfg = load_tiny()
    assert set(hparams.RUNTIME_KEYS) == {
        "num_workers",
        "val_batch_size",
        "amp",
        "channels_last",
        "cudnn_benchmark",
        "compile",
        "keep_checkpoint",
    }
    assert not set(hparams.recipe(cfg, "r10")) & set(hparams.RUNTIME_KEYS)
    words = hparams.runtime_args({**cfg["train"], "num_workers": 3, "amp": False})
    assert words[:2] == ["--num-workers", "3"] and "--no-amp" in words
    parser = argparse.ArgumentParser()
    hparams.add_runtime_arguments(parser)
    args = parser.parse_args(words)
    run = hparams.with_runtime(TrainConfig.from_dict(hparams.recipe(cfg, "r10")), args)
    assert (run.num_workers, run.amp, run.val_batch_size) == (3, False, 64)
    with pytest.raises(InputError, match="command line.num_workers: must be >= 0"):
        hparams.with_runtime(TrainConfig(), parser.parse_args(["--num-workers", "-1"]))


def test_cross_key_problem_is_reported_once_against_its_section():
    cfg = load_tiny()
    cfg["train"]["lr_milestones"] = [
        1,
        2,
    ]  # both models and both stages inherit it... but finetune sets its own
    problems = hparams.cross_problems(cfg)
    assert problems == [
        "config train.lr_values and train.lr_milestones: need one lr_values entry per lr_milestones entry"
    ]


# ------------------------------------------------------------------------------------------------
# Refused at parse time by a real `snakemake -n`, with exactly one message naming the key

REFUSED = {
    "model lr 0": ({"models.r10.lr": 0}, "config models.r10.lr: must be > 0, got 0"),
    "finetune lr negative": ({"finetune.lr": -0.1}, "config finetune.lr: must be > 0, got -0.1"),
    "lr_values entry 0": ({"train.lr_values": [0.0]}, "config train.lr_values.0: must be > 0, got 0.0"),
    "per-model finetune lr": (
        {"models.r18.finetune": {"lr": 0}},
        "config models.r18.finetune.lr: must be > 0, got 0",
    ),
    "negative workers": ({"train.num_workers": -1}, "config train.num_workers: must be >= 0, got -1"),
    "negative weight decay": (
        {"models.r18.weight_decay": -1e-4},
        "config models.r18.weight_decay: must be >= 0",
    ),
    "negative consistency weight": (
        {"finetune.consistency_weight": -1},
        "config finetune.consistency_weight: must be >= 0, got -1",
    ),
    "negative pseudo weight": (
        {"train.pseudo_weight": -1},
        "config train.pseudo_weight: must be >= 0, got -1",
    ),
    "ema decay out of range": ({"train.ema_decay": 2}, "config train.ema_decay: must be < 1, got 2"),
    "ema decay 1 learns nothing": (
        {"models.r10.ema_decay": 1},
        "config models.r10.ema_decay: must be < 1, got 1",
    ),
    "erase probability": ({"train.aug_erase_p": 1.5}, "config train.aug_erase_p: must be <= 1, got 1.5"),
    "runtime knob under a model": (
        {"models.r10.num_workers": 2},
        "config models.r10.num_workers: a runtime knob (never changes results): set it once under train",
    ),
    "backbone in finetune": ({"finetune.backbone": "resnet18"}, "config finetune.backbone: unknown key"),
    "milestones not increasing": (
        {"finetune.lr_milestones": [3, 2], "finetune.lr_values": [0.1, 0.01]},
        "config finetune.lr_milestones: must be increasing",
    ),
}


def _set(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for k in path:
        cfg = cfg[k]
    cfg[last] = value


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_training_value_is_refused_at_parse_time_once(case, tmp_path):
    changes, message = REFUSED[case]
    cfg = load_tiny()
    for k, v in changes.items():
        _set(cfg, k, v)
    proc = snakemake(
        tmp_path, "-n", "--cores", "1", "--configfile", str(write_config(tmp_path, cfg)), check=False
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "1 configuration problem(s)" in text, text[-3000:]
    assert len(re.findall(re.escape(message), text)) == 1, text[-3000:]
    assert not (tmp_path / "results").exists()


def test_per_model_finetune_settings_reach_only_that_models_finetune(tmp_path):
    cfg = load_tiny()
    cfg["models"]["r18"]["finetune"] = {"lr": 0.0123}
    proc = snakemake(
        tmp_path, "-n", "-p", "--cores", "1", "--configfile", str(write_config(tmp_path, cfg)), "--forceall"
    )
    lines = [ln for ln in proc.stdout.splitlines() if "deepnoise train" in ln]
    finetunes = [ln for ln in lines if "--scope all" not in ln]  # round r > 0 warm-starts with --init too
    r18 = [ln for ln in finetunes if "/r18/" in ln]
    assert r18 and all('"lr": 0.0123' in ln for ln in r18)
    assert all('"lr": 0.0123' not in ln for ln in lines if ln not in r18)
    # runtime knobs reach every training command as flags (exported by the shell prefix), never
    # inside the hashed JSON
    assert all("$DEEPNOISE_TRAIN_RUNTIME" in ln and '"num_workers"' not in ln for ln in lines)


# ------------------------------------------------------------------------------------------------
# The validation split: unit tests, then refused at parse time in both real-data layouts


def _screen(spec: dict[str, tuple[int, int]]) -> list[Experiment]:
    out = []
    for ct, (n_train, n_test) in spec.items():
        out += [
            Experiment(f"{ct}-{i + 1:02d}", ct, "train" if i < n_train else "test")
            for i in range(n_train + n_test)
        ]
    return out


def test_validation_hold_out_and_its_problems():
    screen = _screen({"HUVEC": (3, 1), "U2OS": (1, 1)})
    assert split.validation_experiments(screen, [], 1) == ["HUVEC-03", "U2OS-01"]
    assert split.validation_experiments(screen, [], 0) == []
    assert split.validation_experiments(screen, ["HUVEC-01"], 1) == ["HUVEC-01"]
    with pytest.raises(InputError, match="'U2OS-02' is not a labelled experiment"):
        split.validation_experiments(screen, ["U2OS-02"], 1)
    # one labelled U2OS experiment held out: U2OS cannot be fine-tuned
    (problem,) = split.split_problems(screen, ["HUVEC-03", "U2OS-01"], ["HUVEC", "U2OS"], explicit=False)
    assert problem.startswith("config split.validation_per_cell_type: cell type U2OS has 1 labelled")
    assert "leave U2OS out of cell_types" in problem
    # ... but it can when it is not fine-tuned (the shared model trains on the other cell types)
    assert split.split_problems(screen, ["HUVEC-03", "U2OS-01"], ["HUVEC"], explicit=False) == []
    # an explicit list that leaves a fine-tuned cell type without validation: never scored
    (problem,) = split.split_problems(screen, ["HUVEC-03"], ["HUVEC", "U2OS"], explicit=True)
    assert "fine-tuned cell type U2OS has no validation experiment" in problem
    assert split.split_problems(screen, [], ["HUVEC", "U2OS"], explicit=False) == []  # no validation at all
    (problem,) = split.split_problems(
        screen, ["HUVEC-01", "HUVEC-02", "HUVEC-03", "U2OS-01"], ["HUVEC"], True
    )
    assert "every labelled experiment is held out" in problem


def _one_labelled_u2os(root: Path, layout_name: str) -> Path:
    """An RxRx1-shaped screen (metadata only) whose U2OS has one labelled experiment."""
    df = rxrx1_metadata(8)
    df = df[df["experiment"] != "U2OS-02"]
    assert sorted(df[df["cell_type"] == "U2OS"]["experiment"].unique()) == ["U2OS-01"]
    root.mkdir()
    if layout_name == "rxrx1":
        df.to_csv(root / "metadata.csv", index=False)
        return root
    # the Kaggle layout needs test wells (a header-only test.csv is refused as an empty input): a copy
    # of HUVEC-01 as the unlabelled HUVEC-03
    wells = df.drop_duplicates("well_id").rename(columns={"well_id": "id_code", "sirna_id": "sirna"})
    test = wells[wells["experiment"] == "HUVEC-01"].assign(experiment="HUVEC-03", dataset="test")
    test["id_code"] = test["id_code"].str.replace("HUVEC-01", "HUVEC-03")
    wells = pd.concat([wells, test], ignore_index=True)
    treat = wells["well_type"] == "treatment"
    cols = ["id_code", "experiment", "plate", "well"]
    wells[treat & (wells["dataset"] == "train")][[*cols, "sirna"]].to_csv(root / "train.csv", index=False)
    wells[treat & (wells["dataset"] == "test")][cols].to_csv(root / "test.csv", index=False)
    for dataset in ("train", "test"):
        controls = wells[~treat & (wells["dataset"] == dataset)][[*cols, "sirna", "well_type"]]
        controls.to_csv(root / f"{dataset}_controls.csv", index=False)
    return root


@pytest.mark.parametrize("layout_name", ["rxrx1", "kaggle"])
def test_one_labelled_experiment_held_out_is_refused_at_parse_time(layout_name, tmp_path):
    root = _one_labelled_u2os(tmp_path / "data", layout_name)
    cfg = load_tiny(**{"data.source": layout_name, "data.root": str(root)})
    configfile = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(configfile), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    message = (
        "config split.validation_per_cell_type: cell type U2OS has 1 labelled experiment(s) (U2OS-01) "
        "and all are held out for validation"
    )
    assert text.count(message) == 1, text[-3000:]
    assert "1 configuration problem(s)" in text
    # the fixes it names plan
    for fix in ({"split.validation_per_cell_type": 0}, {"cell_types": ["HUVEC", "RPE", "HEPG2"]}):
        ok = write_config(tmp_path, load_tiny(**{"data.source": layout_name, "data.root": str(root), **fix}))
        snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(ok), "--quiet", "rules")
