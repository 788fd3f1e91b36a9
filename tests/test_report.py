import json
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from deepnoise import cli
from deepnoise.errors import InputError
from deepnoise.report import CHANNEL_RGB, accuracy_table, plot_training, provenance, to_rgb
from tests.fixtures.browser import chrome

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1000


def test_plot_training(tmp_path):
    for name in ("a", "b"):
        d = tmp_path / "round0" / "models" / name / "all"
        d.mkdir(parents=True)
        pd.DataFrame(
            {"epoch": [1, 2, 3], "lr": [0.1, 0.05, 0.01], "loss": [3.0, 2.0, 1.5],
             "loss_consistency": [0.3, 0.2, 0.1], "val_acc_student": [0.1, 0.3, 0.4],
             "val_acc_teacher": [0.12, 0.33, 0.45], "seconds": [10, 10, 11]}
        ).to_csv(d / "log.csv", index=False)  # fmt: skip
    (tmp_path / "empty.csv").write_text("")
    logs = [str(p) for p in sorted(tmp_path.rglob("log.csv"))] + [str(tmp_path / "empty.csv")]
    out = tmp_path / "curves.png"
    assert cli.main(["plot-training", "--logs", *logs, "--out", str(out)]) == 0
    assert _is_png(out)


def _log(path, teacher=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    nan = float("nan")
    pd.DataFrame(
        {"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "val_acc_student": [0.1, 0.3, 0.4],
         "val_acc_teacher": [0.12, 0.33, 0.45] if teacher else [nan, nan, nan]}
    ).to_csv(path, index=False)  # fmt: skip
    return str(path)


def test_training_small_multiples(tmp_path, monkeypatch):
    """One panel per model x scope (rows: models, columns: scopes); a model without mean teacher
    (teacher column all NaN) has a student curve and no teacher curve."""
    import matplotlib.figure

    logs = [
        _log(tmp_path / f"round0/models/{m}/{scope}/log.csv", teacher=m != "plain")
        for m in ("mt", "plain")
        for scope in ("all", "HUVEC", "RPE")
    ]
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    plot_training(logs, tmp_path / "t.png")
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        f"{m} / {s}" for m in ("mt", "plain") for s in ("all", "HUVEC", "RPE")
    ]
    for ax in panels:
        styles = sorted(line.get_linestyle() for line in ax.get_lines())
        assert styles == (["-", "--"] if ax.get_title().startswith("mt") else ["-"]), ax.get_title()
        notes = [t.get_text() for t in ax.texts]
        assert notes == ([] if ax.get_title().startswith("mt") else ["no teacher"])
    assert len(fig.legends) == 1  # one legend for the figure, not one over each panel


def test_accuracy_table(tmp_path):
    for r in (0, 1):
        (tmp_path / f"m{r}.json").write_text(json.dumps(_metrics(r)))
    tsv = tmp_path / "summary.tsv"
    assert cli.main(["summary", "--metrics", str(tmp_path / "m0.json"), str(tmp_path / "m1.json"),
                     "--out", str(tsv)]) == 0  # fmt: skip
    out = tmp_path / "acc.html"
    assert cli.main(["report-table", "--summary", str(tsv), "--out", str(out)]) == 0
    html = out.read_text()
    df = pd.read_csv(tsv, sep="\t")
    # a row per round x stage, a column per split x cell type, every accuracy on the page
    assert html.count("<tr><td>") == len(df.groupby(["round", "stage"]))
    for split in set(df["split"]):
        assert f">{split}</th>" in html
    for v in df["accuracy"]:
        assert f"{v:.3f}" in html
    (tmp_path / "empty.tsv").write_text("")
    accuracy_table(tmp_path / "empty.tsv", out)
    assert "no scored predictions" in out.read_text()


def test_provenance(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("a")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "prov.html"
    cfg = {"models": {"r10": {"lr": 0.001}}, "rounds": 2}
    info = provenance(json.dumps(cfg), repo, out)
    html = out.read_text()
    assert info["commit"] == head and not info["local_changes"]
    assert f">{head}</code>" in html and "r10" in html and "lr: 0.001" in html
    assert info["versions"]["numpy"] == np.__version__ and f"<td>{np.__version__}</td>" in html
    (repo / "f").write_text("b")
    assert provenance(json.dumps(cfg), repo, out)["local_changes"]
    assert f"{head} + local changes" in out.read_text()
    assert "unknown" in provenance("{}", tmp_path, out)["commit"]
    assert (
        cli.main(["report-provenance", "--config-json", "{nope", "--repo", str(repo), "--out", str(out)]) == 2
    )


def _metrics(round_):
    plates = [
        {"experiment": e, "plate": p, "cell_type": e[:1], "n": 10, "correct": c, "accuracy": c / 10}
        for e in ("A-01", "B-01") for p, c in zip((1, 2, 3, 4), (5, 6, 7, 8), strict=True)
    ]  # fmt: skip
    split = {"overall": {"n": 80, "correct": 52, "accuracy": 0.65},
             "cell_types": {"A": {"n": 40, "correct": 26, "accuracy": 0.65},
                            "B": {"n": 40, "correct": 26, "accuracy": 0.65}}, "plates": plates}  # fmt: skip
    stages = [
        {"stage": s, "kind": k, "files": [], "n_wells": 80, "splits": {"validation": split, "test": split}}
        for s, k in (("resnet", "model"), ("ensemble", "ensemble"), ("balanced", "balanced"))
    ]
    return {"round": round_, "test_scored": True, "stages": stages}


def test_plot_summary_kinds(tmp_path):
    for r in (0, 1):
        (tmp_path / f"m{r}.json").write_text(json.dumps(_metrics(r)))
    tsv = tmp_path / "summary.tsv"
    assert cli.main(["summary", "--metrics", str(tmp_path / "m0.json"), str(tmp_path / "m1.json"),
                     "--out", str(tsv)]) == 0  # fmt: skip
    for kind in ("accuracy", "balancing"):
        out = tmp_path / f"{kind}.png"
        assert cli.main(["plot-summary", "--kind", kind, "--summary", str(tsv), "--out", str(out)]) == 0
        assert _is_png(out)
    out = tmp_path / "plates.png"
    assert cli.main(["plot-summary", "--kind", "plates", "--metrics", str(tmp_path / "m1.json"),
                     "--out", str(out)]) == 0  # fmt: skip
    assert _is_png(out)
    # every round: one row of heat maps each
    assert cli.main(["plot-summary", "--kind", "plates", "--metrics", str(tmp_path / "m0.json"),
                     str(tmp_path / "m1.json"), "--out", str(out)]) == 0  # fmt: skip
    assert _is_png(out)
    assert cli.main(["plot-summary", "--kind", "plates", "--out", str(out)]) == 2
    # an empty summary still yields a figure
    (tmp_path / "empty.tsv").write_text("round\tstage\tkind\tsplit\tcell_type\tn\tcorrect\taccuracy\n")
    out = tmp_path / "empty.png"
    assert cli.main(["plot-summary", "--summary", str(tmp_path / "empty.tsv"), "--out", str(out)]) == 0
    assert _is_png(out)


def test_to_rgb():
    img = np.zeros((6, 4, 4), np.uint8)
    img[0] = 51  # channel 1 at the top of its rxrx1 range -> its full colour
    rgb = to_rgb(img)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == CHANNEL_RGB[0]).all()
    assert (to_rgb(np.full((6, 2, 2), 255, np.uint8)) == 255).all()
    assert to_rgb(img, "percentile").shape == (4, 4, 3)
    with pytest.raises(InputError):
        to_rgb(np.zeros((3, 2, 2), np.uint8))


def _stack(stack, n=6, experiment="E-01"):
    rng = np.random.default_rng(0)
    with h5py.File(stack, "w") as h5:
        h5.create_dataset(
            "images", data=rng.integers(0, 120, (n, 6, 32, 32), dtype=np.uint8), chunks=(1, 6, 32, 32)
        )
        h5.create_dataset(
            "well_id", data=np.array([f"E-01_1_B0{i + 2}" for i in range(n)], dtype=h5py.string_dtype())
        )
        h5.create_dataset("site", data=np.ones(n, np.int8))
        h5.create_dataset("sirna_id", data=np.arange(n, dtype=np.int32))
        h5.attrs["experiment"] = experiment
        h5.attrs["plate"] = 1
    return stack


def test_plot_composites(tmp_path):
    stack = _stack(tmp_path / "Plate1.h5")
    out = tmp_path / "comp.png"
    assert cli.main(["plot-composites", "--stack", str(stack), "--n", "4", "--out", str(out)]) == 0
    assert _is_png(out)
    assert cli.main(["plot-composites", "--stack", str(tmp_path / "nope.h5"), "--out", str(out)]) == 2


def test_composites_one_row_per_cell_type(tmp_path, monkeypatch):
    import matplotlib.figure

    from deepnoise.report import plot_composites

    stacks = [_stack(tmp_path / f"{ct}.h5", experiment=f"{ct}-01") for ct in ("HUVEC", "RPE", "U2OS")]
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    plot_composites(stacks, tmp_path / "c.png", n=3)
    (fig,) = figs
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 9
    firsts = [ax.get_title().split("\n")[0] for ax in shown[::3]]
    assert firsts == ["HUVEC-01 plate 1", "RPE-01 plate 1", "U2OS-01 plate 1"]


def test_percentile_stretch_fills_the_range():
    """A dim channel (values 0..20 of 255) reaches its full colour with the percentile stretch."""
    rng = np.random.default_rng(1)
    img = np.zeros((6, 64, 64), np.uint8)
    img[0] = rng.integers(0, 21, (64, 64))
    assert to_rgb(img, "percentile").max() == CHANNEL_RGB[0].max()
    assert to_rgb(img, "rxrx1").max() < CHANNEL_RGB[0].max() / 2


# ---------------------------------------------------------------- the real report of a tiny run


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    """A real tiny run (one cell type, one round; r18 without mean teacher) and its report."""
    from tests.fixtures.workflow import load_tiny, snakemake, write_config

    workdir = tmp_path_factory.mktemp("reportrun")
    cfg = load_tiny(cell_types=["HUVEC"], rounds=1, **{"models.r18.mean_teacher": False})
    configfile = write_config(workdir, cfg)
    snakemake(workdir, "--cores", "2", "--configfile", str(configfile))
    snakemake(workdir, "--cores", "1", "--configfile", str(configfile), "--report", "report.html")
    return workdir, cfg


@pytest.mark.slow
def test_report_html_carries_table_and_provenance(report_html):
    workdir, cfg = report_html
    page = (workdir / "report.html").read_text(errors="replace")
    for name in ("training_round0.png", "accuracy.png", "plates.png", "composites.png", "accuracy.html",
                 "provenance.html", "summary.tsv"):  # fmt: skip
        assert name in page, name
    # the accuracy table is in the page (a caption), with every accuracy of the summary
    assert "deepnoise-accuracy" in page
    summary = pd.read_csv(workdir / "results/summary.tsv", sep="\t")
    for v in summary["accuracy"]:
        assert f"{v:.3f}" in page
    # provenance: commit of this checkout, versions, the config as given
    assert "deepnoise-commit" in page and "deepnoise-versions" in page
    import subprocess

    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert head and head in page
    prov = (workdir / "results/report/provenance.html").read_text()
    assert "mean_teacher: false" in prov and "HUVEC" in prov
    # r18 runs without mean teacher: the curves of both models drew (NaN teacher columns: unit test)
    assert (workdir / "results/plots/training_round0.png").stat().st_size > 10_000


def report_screenshots(report: Path, outdir: Path) -> dict[str, Path]:
    """Open a Snakemake report in headless Chromium; for every category under Results, every item:
    its view and its caption, one screenshot each (``{category}-{file}-view|caption.png``). Returns
    the screenshots and fails when the accuracy table or the provenance is not visible in a caption."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    shots = {}
    seen_captions = set()

    def click(by, value):
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(by, value))[0].click()
        time.sleep(0.5)

    try:
        driver.get(report.as_uri())

        def open_results():  # the start page lists the categories (with one only, under "Results")
            driver.get(report.as_uri())
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.LINK_TEXT, "About"))
            if driver.find_elements(By.LINK_TEXT, "Results"):
                click(By.LINK_TEXT, "Results")

        open_results()
        categories = [
            a.text.strip() for a in driver.find_elements(By.CSS_SELECTOR, "nav a") if a.text.strip()
        ]
        categories = [c for c in categories if c not in ("Results", "Workflow", "Statistics", "About")]
        assert {"Training", "Accuracy", "Images", "Provenance"} <= set(categories), categories
        for category in categories:
            open_results()
            click(By.LINK_TEXT, category)
            files = [
                td.text.strip() for td in driver.find_elements(By.CSS_SELECTOR, "nav td") if "/" in td.text
            ]
            for name in files:
                for kind, index in (("view", 0), ("caption", 1)):
                    open_results()
                    click(By.LINK_TEXT, category)
                    cell = driver.find_element(By.XPATH, f"//nav//td[normalize-space(text())='{name}']")
                    icons = cell.find_element(By.XPATH, "./ancestor::tr").find_elements(By.CSS_SELECTOR, "a")
                    icons[index].click()
                    time.sleep(1)
                    shot = outdir / f"{category}-{Path(name).name}-{kind}.png".replace(" ", "_")
                    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
                    shots[shot.name] = shot
                    if kind == "caption":
                        for css in (
                            "table.deepnoise-accuracy",
                            "code.deepnoise-commit",
                            "pre.deepnoise-config",
                        ):
                            if any(e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, css)):
                                seen_captions.add(css)
        assert seen_captions == {"table.deepnoise-accuracy", "code.deepnoise-commit", "pre.deepnoise-config"}
    finally:
        driver.quit()
    return shots


@pytest.mark.slow
def test_report_in_chromium(report_html, tmp_path):
    workdir, _ = report_html
    shots = report_screenshots(workdir / "report.html", tmp_path)
    assert any(name.startswith("Training-training_round0.png") for name in shots)
    assert any(name.startswith("Accuracy-accuracy.html-caption") for name in shots)
