"""Scoring of predictions: metrics per round, the Kaggle submission and the summary over rounds.

Truth: validation wells (``dataset == train`` in a predictions file) are scored against the labels
of the site table; test wells against ``test_truth.csv`` when that file has rows (otherwise the
test split is not scored). Accuracy is the fraction of wells whose argmax class is the true
``sirna_id``. No torch here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from deepnoise.atomic import atomic_path, write_text
from deepnoise.ensemble import Predictions, concat_predictions, load_predictions
from deepnoise.errors import InputError
from deepnoise.metadata import read_sites

log = logging.getLogger(__name__)

SPLITS = {"validation": "train", "test": "test"}
SUMMARY_COLUMNS = ("round", "stage", "kind", "split", "cell_type", "n", "correct", "accuracy")


def _well_labels(df: pd.DataFrame, source: str) -> pd.Series:
    """``well_id -> sirna_id`` from rows (one or more per well); conflicting labels are an error."""
    pairs = df[["well_id", "sirna_id"]].drop_duplicates()
    dup = pairs["well_id"].duplicated(keep=False)
    if dup.any():
        raise InputError(f"{source}: well {pairs.loc[dup, 'well_id'].iloc[0]} has conflicting sirna_id")
    return pd.Series(pairs["sirna_id"].to_numpy(np.int64), index=pairs["well_id"].to_numpy(str))


def truth_from_sites(sites: pd.DataFrame, source: str = "site table") -> pd.Series:
    """Labels of the labelled treatment wells of a site table (train experiments)."""
    t = sites[(sites["well_type"] == "treatment") & (sites["sirna_id"] >= 0)]
    return _well_labels(t, source)


def read_truth(path: str | os.PathLike | None) -> pd.Series:
    """``well_id -> sirna_id`` of ``test_truth.csv``; empty when the file is absent, empty or header-only."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return pd.Series(dtype=np.int64)
    try:
        df = pd.read_csv(path, dtype={"well_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: cannot read truth file ({exc})") from exc
    if df.empty:
        return pd.Series(dtype=np.int64)
    missing = [c for c in ("well_id", "sirna_id") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: truth file lacks columns {missing}")
    return _well_labels(df, str(path))


def _counts(correct: np.ndarray) -> dict:
    n = int(len(correct))
    c = int(np.sum(correct))
    return {"n": n, "correct": c, "accuracy": (c / n) if n else None}


def accuracy_table(pred: Predictions, truth: pd.Series, missing: str = "error") -> dict:
    """Accuracy of ``pred``'s argmax against ``truth`` (``well_id -> sirna_id``).

    ``missing='error'`` raises naming the first well without truth; ``'skip'`` scores only the wells
    that have truth. Returns ``{"n", "correct", "accuracy"}`` (accuracy ``None`` when n is 0).
    """
    y, has = _lookup(pred.well_id, truth)
    if missing == "error" and not has.all():
        raise InputError(f"no truth for well {pred.well_id[~has][0]}")
    return _counts(pred.labels()[has] == y[has])


def compare_accuracy(before: Predictions, after: Predictions, truth: pd.Series) -> dict:
    """Accuracy before and after balancing (on the wells that have truth)."""
    return {
        "before": accuracy_table(before, truth, missing="skip"),
        "after": accuracy_table(after, truth, missing="skip"),
    }


def _lookup(well_ids: np.ndarray, truth: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    y = truth.reindex(well_ids)
    has = y.notna().to_numpy()
    return y.fillna(-1).to_numpy(np.int64), has


def score_predictions(
    pred: Predictions, sites_truth: pd.Series, test_truth: pd.Series, cell_type_of: dict[str, str]
) -> dict:
    """Per split (``validation``, ``test`` when it has truth): overall, per cell type and per plate."""
    out: dict = {}
    labels = pred.labels()
    for split, dataset in SPLITS.items():
        truth = sites_truth if split == "validation" else test_truth
        rows = np.flatnonzero(pred.dataset == dataset)
        if not len(rows) or truth.empty:
            continue
        y, has = _lookup(pred.well_id[rows], truth)
        if not has.all():
            where = "the site table" if split == "validation" else "the test truth"
            raise InputError(f"{split} well {pred.well_id[rows][~has][0]} has no label in {where}")
        ok = labels[rows] == y
        exps = pred.experiment[rows]
        cts = np.array([cell_type_of.get(e, e.split("-")[0]) for e in exps])
        plates = pred.plate[rows]
        table = pd.DataFrame({"cell_type": cts, "experiment": exps, "plate": plates, "ok": ok})
        out[split] = {
            "overall": _counts(ok),
            "cell_types": {ct: _counts(g["ok"].to_numpy()) for ct, g in table.groupby("cell_type")},
            "plates": [
                {"experiment": e, "plate": int(p), "cell_type": g["cell_type"].iloc[0]}
                | _counts(g["ok"].to_numpy())
                for (e, p), g in table.groupby(["experiment", "plate"])
            ],
        }
    return out


def parse_named(items: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=PATH`` items -> ``{name: [paths]}`` in order of first appearance."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--models item {item!r} is not NAME=PATH")
        out.setdefault(name, []).append(path)
    return out


def compute_metrics(
    round_: int,
    stages: Sequence[tuple[str, str, Sequence[str]]],
    sites: pd.DataFrame,
    test_truth: pd.Series,
) -> dict:
    """Metrics of each ``(stage, kind, files)``; the files of a stage are concatenated."""
    sites_truth = truth_from_sites(sites)
    cell_type_of = dict(zip(sites["experiment"], sites["cell_type"], strict=False))
    result = {"round": int(round_), "test_scored": not test_truth.empty, "stages": []}
    for stage, kind, files in stages:
        pred = concat_predictions([load_predictions(f) for f in files])
        dup = pd.Index(pred.well_id).duplicated()
        if dup.any():
            raise InputError(f"stage {stage}: well {pred.well_id[dup][0]} occurs in several files")
        try:
            splits = score_predictions(pred, sites_truth, test_truth, cell_type_of)
        except InputError as exc:
            raise InputError(f"stage {stage} ({', '.join(map(str, files))}): {exc}") from exc
        result["stages"].append(
            {"stage": stage, "kind": kind, "files": [str(f) for f in files], "n_wells": len(pred)}
            | {"splits": splits}
        )
    return result


def pseudo_label_metrics(
    table: pd.DataFrame, sites: pd.DataFrame, test_truth: pd.Series, previous: pd.DataFrame | None
) -> dict:
    """Accuracy of a round's pseudo labels against the held-out truth (validation wells: the site
    table; test wells: the test truth), all rows and the selected ones, and how many labels changed
    since the previous round. Scoring only: training never sees this."""
    out: dict = {}
    for split, dataset in SPLITS.items():
        truth = truth_from_sites(sites) if split == "validation" else test_truth
        rows = table[table["dataset"] == dataset]
        if rows.empty or truth.empty:
            continue
        y, has = _lookup(rows["well_id"].to_numpy(str), truth)
        ok = rows["sirna_id"].to_numpy(np.int64)[has] == y[has]
        sel = rows["selected"].to_numpy(np.int64)[has] == 1
        out[split] = {"all": _counts(ok), "selected": _counts(ok[sel])}
    if previous is not None:
        from deepnoise.pseudo import changed_labels

        out |= changed_labels(table, previous)
    return out


def summary_rows(metrics: dict) -> list[dict]:
    rows = []
    for st in metrics["stages"]:
        for split, s in st["splits"].items():
            base = {"round": metrics["round"], "stage": st["stage"], "kind": st["kind"], "split": split}
            rows.append(base | {"cell_type": "all"} | s["overall"])
            for ct, c in s["cell_types"].items():
                rows.append(base | {"cell_type": ct} | c)
    return rows


def summary_table(metrics_list: Sequence[dict]) -> pd.DataFrame:
    rows = [r for m in metrics_list for r in summary_rows(m)]
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def format_summary(df: pd.DataFrame, balance_method: str | None = None) -> str:
    """Readable pivot: one row per (round, stage), one column per split / cell type; then what each
    stage adds (``stage_gains``). ``balance_method`` names the balanced stage."""
    if df.empty:
        return "(no scored predictions)"
    wide = df.assign(col=df["split"] + "/" + df["cell_type"]).pivot_table(
        index=["round", "stage"], columns="col", values="accuracy", sort=False
    )
    order = df.drop_duplicates(["round", "stage"])[["round", "stage"]]
    wide = wide.reindex(pd.MultiIndex.from_frame(order))
    if balance_method:
        wide.index = wide.index.set_levels(
            [f"balanced ({balance_method})" if s == "balanced" else s for s in wide.index.levels[1]], level=1
        )
    text = wide.to_string(float_format=lambda x: f"{x:.4f}", na_rep="-")
    gains = stage_gains(df, balance_method)
    return text + ("\n\n" + "\n".join(gains) if gains else "")


def stage_gains(df: pd.DataFrame, balance_method: str | None = None) -> list[str]:
    """What each stage adds, in accuracy points of the test split (validation when there is no
    test) over all cell types: per round the best single model, the ensemble against it, the
    balanced ensemble against the ensemble, and each pseudo-label round's ensemble against the
    previous round's."""
    overall = df[df["cell_type"] == "all"]
    split = "test" if (overall["split"] == "test").any() else "validation"
    acc = overall[overall["split"] == split].set_index(["round", "stage"])["accuracy"]
    kinds = overall.drop_duplicates(["round", "stage"]).set_index(["round", "stage"])["kind"]
    balanced = f"balanced ({balance_method})" if balance_method else "balanced"
    lines = [f"What each stage adds ({split} accuracy, all cell types, points):"]
    for r in sorted({k[0] for k in acc.index}):
        models = [s for (rr, s), k in kinds.items() if rr == r and k == "model" and (r, s) in acc]
        parts = []
        if models:
            best = max(models, key=lambda s: acc[(r, s)])
            parts.append(f"best single model {best} {100 * acc[(r, best)]:.1f}")
            if (r, "ensemble") in acc:
                parts.append(f"ensemble {100 * (acc[(r, 'ensemble')] - acc[(r, best)]):+.1f}")
        if (r, "ensemble") in acc and (r, "balanced") in acc:
            parts.append(f"{balanced} {100 * (acc[(r, 'balanced')] - acc[(r, 'ensemble')]):+.1f}")
        if r > 0 and (r, "ensemble") in acc and (r - 1, "ensemble") in acc:
            gain = 100 * (acc[(r, "ensemble")] - acc[(r - 1, "ensemble")])
            parts.append(f"pseudo-label round (ensemble vs round {r - 1}) {gain:+.1f}")
        if parts:
            lines.append(f"  round {r}: " + "; ".join(parts))
    return lines if len(lines) > 1 else []


def submission_table(
    pred: Predictions, sites: pd.DataFrame | None = None, cell_types: list[str] | None = None
) -> pd.DataFrame:
    """Kaggle ``id_code,sirna`` for the test wells of ``pred`` (treatment wells), sorted by id_code.

    With ``sites``, every test treatment well (of ``cell_types``, when given) must have a prediction.
    """
    dup = pd.Index(pred.well_id).duplicated()
    if dup.any():
        raise InputError(f"well {pred.well_id[dup][0]} occurs in several prediction files")
    test = pred.dataset == "test"
    sub = pd.DataFrame({"id_code": pred.well_id[test], "sirna": pred.labels()[test].astype(np.int64)})
    if sites is not None:
        rows = (sites["dataset"] == "test") & (sites["well_type"] == "treatment")
        if cell_types:
            unknown = sorted(set(cell_types) - set(sites["cell_type"]))
            if unknown:
                raise InputError(f"--cell-types: {unknown[0]!r} is not a cell type of the site table")
            rows &= sites["cell_type"].isin(cell_types)
        want = sites.loc[rows, "well_id"]
        lacking = np.setdiff1d(want.unique().astype(str), sub["id_code"].to_numpy(str))
        if len(lacking):
            raise InputError(f"test treatment well {lacking[0]} has no prediction ({len(lacking)} missing)")
    return sub.sort_values("id_code").reset_index(drop=True)


def _write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def _run_metrics(args: argparse.Namespace) -> int:
    stages: list[tuple[str, str, list[str]]] = [
        (name, "model", files) for name, files in parse_named(args.models or []).items()
    ]
    if args.ensemble:
        stages.append(("ensemble", "ensemble", args.ensemble))
    if args.balanced:
        stages.append(("balanced", "balanced", args.balanced))
    if not stages:
        raise InputError("metrics: give --models, --ensemble and/or --balanced")
    sites = read_sites(args.sites)
    truth = read_truth(args.truth)
    metrics = compute_metrics(args.round, stages, sites, truth)
    if args.pseudo_labels:
        from deepnoise.pseudo import read_pseudo_table

        previous = read_pseudo_table(args.previous_pseudo_labels) if args.previous_pseudo_labels else None
        metrics["pseudo_labels"] = pseudo_label_metrics(
            read_pseudo_table(args.pseudo_labels), sites, truth, previous
        )
        log.info("pseudo labels of round %d: %s", args.round, metrics["pseudo_labels"])
    write_text(args.out, json.dumps(metrics, indent=1) + "\n")
    print(format_summary(summary_table([metrics])))
    return 0


def _run_submission(args: argparse.Namespace) -> int:
    pred = concat_predictions([load_predictions(f) for f in args.balanced])
    sites = read_sites(args.sites) if args.sites else None
    sub = submission_table(pred, sites, args.cell_types)
    _write_csv(sub, args.out)
    log.info("submission: %d test wells -> %s", len(sub), args.out)
    return 0


def load_metrics(path: str | os.PathLike) -> dict:
    try:
        with open(path) as fh:
            m = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read metrics JSON ({exc})") from exc
    if "round" not in m or "stages" not in m:
        raise InputError(f"{path}: not a metrics file (needs keys round, stages)")
    return m


def _run_summary(args: argparse.Namespace) -> int:
    df = summary_table([load_metrics(p) for p in args.metrics])
    _write_csv(df, args.out, sep="\t", float_format="%.6f")
    text = format_summary(df, args.balance_method)
    if args.out_text:
        write_text(args.out_text, text + "\n")
    print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metrics",
        help="accuracy of models, ensemble and balanced ensemble of one round",
        description="Accuracy per stage, split (validation / test), cell type and plate -> JSON.",
    )
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--sites", required=True, help="site table (validation labels)")
    p.add_argument("--truth", help="test_truth.csv (test split scored only when it has rows)")
    p.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="NAME=NPZ",
        help="model predictions; repeat a NAME for its files of several cell types",
    )
    p.add_argument("--ensemble", nargs="*", default=[], metavar="NPZ", help="ensemble npz per cell type")
    p.add_argument("--balanced", nargs="*", default=[], metavar="NPZ", help="balanced npz per cell type")
    p.add_argument("--pseudo-labels", help="this round's pseudo labels: scored against the truth")
    p.add_argument("--previous-pseudo-labels", help="the previous round's: how many labels changed")
    p.add_argument("--out", required=True, help="metrics JSON")
    p.set_defaults(func=_run_metrics)

    p = subparsers.add_parser(
        "submission",
        help="Kaggle submission (id_code,sirna) from balanced predictions",
        description="id_code,sirna for every test treatment well, sirna = predicted sirna_id.",
    )
    p.add_argument("--balanced", nargs="+", required=True, metavar="NPZ", help="balanced npz files")
    p.add_argument("--sites", help="site table: check that every test treatment well is predicted")
    p.add_argument(
        "--cell-types", nargs="*", default=None, help="with --sites: check only these cell types' wells"
    )
    p.add_argument("--out", required=True, help="submission CSV")
    p.set_defaults(func=_run_submission)

    p = subparsers.add_parser(
        "summary",
        help="table of the metrics of all rounds",
        description="round, stage, kind, split, cell_type, n, correct, accuracy -> TSV (and stdout).",
    )
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSON files (one per round)")
    p.add_argument("--out", required=True, help="summary TSV")
    p.add_argument("--out-text", help="the same as a readable table (round x stage, split/cell type)")
    p.add_argument("--balance-method", help="the balancing method, named in the readable table")
    p.set_defaults(func=_run_summary)
