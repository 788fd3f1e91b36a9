# Training per round: the shared model on all cell types, fine-tuning per cell type, prediction.
# Resumable checkpoints live in results/checkpoints/ (never a declared output, so Snakemake never
# deletes them); a restarted job resumes from its last epoch.


rule train:
    input:
        unpack(pseudo_inputs),
        sites=SITES,
        classes=CLASSES,
        stacks=ALL_STACKS,
        stats=ALL_STATS,
    output:
        weights="results/round{round}/models/{model}/all/weights.pt",
        log_csv="results/round{round}/models/{model}/all/log.csv",
    log:
        "logs/round{round}/train/{model}.log",
    benchmark:
        "logs/benchmarks/round{round}/train/{model}.tsv"
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
        checkpoints=lambda wc: f"results/checkpoints/round{wc.round}/{wc.model}/all",
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
        init="results/round{round}/models/{model}/all/weights.pt",
        sites=SITES,
        classes=CLASSES,
        stacks=ALL_STACKS,
        stats=ALL_STATS,
    output:
        weights="results/round{round}/models/{model}/{cell_type}/weights.pt",
        log_csv="results/round{round}/models/{model}/{cell_type}/log.csv",
    log:
        "logs/round{round}/finetune/{model}_{cell_type}.log",
    benchmark:
        "logs/benchmarks/round{round}/finetune/{model}_{cell_type}.tsv"
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
        checkpoints=lambda wc: f"results/checkpoints/round{wc.round}/{wc.model}/{wc.cell_type}",
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
        weights="results/round{round}/models/{model}/{cell_type}/weights.pt",
        sites=SITES,
        stacks=lambda wc: stacks_of(predicted_experiments(wc.cell_type)),
        stats=ALL_STATS,
    output:
        "results/round{round}/predictions/{model}/{cell_type}.npz",
    log:
        "logs/round{round}/predict/{model}_{cell_type}.log",
    benchmark:
        "logs/benchmarks/round{round}/predict/{model}_{cell_type}.tsv"
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
