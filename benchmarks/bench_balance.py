"""Benchmark of per-plate balancing (``deepnoise.balance``) on synthetic RxRx1-sized predictions.

Prints two tables: time per plate (277 wells restricted to their group of 277 of 1,108 classes) and
per experiment (4 plates, 1,108 classes, including the choice of the plate -> group rotation), and
the accuracy before / after balancing for a few levels of model confidence.

    .venv/bin/python benchmarks/bench_balance.py [--repeats 5] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deepnoise.balance import (
    _log_restricted,
    balance_predictions,
    exact_plate,
    infer_plate_groups,
    iterative_plate,
    synthetic_case,
)
from deepnoise.evaluate import accuracy_table


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1108)
    ap.add_argument("--sharpness", type=float, default=3.0, help="logit scale: sets the confidence")
    args = ap.parse_args()

    sites, pred, truth = synthetic_case(n_classes=args.classes, signal=3.5, seed=0, sharpness=args.sharpness)
    groups = infer_plate_groups(sites)
    plate = np.flatnonzero(pred.plate == 1)
    y = truth.reindex(pred.well_id[plate]).to_numpy()
    classes = next(g for g in groups.groups if y[0] in g)
    probs = pred.probs[plate]

    print(f"timing (best of {args.repeats} runs)")
    print(f"{'step':<46}{'seconds':>10}")
    rows = [
        ("infer plate groups from the site table", lambda: infer_plate_groups(sites)),
        (f"plate {len(plate)}x{args.classes}: restrict + exact (Hungarian)",
         lambda: exact_plate(_log_restricted(probs, classes))),
        (f"plate {len(plate)}x{args.classes}: restrict + iterative",
         lambda: iterative_plate(_log_restricted(probs, classes))),
        (f"experiment 4x{len(plate)}x{args.classes}: exact",
         lambda: balance_predictions(pred, groups, "exact")),
        (f"experiment 4x{len(plate)}x{args.classes}: iterative",
         lambda: balance_predictions(pred, groups, "iterative")),
        (f"experiment 4x{len(plate)}x{args.classes}: iterative, no groups",
         lambda: balance_predictions(pred, None, "iterative", restrict=False)),
    ]  # fmt: skip
    for name, fn in rows:
        print(f"{name:<46}{_best(fn, args.repeats):>10.4f}")

    print()
    print(
        f"accuracy (mean over {args.seeds} synthetic experiments of 4x277 wells; probs = softmax("
        f"{args.sharpness:g} * logits), logits N(0,1) + signal on the true class)"
    )
    head = ("signal", "mean max p", "argmax", "exact", "iterative", "iter. no groups", "rotation ok")
    print("".join(f"{h:>16}" for h in head))
    for signal in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        acc = {k: [] for k in ("raw", "exact", "iterative", "nogroups")}
        conf, rot_ok = [], 0
        for seed in range(args.seeds):
            sites, pred, truth = synthetic_case(
                n_classes=args.classes, signal=signal, seed=100 + seed, sharpness=args.sharpness
            )
            groups = infer_plate_groups(sites)
            conf.append(float(pred.probs.max(axis=1).mean()))
            acc["raw"].append(accuracy_table(pred, truth)["accuracy"])
            out, info = balance_predictions(pred, groups, "exact")
            acc["exact"].append(accuracy_table(out, truth)["accuracy"])
            out, _ = balance_predictions(pred, groups, "iterative")
            acc["iterative"].append(accuracy_table(out, truth)["accuracy"])
            out, _ = balance_predictions(pred, None, "iterative", restrict=False)
            acc["nogroups"].append(accuracy_table(out, truth)["accuracy"])
            # the rotation is right when every balanced well lies in its true group
            y = truth.reindex(pred.well_id).to_numpy()
            ok = True
            for e, a in info.items():
                for p, gi in a["assignment"].items():
                    ix = (pred.experiment == e) & (pred.plate == p)
                    ok &= bool(np.isin(y[ix], groups.groups[gi]).all())
            rot_ok += ok
        vals = [signal, np.mean(conf), *(np.mean(acc[k]) for k in acc)]
        print("".join(f"{v:>16.3f}" for v in vals) + f"{f'{rot_ok}/{args.seeds}':>16}")


if __name__ == "__main__":
    main()
