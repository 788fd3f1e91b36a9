import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The rules call `python -m deepnoise`; the package is the one next to this workflow, whatever is
# installed (also inside `--sdm conda` environments, which carry only the dependencies).
SCRIPTS = str(Path(workflow.basedir).parent / "scripts")
sys.path.insert(0, SCRIPTS)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(SCRIPTS)}; ")

from deepnoise import configcheck, layout  # noqa: E402

# Every problem of the config (schema, training keys of every model, backbones, synthetic keys,
# data folder) in one message naming the keys and the allowed values, before any job starts.
SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"
configcheck.check_config(config, configcheck.load_schema(SCHEMA))
validate(config, schema=str(SCHEMA))

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


def _validation_experiments():
    explicit = list(config["split"]["validation_experiments"])
    for e in explicit:
        if e not in EXP or EXP[e].dataset != "train":
            labelled = [x.experiment for x in EXPERIMENTS if x.dataset == "train"]
            raise configcheck.ConfigError(
                f"config split.validation_experiments: {e!r} is not a labelled experiment; "
                f"allowed values: {', '.join(labelled)}"
            )
    if explicit:
        return explicit
    n = int(config["split"]["validation_per_cell_type"])
    out = []
    for ct in ALL_CELL_TYPES:
        train = [
            e.experiment
            for e in EXPERIMENTS
            if e.cell_type == ct and e.dataset == "train"
        ]
        out += train[len(train) - n :]
    return out


VAL_EXPERIMENTS = _validation_experiments()


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


# ---------------------------------------------------------------- paths
SITES = "results/sites.csv"
TRUTH = "results/test_truth.csv"
CLASSES = "results/classes.json"
SUMMARY = "results/summary.tsv"
SUMMARY_TEXT = "results/summary.txt"
SUBMISSION = "results/submission.csv"


def stack_path(experiment, plate):
    return f"results/stacks/{experiment}/Plate{plate}.h5"


def stacks_of(experiments):
    return [stack_path(e, p) for e in experiments for p in layout.PLATES]


ALL_STACKS = stacks_of(EXP)
ALL_STATS = (
    [f"results/stats/plate/{e}/Plate{p}.json" for e, p in PLATES]
    + [f"results/stats/experiment/{e}.json" for e in EXP]
    + [f"results/stats/cell_type/{ct}.json" for ct in ALL_CELL_TYPES]
)


def predictions(round_, model, cell_type):
    return f"results/round{round_}/predictions/{model}/{cell_type}.npz"


def ensemble(round_, cell_type):
    return f"results/round{round_}/ensemble/{cell_type}.npz"


def balanced(round_, cell_type):
    return f"results/round{round_}/balanced/{cell_type}.npz"


def pseudo_labels(round_):
    return f"results/round{round_}/pseudo_labels.csv"


def metrics(round_):
    return f"results/round{round_}/metrics.json"


# ---------------------------------------------------------------- hyper-parameters as params
def hparams(model, finetune=False):
    """The shared training keys, overridden by the model's own (and by `finetune` for fine-tuning)."""
    extra = config["finetune"] if finetune else {}
    return {**config["train"], **config["models"][model], **extra}


def hparams_json(model, finetune=False):
    """One JSON string per model and stage: the `params:` value whose change reruns that job."""
    return json.dumps(hparams(model, finetune), sort_keys=True)


def previous_pseudo_labels(wildcards):
    """Round r > 0 trains with the balanced ensemble of round r - 1 as pseudo labels."""
    r = int(wildcards.round)
    return [pseudo_labels(r - 1)] if r > 0 else []


def pseudo_flag(wildcards, input):
    """Command-line words (quoted by `:q` in the rule): none in round 0."""
    return ["--pseudo-labels", str(input.pseudo)] if input.pseudo else []


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
        "sites": SITES,
        "truth": TRUTH,
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
        "results/plots/accuracy.png",
        "results/plots/balancing.png",
        "results/plots/plates.png",
        "results/plots/composites.png",
    ] + [f"results/plots/training_round{r}.png" for r in ROUNDS]


def gpus_of(kind):
    """GPUs per job of `kind` (`train`: train and finetune): the config's `gpus:`, default 1."""
    return int(config.get("gpus", {}).get(kind, 1))
