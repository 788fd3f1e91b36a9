"""Write an rxrx1-release-shaped metadata.csv (no images) for DAG benchmarks and dry-run tests.

The real release: 51 experiments (HUVEC 24, RPE 11, HEPG2 11, U2OS 5), 4 plates each, 308 wells per
plate (277 treatments of one of 4 groups + 30 controls + 1 empty), 2 sites per well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from deepnoise.layout import INNER_WELLS, RXRX1_COLUMNS

# (cell type, train experiments, test experiments) as in RxRx1
RXRX1_EXPERIMENTS = (("HUVEC", 16, 8), ("RPE", 7, 4), ("HEPG2", 7, 4), ("U2OS", 3, 2))


def experiments(n: int) -> list[tuple[str, str, str]]:
    """The first n of RxRx1's 51 experiments, interleaving cell types so every prefix mixes them."""
    full = []
    for cell_type, n_train, n_test in RXRX1_EXPERIMENTS:
        for i in range(n_train + n_test):
            full.append((f"{cell_type}-{i + 1:02d}", cell_type, "train" if i < n_train else "test"))
    by_type = [[e for e in full if e[1] == ct] for ct, *_ in RXRX1_EXPERIMENTS]
    order = [e for rank in range(24) for group in by_type if rank < len(group) for e in [group[rank]]]
    return order[:n]


def metadata(n_experiments: int) -> pd.DataFrame:
    rows = []
    for e, (experiment, cell_type, dataset) in enumerate(experiments(n_experiments)):
        for plate in (1, 2, 3, 4):
            group = (plate - 1 + e) % 4
            for w, well in enumerate(INNER_WELLS):
                if w < 277:
                    sirna_id, well_type = group * 277 + w, "treatment"
                elif w < 307:
                    sirna_id, well_type = 1108 + w - 277, "positive_control"
                else:
                    sirna_id, well_type = 1138, "negative_control"
                well_id = f"{experiment}_{plate}_{well}"
                for site in (1, 2):
                    rows.append(
                        (
                            f"{well_id}_{site}",
                            well_id,
                            cell_type,
                            dataset,
                            experiment,
                            plate,
                            well,
                            site,
                            well_type,
                            f"sirna{sirna_id}",
                            sirna_id,
                        )
                    )
    return pd.DataFrame(rows, columns=list(RXRX1_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiments", type=int, default=51)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata(args.experiments).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
