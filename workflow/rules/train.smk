# Training per round: the shared model on all cell types, fine-tuning per cell type, prediction.
# Resumable checkpoints live in results/checkpoints/ (never a declared output, so Snakemake never
# deletes them); a restarted job resumes from its last epoch.


rule train:
    input:
        unpack(pseudo_inputs),
        sites=paths.SITES,
        classes=paths.CLASSES,
        stacks=ALL_STACKS,
        stats=ALL_STATS,
    output:
        weights=paths.fill(paths.WEIGHTS, scope="all"),
        log_csv=paths.fill(paths.TRAINING_LOG, scope="all"),
    log:
        "logs/round{round}/train/{model}.log",
    benchmark:
        paths.TRAIN_BENCHMARK
    conda:
        CONDA_ENV
    threads: threads_of("train")
    resources:
        runtime=forecast_runtime("train"),
        gpu=gpus_of("train"),
    params:
        hparams=lambda wc: hparams_json(wc.model),
        val=VAL_EXPERIMENTS,
        pseudo=pseudo_flags,
        checkpoints=lambda wc: paths.CHECKPOINTS.format(
            round=wc.round, model=wc.model, scope="all"
        ),
    shell:
        "DEEPNOISE_GPUS={resources.gpu:q} "
        "python -m deepnoise train --scope all --hparams {params.hparams:q}"
        " --sites {input.sites:q} --classes {input.classes:q}"
        " --stacks {input.stacks:q} --stats {input.stats:q}"
        " --val-experiments {params.val:q} {params.pseudo:q}"
        " --checkpoint-dir {params.checkpoints:q} --threads {threads} $DEEPNOISE_TRAIN_RUNTIME"
        " --out-weights {output.weights:q} --out-log {output.log_csv:q} > {log:q} 2>&1"


rule finetune:
    input:
        unpack(pseudo_inputs),
        init=paths.fill(paths.WEIGHTS, scope="all"),
        sites=paths.SITES,
        classes=paths.CLASSES,
        stacks=cell_type_stacks,
        stats=cell_type_stats,
    output:
        weights=paths.fill(paths.WEIGHTS, scope="{cell_type}"),
        log_csv=paths.fill(paths.TRAINING_LOG, scope="{cell_type}"),
    log:
        "logs/round{round}/finetune/{model}_{cell_type}.log",
    benchmark:
        paths.FINETUNE_BENCHMARK
    conda:
        CONDA_ENV
    threads: threads_of("train")
    resources:
        runtime=forecast_runtime("finetune"),
        gpu=gpus_of("train"),
    params:
        hparams=lambda wc: hparams_json(wc.model, finetune=True),
        val=VAL_EXPERIMENTS,
        pseudo=pseudo_flags,
        checkpoints=lambda wc: paths.CHECKPOINTS.format(
            round=wc.round, model=wc.model, scope=wc.cell_type
        ),
    shell:
        "DEEPNOISE_GPUS={resources.gpu:q} "
        "python -m deepnoise train --scope {wildcards.cell_type:q} --hparams {params.hparams:q}"
        " --init {input.init:q} --sites {input.sites:q} --classes {input.classes:q}"
        " --stacks {input.stacks:q} --stats {input.stats:q}"
        " --val-experiments {params.val:q} {params.pseudo:q}"
        " --checkpoint-dir {params.checkpoints:q} --threads {threads} $DEEPNOISE_TRAIN_RUNTIME"
        " --out-weights {output.weights:q} --out-log {output.log_csv:q} > {log:q} 2>&1"


rule predict:
    input:
        weights=paths.fill(paths.WEIGHTS, scope="{cell_type}"),
        sites=paths.SITES,
        stacks=lambda wc: paths.stacks(predicted_experiments(wc.cell_type)),
        stats=lambda wc: paths.stats(
            predicted_experiments(wc.cell_type), [wc.cell_type]
        ),
    output:
        paths.PREDICTIONS,
    log:
        "logs/round{round}/predict/{model}_{cell_type}.log",
    benchmark:
        paths.PREDICT_BENCHMARK
    conda:
        CONDA_ENV
    threads: threads_of("predict")
    resources:
        runtime=forecast_runtime("predict"),
        gpu=1,
    params:
        experiments=lambda wc: predicted_experiments(wc.cell_type),
        batch_size=int(config["predict"]["batch_size"]),
        tta="--tta" if config["predict"]["tta"] else "--no-tta",
    shell:
        "DEEPNOISE_GPUS={resources.gpu:q} "
        "python -m deepnoise predict --weights {input.weights:q} --sites {input.sites:q}"
        " --stacks {input.stacks:q} --stats {input.stats:q} --cell-type {wildcards.cell_type:q}"
        " --experiments {params.experiments:q} --batch-size {params.batch_size:q}"
        " {params.tta:q} --threads {threads} --out {output:q} > {log:q} 2>&1"
