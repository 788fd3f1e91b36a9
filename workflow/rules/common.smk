import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The rules call `python -m deepnoise`; the package is the one next to this workflow, whatever is
# installed (also inside `--sdm conda` environments, which carry only the dependencies).
SCRIPTS = str(Path(workflow.basedir).parent / "scripts")
sys.path.insert(0, SCRIPTS)
SHELL_PREFIX = f"set -euo pipefail; export PYTHONPATH={shlex.quote(SCRIPTS)}; "
shell.prefix(SHELL_PREFIX)

from deepnoise import (
    configcheck,
    hparams as training_keys,
    layout,
    paths,
    split,
)  # noqa: E402
from deepnoise import metadata as md  # noqa: E402

# Every problem of the config (schema, training keys of every model, backbones, synthetic keys,
# data folder) in one message naming the keys and the allowed values, before any job starts. One
# pass: configcheck runs the schema itself (Snakemake's validate() would report each problem again).
SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
configcheck.check_config(config, configcheck.load_schema(SCHEMA))

CONDA_ENV = "../../envs/deepnoise.yaml"


# ---------------------------------------------------------------- the screen, known at parse time
SOURCE = config["data"]["source"]
if SOURCE == "synthetic":
    DATA_ROOT = "resources/synthetic"
    EXPERIMENTS = layout.synthetic_experiments(config["synthetic"])
else:
    DATA_ROOT = config["data"]["root"]
    EXPERIMENTS = layout.real_experiments(SOURCE, DATA_ROOT)

EXP = {e.experiment: e for e in EXPERIMENTS}
PLATES = [(e.experiment, p) for e in EXPERIMENTS for p in layout.PLATES]
ALL_CELL_TYPES = sorted({e.cell_type for e in EXPERIMENTS})
CELL_TYPES = list(config["cell_types"]) or ALL_CELL_TYPES
for _ct in CELL_TYPES:
    if _ct not in ALL_CELL_TYPES:
        raise configcheck.ConfigError(
            f"config cell_types: {_ct!r} is not a cell type of the data; "
            f"allowed values: {', '.join(ALL_CELL_TYPES)}"
        )
MODELS = list(config["models"])
ROUNDS = list(range(int(config["rounds"])))
LAST_ROUND = ROUNDS[-1]


# The validation hold-out, and the splits that cannot run (a fine-tuned cell type without a
# labelled training experiment, or never scored) refused with their fix before any job starts.
VAL_EXPERIMENTS = split.validation_experiments(
    EXPERIMENTS,
    config["split"]["validation_experiments"],
    int(config["split"]["validation_per_cell_type"]),
)
_split_problems = split.split_problems(
    EXPERIMENTS,
    VAL_EXPERIMENTS,
    CELL_TYPES,
    explicit=bool(config["split"]["validation_experiments"]),
)
if _split_problems:
    raise configcheck.ConfigError(
        f"{len(_split_problems)} configuration problem(s):\n"
        + "\n".join(f"  - {p}" for p in _split_problems)
    )


def predicted_experiments(cell_type):
    """Validation and test experiments of a cell type: the wells that get predictions."""
    return [
        e.experiment
        for e in EXPERIMENTS
        if e.cell_type == cell_type
        and (e.dataset == "test" or e.experiment in VAL_EXPERIMENTS)
    ]


def one_of(names):
    """A wildcard constraint matching exactly these names (escaped: names are data)."""
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    round=r"\d+",
    plate=r"[1-4]",
    experiment=one_of(EXP),
    cell_type=one_of(ALL_CELL_TYPES),
    model=one_of(MODELS),


# ---------------------------------------------------------------- paths (deepnoise/paths.py)
def experiments_of(cell_type):
    return [e.experiment for e in EXPERIMENTS if e.cell_type == cell_type]


ALL_STACKS = paths.stacks(EXP)
ALL_STATS = paths.stats(EXP, ALL_CELL_TYPES)


def cell_type_stacks(wildcards):
    """The stacks a fine-tune of one cell type reads (it trains on that cell type's wells only)."""
    return paths.stacks(experiments_of(wildcards.cell_type))


def cell_type_stats(wildcards):
    return paths.stats(experiments_of(wildcards.cell_type), [wildcards.cell_type])


def predictions(round_, model, cell_type):
    return paths.PREDICTIONS.format(round=round_, model=model, cell_type=cell_type)


def ensemble(round_, cell_type):
    return paths.ENSEMBLE.format(round=round_, cell_type=cell_type)


def balanced(round_, cell_type):
    return paths.BALANCED.format(round=round_, cell_type=cell_type)


def pseudo_labels(round_):
    return paths.PSEUDO_LABELS.format(round=round_)


def metrics(round_):
    return paths.METRICS.format(round=round_)


# ---------------------------------------------------------------- hyper-parameters as params
def hparams_json(model, finetune=False):
    """One JSON string per model and stage: the `params:` value whose change reruns that job (the
    recipe keys of train <- models.<m> [<- finetune <- models.<m>.finetune]; no runtime knob).
    """
    return json.dumps(training_keys.recipe(config, model, finetune), sort_keys=True)


# Runtime knobs (loader workers, validation batch, AMP, ...; set under `train:`): plain flags of the
# training command, so that changing one never reruns a job. Not `params:` (tracked) nor a global in
# `shell:` (refused by `snakemake --lint`): the shell prefix exports them and the training rules
# append `$DEEPNOISE_TRAIN_RUNTIME`. Snakemake 9 tracks params, inputs and code, where code is the
# rule's unformatted shell text, never the prefix; on Slurm the job step re-parses the same config.
RUNTIME_ARGS = training_keys.runtime_args(config["train"])
shell.prefix(
    f"{SHELL_PREFIX}export DEEPNOISE_TRAIN_RUNTIME={shlex.quote(shlex.join(RUNTIME_ARGS))}; "
)


PSEUDO = config["pseudo"]


def pseudo_inputs(wildcards):
    """What round r > 0 learns from on the unlabelled wells of round r - 1: its pseudo labels (hard)
    or the probabilities of its balanced ensembles (soft, the paper's order: balancing, then pseudo
    labels) or, with soft_source: ensemble, of its unbalanced ensembles; with warm_start also its
    weights.
    """
    r = int(wildcards.round)
    if r == 0:
        return {}
    if PSEUDO["targets"] == "hard":
        out = {"pseudo": pseudo_labels(r - 1)}
    elif PSEUDO["soft_source"] == "balanced":
        out = {"soft": [balanced(r - 1, ct) for ct in CELL_TYPES]}
    else:
        out = {"soft": [ensemble(r - 1, ct) for ct in CELL_TYPES]}
    if PSEUDO["warm_start"] and "cell_type" not in wildcards.keys():
        out["warm"] = paths.WEIGHTS.format(
            round=r - 1, model=wildcards.model, scope="all"
        )
    return out


def pseudo_flags(wildcards, input):
    """Command-line words of the previous round's targets (quoted by `:q` in the rule)."""
    keys = input.keys()
    words = ["--round", str(wildcards.round)]
    if "pseudo" in keys:
        words += ["--pseudo-labels", str(input.pseudo)]
    if "soft" in keys:
        words += ["--soft-targets", *map(str, input.soft)]
    if "warm" in keys:
        words += ["--init", str(input.warm)]
    return words


def pseudo_fraction(wildcards):
    """Hard targets: the fraction of each plate's wells that round r's labels select for round r + 1."""
    fractions = PSEUDO["fractions"]
    return float(fractions[min(int(wildcards.round), len(fractions) - 1)])


def previous_round_pseudo(wildcards):
    r = int(wildcards.round)
    return [pseudo_labels(r - 1)] if r > 0 else []


def previous_pseudo_flag(wildcards, input):
    return ["--previous", str(input.previous)] if input.previous else []


def threads_of(kind):
    return int(config["threads"][kind])


# ---------------------------------------------------------------- input functions
def sites_inputs(wildcards):
    if SOURCE == "synthetic":
        return rules.synthesize.output
    if SOURCE == "rxrx1":
        return {"metadata": f"{DATA_ROOT}/metadata.csv"}
    return {
        name: f"{DATA_ROOT}/{name}.csv"
        for name in ("train", "test", "train_controls", "test_controls")
    }


def metrics_inputs(wildcards):
    r = wildcards.round
    return {
        "sites": paths.SITES,
        "truth": paths.TRUTH,
        "pseudo": pseudo_labels(r),
        "previous": previous_round_pseudo(wildcards),
        "models": [predictions(r, m, ct) for m in MODELS for ct in CELL_TYPES],
        "ensemble": [ensemble(r, ct) for ct in CELL_TYPES],
        "balanced": [balanced(r, ct) for ct in CELL_TYPES],
    }


def labelled_predictions(wildcards):
    """`model=path` pairs (one per cell type), so the metrics know which file is which model."""
    r = wildcards.round
    return [f"{m}={predictions(r, m, ct)}" for m in MODELS for ct in CELL_TYPES]


def report_outputs():
    return [
        *(paths.SUMMARY_PLOT.format(kind=k) for k in paths.SUMMARY_PLOT_KINDS),
        paths.PLATES_PLOT,
        paths.COMPOSITES_PLOT,
        paths.ACCURACY_REPORT,
        paths.PROVENANCE_REPORT,
    ] + [paths.TRAINING_PLOT.format(round=r) for r in ROUNDS]


# ---------------------------------------------------------------- cost forecast (deepnoise plan)
# `deepnoise plan` runs `snakemake -n` with DEEPNOISE_PLAN_FACTS set: the screen as this Snakefile
# sees it goes to that file, so the forecast counts the workflow's own experiments, split and keys.
def plan_facts():
    return {
        "experiments": [[e.experiment, e.cell_type, e.dataset] for e in EXPERIMENTS],
        "val_experiments": VAL_EXPERIMENTS,
        "cell_types": CELL_TYPES,
        "hparams": {m: json.loads(hparams_json(m)) for m in MODELS},
        "finetune_hparams": {
            m: json.loads(hparams_json(m, finetune=True)) for m in MODELS
        },
        "source": SOURCE,
        "root": DATA_ROOT,
        "synthetic": config["synthetic"],
        "config": config,
    }


_PLAN_FACTS = os.environ.get("DEEPNOISE_PLAN_FACTS")
if _PLAN_FACTS:
    Path(_PLAN_FACTS).write_text(json.dumps(plan_facts()))


def forecast_runtime(rule_name):
    """Slurm time limit (minutes) of a GPU job: its forecast on DEEPNOISE_PLAN_DEVICE (default: the
    throughput table's H100 row) x DEEPNOISE_PLAN_MARGIN (default 1.5) x attempt."""
    from deepnoise import plan

    device = os.environ.get("DEEPNOISE_PLAN_DEVICE", plan.DEFAULT_DEVICE)
    margin = float(os.environ.get("DEEPNOISE_PLAN_MARGIN", "1.5"))

    def runtime(wildcards, attempt):
        if "table" not in _PLAN_CACHE:
            _PLAN_CACHE["table"] = plan.read_table()
        cost = plan.job_cost(
            _plan_screen(), _PLAN_CACHE["table"], device, rule_name, dict(wildcards)
        )
        return plan.runtime_minutes(cost.seconds, margin, attempt)

    return runtime


def _plan_screen():
    from deepnoise import plan

    if "screen" not in _PLAN_CACHE:
        _PLAN_CACHE["screen"] = plan.screen_from_facts(plan_facts())
    return _PLAN_CACHE["screen"]


_PLAN_CACHE = {}


def png_fingerprint(wildcards):
    """`--pngs` and the plate folder's PNGs (names, sizes, mtimes): a changed, added or deleted PNG
    changes this param and reruns exactly that plate's stack. None for the synthetic screen: its PNGs
    are the `synthesize` output, already upstream of every stack (and an empty word would vanish
    from the command line)."""
    if SOURCE == "synthetic":
        return []
    e = EXP[wildcards.experiment]
    return [
        "--pngs",
        md.png_fingerprint(
            md.plate_dir(SOURCE, DATA_ROOT, e.experiment, e.dataset, wildcards.plate)
        ),
    ]


def gpus_of(kind):
    """GPUs per job of `kind` (`train`: train and finetune): the config's `gpus:`, default 1."""
    return int(config.get("gpus", {}).get(kind, 1))


def provenance_config():
    """The config the report records: everything but the runtime knobs, which change speed, never
    results (so changing one reruns nothing, not even the provenance page)."""
    recipe = json.loads(json.dumps(config, default=str))
    for key in training_keys.RUNTIME_KEYS:
        recipe["train"].pop(key, None)
    return json.dumps(recipe, sort_keys=True)
