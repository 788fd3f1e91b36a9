"""`deepnoise install-profile`: the literal `snakemake --profile slurm` finds the shipped profile with
the site's partition, account and GPU type filled in (a real snakemake dry run, no Slurm needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from deepnoise import cli, profile
from deepnoise.errors import InputError
from tests.fixtures.workflow import REPO, load_tiny, write_config

SNAKEFILE = REPO / "workflow" / "Snakefile"


def test_profile_text_fills_the_commented_examples_and_keeps_the_comments():
    source = profile.SOURCE.read_text()
    text = profile.profile_text(source, "cpu", "lab1", "gpu", "a100")
    cfg = yaml.safe_load(text)
    assert cfg["default-resources"]["slurm_partition"] == "cpu"
    assert cfg["default-resources"]["slurm_account"] == "lab1"
    for rule in profile.GPU_RULES:
        assert cfg["set-resources"][rule]["slurm_partition"] == "gpu", rule
        assert cfg["set-resources"][rule]["gpu_model"] == "a100", rule
    assert "slurm_extra" not in text.replace("Never put these into slurm_extra", "")
    # everything else as shipped: the same keys and values, every comment line kept
    shipped = yaml.safe_load(source)
    assert {k: v for k, v in cfg.items() if "resources" not in k} == {
        k: v for k, v in shipped.items() if "resources" not in k
    }
    comments = [ln for ln in source.splitlines() if ln.lstrip().startswith("#") and ": " not in ln]
    assert all(c in text for c in comments)
    # nothing given: the shipped profile
    assert profile.profile_text(source) == source
    with pytest.raises(InputError, match="--account 'a b'"):
        profile.profile_text(source, account="a b")


def test_an_installed_different_profile_is_kept_unless_forced(tmp_path, capsys):
    dest = tmp_path / "slurm"
    assert cli.main(["install-profile", "--dest", str(dest), "--partition", "cpu"]) == 0
    assert cli.main(["install-profile", "--dest", str(dest), "--partition", "cpu"]) == 0  # same text
    assert cli.main(["install-profile", "--dest", str(dest), "--partition", "short"]) == 2
    assert "a different profile is installed there" in capsys.readouterr().err
    assert yaml.safe_load((dest / "config.yaml").read_text())["default-resources"]["slurm_partition"] == "cpu"
    assert cli.main(["install-profile", "--dest", str(dest), "--partition", "short", "--force"]) == 0
    assert (
        yaml.safe_load((dest / "config.yaml").read_text())["default-resources"]["slurm_partition"] == "short"
    )


def _dry_run(workdir, env):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--profile", "slurm",
           "--configfile", "my.yaml", "-n"]  # fmt: skip
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def test_the_literal_profile_slurm_works_after_install(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, load_tiny()).rename(workdir / "my.yaml")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    before = _dry_run(workdir, env)
    assert before.returncode != 0 and "no profile.yaml (or config.yaml) found" in before.stderr
    install = subprocess.run(
        [sys.executable, "-m", "deepnoise", "install-profile", "--partition", "cpu", "--gpu-partition",
         "gpu", "--gpu-model", "a100"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert str(tmp_path / "xdg" / "snakemake" / "slurm" / "config.yaml") in install.stdout
    after = _dry_run(workdir, env)
    text = after.stdout + after.stderr
    assert after.returncode == 0, text[-3000:]
    assert "Using profile slurm" in text
    jobs = text.split("\nrule ")
    train = next(j for j in jobs if j.startswith("train:"))
    sites = next(j for j in jobs if j.startswith("sites:") or j.startswith("synthesize:"))
    assert "slurm_partition=gpu" in train and "gpu_model=a100" in train
    assert "slurm_partition=cpu" in sites
