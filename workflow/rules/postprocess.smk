# After prediction: ensemble of the models, per-plate balancing, pseudo labels for the next round,
# metrics per round, the Kaggle submission and the summary across rounds.


rule ensemble:
    input:
        lambda wc: [predictions(wc.round, m, wc.cell_type) for m in MODELS],
    output:
        paths.ENSEMBLE,
    log:
        "logs/round{round}/ensemble/{cell_type}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise ensemble --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule balance:
    input:
        predictions=paths.ENSEMBLE,
        sites=paths.SITES,
    output:
        paths.BALANCED,
    log:
        "logs/round{round}/balance/{cell_type}.log",
    conda:
        CONDA_ENV
    params:
        method=config["balance"]["method"],
    shell:
        "python -m deepnoise balance --predictions {input.predictions:q} --sites {input.sites:q}"
        " --method {params.method:q} --out {output:q} > {log:q} 2>&1"


rule pseudo_labels:
    input:
        balanced=lambda wc: [balanced(wc.round, ct) for ct in CELL_TYPES],
        ensemble=lambda wc: [ensemble(wc.round, ct) for ct in CELL_TYPES],
        previous=previous_round_pseudo,
    output:
        paths.PSEUDO_LABELS,
    log:
        "logs/round{round}/pseudo_labels.log",
    conda:
        CONDA_ENV
    params:
        fraction=pseudo_fraction,
        previous=previous_pseudo_flag,
    shell:
        "python -m deepnoise pseudo-labels --inputs {input.balanced:q} --ensemble {input.ensemble:q}"
        " --fraction {params.fraction:q} {params.previous:q} --out {output:q} > {log:q} 2>&1"


rule metrics:
    input:
        unpack(metrics_inputs),
    output:
        paths.METRICS,
    log:
        "logs/round{round}/metrics.log",
    conda:
        CONDA_ENV
    params:
        models=labelled_predictions,
        previous=lambda wc, input: (
            ["--previous-pseudo-labels", str(input.previous)] if input.previous else []
        ),
    shell:
        "python -m deepnoise metrics --round {wildcards.round:q} --sites {input.sites:q}"
        " --truth {input.truth:q} --models {params.models:q} --ensemble {input.ensemble:q}"
        " --balanced {input.balanced:q} --pseudo-labels {input.pseudo:q}"
        " {params.previous:q} --out {output:q} > {log:q} 2>&1"


rule submission:
    input:
        balanced=[balanced(LAST_ROUND, ct) for ct in CELL_TYPES],
        sites=paths.SITES,
    output:
        paths.SUBMISSION,
    log:
        "logs/submission.log",
    conda:
        CONDA_ENV
    params:
        cell_types=CELL_TYPES,
    shell:
        "python -m deepnoise submission --balanced {input.balanced:q} --sites {input.sites:q}"
        " --cell-types {params.cell_types:q}"
        " --out {output:q} > {log:q} 2>&1"


rule summary:
    input:
        [metrics(r) for r in ROUNDS],
    output:
        table=report(
            paths.SUMMARY, caption="../report/summary.rst", category="Accuracy"
        ),
        text=paths.SUMMARY_TEXT,
    log:
        "logs/summary.log",
    conda:
        CONDA_ENV
    params:
        method=config["balance"]["method"],
    shell:
        "python -m deepnoise summary --metrics {input:q} --out {output.table:q}"
        " --out-text {output.text:q} --balance-method {params.method:q} > {log:q} 2>&1"
