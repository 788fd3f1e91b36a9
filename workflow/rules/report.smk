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
        "python -m deepnoise plot-training --logs {input} --out {output} > {log} 2>&1"


rule plot_summary:
    input:
        summary=SUMMARY,
        metrics=[metrics(r) for r in ROUNDS],
    output:
        accuracy=report(
            "results/plots/accuracy.png",
            caption="../report/accuracy.rst",
            category="Accuracy",
        ),
        balancing=report(
            "results/plots/balancing.png",
            caption="../report/balancing.rst",
            category="Accuracy",
        ),
        plates=report(
            "results/plots/plates.png",
            caption="../report/plates.rst",
            category="Accuracy",
        ),
        table=report(
            "results/plots/summary.html",
            caption="../report/summary.rst",
            category="Accuracy",
        ),
    log:
        "logs/plots/summary.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plot-summary --summary {input.summary} --metrics {input.metrics}"
        " --out-accuracy {output.accuracy} --out-balancing {output.balancing}"
        " --out-plates {output.plates} --out-table {output.table} > {log} 2>&1"


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
    shell:
        "python -m deepnoise plot-composites --stack {input} --n {params.n} --out {output} > {log} 2>&1"
