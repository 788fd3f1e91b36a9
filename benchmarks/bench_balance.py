"""Benchmark of per-plate balancing (``deepnoise.balance``) on synthetic RxRx1-sized predictions.

Prints two tables: the time of each method on one experiment (4 plates x 277 wells, 1,108 classes;
``groups`` includes the search over the 24 plate -> group orders), as the median of interleaved
repeats (every repeat runs every method once, in turn) with the min-max spread; and the accuracy
before / after balancing with each method for a few levels of model quality, on experiments whose
plate -> group order is a random permutation (non-cyclic for 20 of 24), with how often ``groups``
found the right order and how often it warned about a weak margin.

    .venv/bin/python -m benchmarks.bench_balance [--repeats 5] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from deepnoise.balance import balance_predictions, infer_plate_groups
from deepnoise.evaluate import accuracy_table
from tests.fixtures.balance import synthetic_case  # test scaffolding, shared with the tests

METHODS = ("groups", "exact", "paper")


def _timings(pred, groups, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for m in METHODS:  # warm-up (imports, caches), not timed
        balance_predictions(pred, groups if m == "groups" else None, m)
    for _ in range(repeats):
        for m in METHODS:  # interleaved: drift of the machine hits every method alike
            t = time.perf_counter()
            balance_predictions(pred, groups if m == "groups" else None, m)
            times[m].append(time.perf_counter() - t)
    return times


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1108)
    ap.add_argument("--sharpness", type=float, default=3.0, help="logit scale: sets the confidence")
    args = ap.parse_args()
    warned = _Count()
    logging.getLogger("deepnoise.balance").addHandler(warned)
    logging.getLogger("deepnoise.balance").propagate = False

    sites, pred, truth = synthetic_case(
        n_classes=args.classes, signal=3.5, seed=0, sharpness=args.sharpness, eval_order=(0, 2, 1, 3)
    )
    groups = infer_plate_groups(sites)
    n_plate = int((pred.plate == 1).sum())
    t = time.perf_counter()
    for _ in range(args.repeats):
        infer_plate_groups(sites)
    print(f"infer plate groups from the site table: {(time.perf_counter() - t) / args.repeats:.4f} s (mean)")
    print(
        f"time per experiment (4 x {n_plate} wells x {args.classes} classes), median of {args.repeats} "
        f"interleaved repeats [min - max]"
    )
    times = _timings(pred, groups, args.repeats)
    for m in METHODS:
        x = np.array(times[m])
        print(f"  {m:<8}{np.median(x):>9.4f} s  [{x.min():.4f} - {x.max():.4f}]")

    print()
    print(
        f"accuracy (mean over {args.seeds} synthetic experiments of 4x{n_plate} wells with a random "
        f"plate -> group order; probs = softmax({args.sharpness:g} * logits), logits N(0,1) + signal "
        "on the true class)"
    )
    head = ("signal", "mean max p", "argmax", *METHODS, "order ok", "warned")
    print("".join(f"{h:>12}" for h in head))
    for signal in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        acc: dict[str, list[float]] = {k: [] for k in ("raw", *METHODS)}
        conf, order_ok = [], 0
        warned.n = 0
        for seed in range(args.seeds):
            order = tuple(int(g) for g in np.random.default_rng(1000 + seed).permutation(4))
            sites, pred, truth = synthetic_case(
                n_classes=args.classes,
                signal=signal,
                seed=100 + seed,
                sharpness=args.sharpness,
                eval_order=order,
            )
            groups = infer_plate_groups(sites)
            conf.append(float(pred.probs.max(axis=1).mean()))
            acc["raw"].append(accuracy_table(pred, truth)["accuracy"])
            for m in METHODS:
                out, info = balance_predictions(pred, groups if m == "groups" else None, m)
                acc[m].append(accuracy_table(out, truth)["accuracy"])
                if m == "groups":
                    found = next(iter(info.values()))["assignment"]
                    order_ok += found == {p + 1: g for p, g in enumerate(order)}
        vals = [signal, np.mean(conf), *(np.mean(acc[k]) for k in acc)]
        print(
            "".join(f"{v:>12.3f}" for v in vals)
            + f"{f'{order_ok}/{args.seeds}':>12}{f'{warned.n}/{args.seeds}':>12}"
        )


if __name__ == "__main__":
    main()
