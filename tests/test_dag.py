"""The full-RxRx1 config plans its whole DAG from the metadata alone (no images on disk)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import yaml
from workflow_utils import REPO, plan

sys.path.insert(0, str(REPO / "benchmarks"))
from rxrx1_metadata import metadata  # noqa: E402


def test_full_rxrx1_dry_run_from_metadata_alone(tmp_path: Path):
    data = tmp_path / "rxrx1"
    data.mkdir()
    metadata(51).to_csv(data / "metadata.csv", index=False)
    cfg = yaml.safe_load((REPO / "config/rxrx1.yaml").read_text())
    cfg["data"]["root"] = str(data)
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))

    jobs = Counter(j.rule for j in plan(tmp_path, configfile))

    plates, experiments, cell_types, models, rounds = 51 * 4, 51, 4, 2, 3
    assert not (data / "images").exists()
    assert jobs["synthesize"] == 0
    assert jobs["sites"] == 1
    assert jobs["stack"] == jobs["plate_stats"] == plates
    assert jobs["experiment_stats"] == experiments
    assert jobs["cell_type_stats"] == cell_types
    assert jobs["train"] == models * rounds
    assert jobs["finetune"] == jobs["predict"] == models * cell_types * rounds
    assert jobs["ensemble"] == jobs["balance"] == cell_types * rounds
    assert jobs["metrics"] == rounds
    # every round but the last feeds pseudo labels to the next one
    assert jobs["pseudo_labels"] == rounds - 1
    assert jobs["submission"] == jobs["summary"] == 1
