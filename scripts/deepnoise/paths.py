"""Every output path of the workflow, defined once.

Each constant is a template whose ``{names}`` are Snakemake wildcards: the rules use it as their
output pattern (``fill`` fixes some names, the others stay wildcards), the input functions and the
benchmarks format it into concrete paths. Paths are relative to the workflow's working directory.
No heavy imports: the Snakefile imports this at parse time.
"""

from __future__ import annotations

from collections.abc import Iterable

from deepnoise import layout

# ---------------------------------------------------------------- data stage
SITES = "results/sites.csv"
TRUTH = "results/test_truth.csv"
CLASSES = "results/classes.json"
STACK = "results/stacks/{experiment}/Plate{plate}.h5"
PLATE_STATS = "results/stats/plate/{experiment}/Plate{plate}.json"
EXPERIMENT_STATS = "results/stats/experiment/{experiment}.json"
CELL_TYPE_STATS = "results/stats/cell_type/{cell_type}.json"

# ---------------------------------------------------------------- rounds; scope = "all" or a cell type
WEIGHTS = "results/round{round}/models/{model}/{scope}/weights.pt"
TRAINING_LOG = "results/round{round}/models/{model}/{scope}/log.csv"
# resumable per-epoch checkpoints: never a declared output, so Snakemake never deletes them
CHECKPOINTS = "results/checkpoints/round{round}/{model}/{scope}"
PREDICTIONS = "results/round{round}/predictions/{model}/{cell_type}.npz"
ENSEMBLE = "results/round{round}/ensemble/{cell_type}.npz"
BALANCED = "results/round{round}/balanced/{cell_type}.npz"
PSEUDO_LABELS = "results/round{round}/pseudo_labels.csv"
METRICS = "results/round{round}/metrics.json"
# Snakemake benchmark files of the GPU jobs (wall and CPU seconds, memory): the cost record
TRAIN_BENCHMARK = "logs/benchmarks/round{round}/train/{model}.tsv"
FINETUNE_BENCHMARK = "logs/benchmarks/round{round}/finetune/{model}_{cell_type}.tsv"
PREDICT_BENCHMARK = "logs/benchmarks/round{round}/predict/{model}_{cell_type}.tsv"

# ---------------------------------------------------------------- across rounds, report
SUMMARY = "results/summary.tsv"
SUMMARY_TEXT = "results/summary.txt"
SUBMISSION = "results/submission.csv"
TRAINING_PLOT = "results/plots/training_round{round}.png"
SUMMARY_PLOT = "results/plots/{kind}.png"  # kind: accuracy, balancing
PLATES_PLOT = "results/plots/plates.png"
COMPOSITES_PLOT = "results/plots/composites.png"
ACCURACY_REPORT = "results/report/accuracy.html"
PROVENANCE_REPORT = "results/report/provenance.html"
SUMMARY_PLOT_KINDS = ("accuracy", "balancing")


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(template: str, **values: object) -> str:
    """``template`` with ``values`` filled in and every other ``{name}`` left as a wildcard:
    ``fill(WEIGHTS, scope="all")`` is the train rule's output pattern."""
    return template.format_map(_KeepMissing(values))


def stacks(experiments: Iterable[str]) -> list[str]:
    """The plate stacks of ``experiments``, plates in order."""
    return [STACK.format(experiment=e, plate=p) for e in experiments for p in layout.PLATES]


def stats(experiments: Iterable[str], cell_types: Iterable[str]) -> list[str]:
    """The statistics files of ``experiments`` at every level (plates, experiments) and of
    ``cell_types``: what any normalisation mode of those plates may read."""
    experiments = list(experiments)
    return (
        [PLATE_STATS.format(experiment=e, plate=p) for e in experiments for p in layout.PLATES]
        + [EXPERIMENT_STATS.format(experiment=e) for e in experiments]
        + [CELL_TYPE_STATS.format(cell_type=ct) for ct in cell_types]
    )


def data_outputs(experiments: Iterable[str], cell_types: Iterable[str]) -> list[str]:
    """Everything the data stage writes for a screen: site table, truth, classes, stacks, stats."""
    experiments = list(experiments)
    return [SITES, TRUTH, CLASSES, *stacks(experiments), *stats(experiments, cell_types)]
