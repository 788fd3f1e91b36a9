# Ingestion: synthetic screen (optional) -> site table -> plate stacks -> statistics.


rule synthesize:
    output:
        images=directory("resources/synthetic/images"),
        metadata="resources/synthetic/metadata.csv",
        truth="resources/synthetic/test_truth.csv",
    log:
        "logs/synthesize.log",
    conda:
        CONDA_ENV
    threads: threads_of("stack")
    params:
        cfg=json.dumps(config["synthetic"], sort_keys=True),
    shell:
        "python -m deepnoise synthesize --config-json {params.cfg:q}"
        " --out-images {output.images:q} --out-metadata {output.metadata:q}"
        " --out-truth {output.truth:q} --threads {threads} > {log:q} 2>&1"


rule sites:
    input:
        unpack(sites_inputs),
    output:
        sites=paths.SITES,
        truth=paths.TRUTH,
        classes=paths.CLASSES,
    log:
        "logs/sites.log",
    conda:
        CONDA_ENV
    params:
        source=SOURCE,
        root=DATA_ROOT,
        plates=list(layout.PLATES),
    shell:
        "python -m deepnoise sites --source {params.source:q} --root {params.root:q}"
        " --plates {params.plates:q} --out-sites {output.sites:q} --out-truth {output.truth:q}"
        " --out-classes {output.classes:q} > {log:q} 2>&1"


rule stack:
    input:
        sites=paths.SITES,
    output:
        paths.STACK,
    log:
        "logs/stacks/{experiment}_Plate{plate}.log",
    conda:
        CONDA_ENV
    threads: threads_of("stack")
    params:
        compression=config["data"]["compression"],
        pngs=png_fingerprint,
    shell:
        "python -m deepnoise stack --sites {input.sites:q} --experiment {wildcards.experiment:q}"
        " --plate {wildcards.plate:q} --compression {params.compression:q} {params.pngs:q}"
        " --threads {threads} --out {output:q} > {log:q} 2>&1"


rule plate_stats:
    input:
        paths.STACK,
    output:
        paths.PLATE_STATS,
    log:
        "logs/stats/{experiment}_Plate{plate}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise plate-stats --stack {input:q} --out {output:q} > {log:q} 2>&1"


rule experiment_stats:
    input:
        lambda wc: [
            paths.PLATE_STATS.format(experiment=wc.experiment, plate=p)
            for p in layout.PLATES
        ],
    output:
        paths.EXPERIMENT_STATS,
    log:
        "logs/stats/{experiment}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise aggregate-stats --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule cell_type_stats:
    input:
        lambda wc: [
            paths.PLATE_STATS.format(experiment=e, plate=p)
            for e in experiments_of(wc.cell_type)
            for p in layout.PLATES
        ],
    output:
        paths.CELL_TYPE_STATS,
    log:
        "logs/stats/{cell_type}.log",
    conda:
        CONDA_ENV
    shell:
        "python -m deepnoise aggregate-stats --inputs {input:q} --out {output:q} > {log:q} 2>&1"
