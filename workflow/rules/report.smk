# Figures for `snakemake --report report.html`.


rule plot_training:
    input:
        lambda wc: [
            f"results/round{wc.round}/models/{m}/{scope}/log.csv"
            for m in MODELS
            for scope in ["all"] + CELL_TYPES
        ],
    output:
        report(
            "results/plots/training_round{round}.png",
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        "logs/plots/training_round{round}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plot-training --logs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_accuracy:
    input:
        SUMMARY,
    output:
        report(
            "results/plots/{kind}.png",
            caption="../report/accuracy.rst",
            category="Accuracy",
        ),
    log:
        "logs/plots/{kind}.log",
    wildcard_constraints:
        kind="accuracy|balancing",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plot-summary --kind {wildcards.kind:q} --summary {input:q}"
        " --out {output:q} > {log:q} 2>&1"


rule plot_plates:
    input:
        metrics(LAST_ROUND),
    output:
        report(
            "results/plots/plates.png",
            caption="../report/plates.rst",
            category="Accuracy",
        ),
    log:
        "logs/plots/plates.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plot-summary --kind plates --metrics {input:q} --stage balanced"
        " --out {output:q} > {log:q} 2>&1"


rule plot_composites:
    input:
        stack_path(EXPERIMENTS[0].experiment, 1),
    output:
        report(
            "results/plots/composites.png",
            caption="../report/composites.rst",
            category="Images",
        ),
    log:
        "logs/plots/composites.log",
    conda:
        CONDA_ENV
    params:
        n=int(config["report"]["composites"]),
        # rxrx1-utils' fixed intensity ranges fit real images; the synthetic ones need per-image ranges
        scale="percentile" if SOURCE == "synthetic" else "rxrx1",
    shell:
        "python -m deepnoise plot-composites --stack {input:q} --n {params.n:q} --scale {params.scale:q}"
        " --out {output:q} > {log:q} 2>&1"
