"""benchmarks/learning_curve.py: the sizing pilot's schedule, its reading of a training log, and its
refusal of a replicate of the design."""

import pandas as pd
import pytest
import yaml

from benchmarks import ablation, learning_curve
from tests.fixtures.workflow import REPO


def test_paper_milestones_keep_the_papers_proportions():
    assert learning_curve.paper_milestones(160) == [100, 140]
    assert learning_curve.paper_milestones(40) == [25, 35]
    assert learning_curve.paper_milestones(4) == [2, 3]
    assert learning_curve.paper_milestones(2) == [1]  # a drop at the last epoch is none
    assert learning_curve.paper_milestones(1) == []


def test_set_label_keeps_the_keys_last_part_and_the_whole_value():
    assert learning_curve.set_label("synthetic.image_size=64") == "image_size=64"
    assert learning_curve.set_label("synthetic.nuisance_scale=0.125") == "nuisance_scale=0.125"


def test_epochs_to_reach_reads_the_first_epoch_at_each_level(tmp_path):
    log = tmp_path / "log.csv"
    # 0-based epochs as train.py writes them; 10 of 120 = 0.08333333 with the log's 8 decimals
    pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "lr": [1e-3] * 4,
            "loss": [4.0, 3.0, 2.0, 1.0],
            "val_acc_student": [0.01, 0.05, 0.08333333, 0.02],
            "seconds": [2.0, 2.5, 3.0, 2.0],
        }
    ).to_csv(log, index=False)
    curve = learning_curve.read_curve(log)
    assert curve["epoch"].tolist() == [1, 2, 3, 4]
    assert curve["val_acc"].tolist() == pytest.approx([1.0, 5.0, 8.333333, 2.0])
    reach = learning_curve.epochs_to_reach(curve, chance=100 / 120)
    assert reach == {"2x_chance": 2, "5x_chance": 2, "10x_chance": 3, "20x_chance": None}


def test_pilot_config_is_the_arm_on_another_screen_with_the_pilots_epochs():
    study = ablation.load_study(REPO / "config" / "ablation.yaml")
    base = yaml.safe_load((REPO / study["base"]).read_text())
    arm = ablation.run_config(base, study, "softmax_plate", 99)
    cfg = learning_curve.pilot_config(base, study, "softmax_plate", 99, 40, [25, 35])
    assert cfg["synthetic"]["seed"] == base["synthetic"]["seed"] + 99
    assert cfg["train"]["epochs"] == 40 and cfg["train"]["lr_milestones"] == [25, 35] and cfg["rounds"] == 1
    for key in ("epochs", "lr_milestones"):
        arm["train"].pop(key), cfg["train"].pop(key)
    arm.pop("rounds"), cfg.pop("rounds")
    assert cfg == arm  # nothing else differs from the design's arm


def test_pilot_refuses_a_replicate_and_a_two_model_arm(capsys):
    with pytest.raises(SystemExit):
        learning_curve.main(["--seed", "0"])
    assert "is a replicate of the design" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        learning_curve.main(["--run", "ensemble"])
    assert "has 2 models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        learning_curve.main(["--set", "synthetic.seed"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
