# Figures, tables and provenance for `snakemake --report report.html`.


rule plot_training:
    input:
        lambda wc: [
            paths.TRAINING_LOG.format(round=wc.round, model=m, scope=scope)
            for m in MODELS
            for scope in ["all"] + CELL_TYPES
        ],
    output:
        report(
            paths.TRAINING_PLOT,
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
        paths.SUMMARY,
    output:
        report(
            paths.SUMMARY_PLOT,
            caption="../report/accuracy.rst",
            category="Accuracy",
        ),
    log:
        "logs/plots/{kind}.log",
    wildcard_constraints:
        kind=one_of(paths.SUMMARY_PLOT_KINDS),
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plot-summary --kind {wildcards.kind:q} --summary {input:q}"
        " --out {output:q} > {log:q} 2>&1"


# The table is shown in the report page itself: its caption inlines the HTML file (raw :file:).
rule accuracy_table:
    input:
        paths.SUMMARY,
    output:
        report(
            paths.ACCURACY_REPORT,
            caption="../report/accuracy_table.rst",
            category="Accuracy",
        ),
    log:
        "logs/report/accuracy_table.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise report-table --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_plates:
    input:
        [metrics(r) for r in ROUNDS],
    output:
        report(
            paths.PLATES_PLOT,
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
        # plate 1 of the first experiment of each cell type
        [
            paths.STACK.format(experiment=experiments_of(ct)[0], plate=1)
            for ct in CELL_TYPES
        ],
    output:
        report(
            paths.COMPOSITES_PLOT,
            caption="../report/composites.rst",
            category="Images",
        ),
    log:
        "logs/plots/composites.log",
    conda:
        CONDA_ENV
    params:
        n=int(config["report"]["composites"]),
        # each channel stretched between its 0.5 and 99.8 percentiles: real and synthetic images alike
        scale="percentile",
    shell:
        "python -m deepnoise plot-composites --stack {input:q} --n {params.n:q} --scale {params.scale:q}"
        " --out {output:q} > {log:q} 2>&1"


# Which config, commit and package versions produced the run. After the summary, so that a rerun
# of the results writes it again.
rule provenance:
    input:
        paths.SUMMARY,
    output:
        report(
            paths.PROVENANCE_REPORT,
            caption="../report/provenance.rst",
            category="Provenance",
        ),
    log:
        "logs/report/provenance.log",
    conda:
        CONDA_ENV
    params:
        config=provenance_config(),
        repo=workflow.basedir,
    shell:
        "python -m deepnoise report-provenance --config-json {params.config:q} --repo {params.repo:q}"
        " --out {output:q} > {log:q} 2>&1"
