"""DAG pictures (deepnoise.dag): the rule graph with job counts, a slice whose every job names its
wildcards, and the whole RxRx1 plan as one HTML page checked in a real headless Chromium.

The browser test needs Debian's chromium and chromium-driver and selenium (the `dev` extras); it is
skipped with the reason when chromium is absent, except in CI (env CI set), where it fails."""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from deepnoise import cli, dag
from deepnoise.errors import InputError
from tests.fixtures.browser import chrome
from tests.fixtures.rxrx1 import metadata
from tests.fixtures.workflow import REPO, TINY, snakemake


def _outputs(workdir: Path, configfile: Path) -> tuple[Path, Path, Path]:
    """``--dag``, ``-n`` and ``--rulegraph`` of the same plan, as files."""
    paths = []
    for name, args in (("jobs.dot", ["--dag"]), ("dryrun.txt", ["-n"]), ("rulegraph.dot", ["--rulegraph"])):
        proc = snakemake(workdir, "--cores", "1", "--configfile", str(configfile), *args)
        path = workdir / name
        path.write_text(proc.stdout if name.endswith(".dot") else proc.stdout + proc.stderr)
        paths.append(path)
    return tuple(paths)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("tinydag")
    configfile = work / "config.yaml"
    shutil.copy(TINY, configfile)
    return _outputs(work, configfile)


@pytest.fixture(scope="module")
def rxrx1(tmp_path_factory):
    work = tmp_path_factory.mktemp("rxrx1dag")
    data = work / "rxrx1"
    data.mkdir()
    metadata(51).to_csv(data / "metadata.csv", index=False)
    cfg = yaml.safe_load((REPO / "config/rxrx1.yaml").read_text())
    cfg["data"]["root"] = str(data)
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    return _outputs(work, configfile)


def _total(dry_run: Path) -> int:
    return int(re.search(r"^total\s+(\d+)", dry_run.read_text(), re.M).group(1))


def test_join_names_every_wildcard(tiny):
    jobs_dot, dry_run, _ = tiny
    plan = dag.load_plan(jobs_dot, dry_run)
    assert len(plan.jobs) == _total(dry_run) and plan.edges
    # snakemake's own labels drop the wildcards a job shares with its dependencies
    snakemake_labels = dict((int(i), lab) for i, lab, _ in dag._NODE.findall(jobs_dot.read_text()))
    finetunes = [j for j in plan.jobs.values() if j.rule == "finetune"]
    assert finetunes and all(snakemake_labels[j.jobid] == "finetune" for j in finetunes)
    assert len({j.label() for j in finetunes}) == len(finetunes)
    assert all(set(j.wildcards) == {"round", "model", "cell_type"} for j in finetunes)


def test_join_refuses_two_plans(tiny, tmp_path):
    jobs_dot, dry_run, _ = tiny
    text = dry_run.read_text()
    # the dry run of another plan: job ids point at other jobs
    swapped = re.sub(r"jobid: (\d+)", lambda m: f"jobid: {(int(m.group(1)) + 1) % _total(dry_run)}", text)
    (tmp_path / "other.txt").write_text(swapped)
    with pytest.raises(InputError, match="different plans"):
        dag.load_plan(jobs_dot, tmp_path / "other.txt")


def test_rulegraph_counts(tiny, tmp_path):
    jobs_dot, dry_run, rulegraph = tiny
    out = tmp_path / "rules.dot"
    argv = ["dag-rules", "--dot", str(jobs_dot), "--dry-run", str(dry_run), "--rulegraph", str(rulegraph)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    labels = dict(re.findall(r'label = "(\w+)\\n(\d+) jobs?"', out.read_text()))
    counts = Counter(j.rule for j in dag.load_plan(jobs_dot, dry_run).jobs.values())
    assert {r: int(n) for r, n in labels.items()} == dict(counts)
    assert labels["stack"] == "24" and labels["finetune"] == "8"


def test_slice_names_wildcards(tiny, tmp_path):
    jobs_dot, dry_run, _ = tiny
    out = tmp_path / "slice.dot"
    argv = ["dag-slice", "--dot", str(jobs_dot), "--dry-run", str(dry_run), "--out", str(out)]
    assert cli.main([*argv, "--round", "1", "--model", "r10", "--cell-type", "RPE"]) == 0
    nodes, edges = dag.parse_dot(out.read_text())
    inside = {n: (rule, wc) for n, (rule, wc, style) in nodes.items() if "dotted" not in style}
    rules = Counter(rule for rule, _ in inside.values())
    assert rules["train"] == rules["finetune"] == rules["predict"] == rules["ensemble"] == 1
    assert rules["stack"] == 0  # the stacks are outside, summarised in one box
    for _rule, wc in inside.values():
        assert wc.get("round", "1") == "1" and wc.get("model", "r10") == "r10"
        assert wc.get("cell_type", "RPE") == "RPE"
    (finetune,) = [wc for rule, wc in inside.values() if rule == "finetune"]
    assert finetune == {"round": "1", "model": "r10", "cell_type": "RPE"}
    assert "stack ×24" in out.read_text()
    assert cli.main([*argv, "--model", "nope"]) == 2


@pytest.mark.slow
def test_rxrx1_page_in_chromium(rxrx1, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    jobs_dot, dry_run, _ = rxrx1
    page = tmp_path / "jobs.html"
    assert cli.main(["dag-html", "--dot", str(jobs_dot), "--dry-run", str(dry_run), "--out", str(page)]) == 0
    total = _total(dry_run)
    assert total > 500  # the full plan: 204 stacks and plate stats, 3 rounds
    driver = chrome()
    try:
        start = time.perf_counter()
        driver.get(page.as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.dagReady === true"))
        seconds = time.perf_counter() - start
        print(f"RxRx1 DAG page: {total} jobs, ready in {seconds:.1f} s")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        assert seconds < 30  # ~5-10 s measured on a loaded 2-core machine
        assert driver.find_element(By.ID, "njobs").text == str(total)
        assert driver.execute_script("return cy.nodes(\"[kind='job']\").length") == total
        edges = len(dag.load_plan(jobs_dot, dry_run).edges)
        assert driver.find_element(By.ID, "nedges").text == f"{edges:,}"
        drawn = int(driver.find_element(By.ID, "ndrawn").text)
        assert 0 < drawn < edges / 20  # aggregated: train alone depends on every stack and stats file
        shot = tmp_path / "dag.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000

        box = driver.find_element(By.ID, "search")
        box.send_keys("predict round=1 model=xception-wide cell_type=HEPG2" + Keys.ENTER)
        status = driver.find_element(By.ID, "status")
        WebDriverWait(driver, 10).until(lambda d: status.text)
        assert status.text == "1 job match"
        assert status.get_attribute("data-hits") == "predict round=1 model=xception-wide cell_type=HEPG2"
        # the hit's group was expanded (stacks start collapsed: a search for one expands them)
        box.clear()
        box.send_keys("stack experiment=U2OS-05 plate=4" + Keys.ENTER)
        WebDriverWait(driver, 10).until(lambda d: status.text == "1 job match")
        visible = driver.execute_script("return cy.nodes('.hit').filter(n => n.visible()).length")
        assert visible == 1
        box.clear()
        box.send_keys("predict round=9" + Keys.ENTER)
        WebDriverWait(driver, 10).until(lambda d: status.text == "0 jobs match")
    finally:
        driver.quit()
