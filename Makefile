# One-command entry points. Each target creates the virtual environment when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
CORES  ?= all
CONFIG ?= config/config.yaml
SMK     = snakemake --configfile $(CONFIG) --cores $(CORES)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# bash with pipefail: a failing snakemake must not leave an empty picture behind `| dot`
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: setup demo test test-fast lint format dryrun plan why dag dag-rxrx1 rulegraph report bench ablation profile clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" || { echo "need CPython 3.11 (the pinned torch 2.14.1 wheels); set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[workflow,dev]'
	touch $@

setup: $(VENV)/.installed

## demo: the whole method on the embedded synthetic screen, then the accuracy table
demo: setup
	$(SMK)
	@echo; echo "== accuracy per round and stage (results/summary.txt) =="; cat results/summary.txt

## test: the test suite (unit tests, real snakemake runs on tiny data, the loopback Slurm cluster)
test: setup
	pytest -ra

## test-fast: unit tests only
test-fast: setup
	pytest -ra -m "not slow and not slurm"

lint: setup
	ruff check scripts tests benchmarks
	ruff format --check scripts tests benchmarks
	snakefmt --check workflow
	$(SMK) --lint

format: setup
	ruff format scripts tests benchmarks
	ruff check --fix scripts tests benchmarks
	snakefmt workflow

## dryrun / dag / rulegraph: what would run (needs graphviz: apt-get install graphviz). `make dag` writes
## $(DAGDIR)/rules.svg (rule graph with job counts), slice.svg (the jobs of SLICE, all wildcards named)
## and jobs.html (the whole plan: zoom, search, collapse; opens offline). See docs/dag.md.
DAGDIR  ?= dag
SLICE   ?= --round 0
DAGOPTS ?=
DAGTITLE ?= $(CONFIG)
DAGSMK   = snakemake all --configfile $(CONFIG) $(DAGOPTS)
dryrun: setup
	$(SMK) -n

## plan: jobs per rule and the forecast GPU-hours / wall time of CONFIG (GPUS=8, DEVICE=a throughput.csv row)
GPUS   ?= 8
DEVICE ?= NVIDIA H100 80GB HBM3
plan: setup
	deepnoise plan --configfile $(CONFIG) --gpus $(GPUS) --device "$(DEVICE)"

## profile: install profiles/slurm where `snakemake --profile slurm` finds it (~/.config/snakemake/slurm),
## with the site's PARTITION, ACCOUNT, GPU_PARTITION and GPU_MODEL (each optional); FORCE=1 replaces one.
PROFILE_OPTS = $(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
	$(if $(GPU_PARTITION),--gpu-partition $(GPU_PARTITION)) $(if $(GPU_MODEL),--gpu-model $(GPU_MODEL)) \
	$(if $(FORCE),--force)
profile: setup
	deepnoise install-profile $(PROFILE_OPTS)

## why: the config keys (old -> new) behind each job that a rerun of CONFIG would run
why: setup
	deepnoise why --configfile $(CONFIG)
dag: setup
	mkdir -p $(DAGDIR)
	$(DAGSMK) --dag > $(DAGDIR)/jobs.dot
	$(DAGSMK) -n > $(DAGDIR)/dryrun.txt 2>&1
	$(DAGSMK) --rulegraph > $(DAGDIR)/rulegraph.dot
	deepnoise dag-rules --dot $(DAGDIR)/jobs.dot --dry-run $(DAGDIR)/dryrun.txt --rulegraph $(DAGDIR)/rulegraph.dot --out $(DAGDIR)/rules.dot
	dot -Tsvg $(DAGDIR)/rules.dot > $(DAGDIR)/rules.svg
	deepnoise dag-slice --dot $(DAGDIR)/jobs.dot --dry-run $(DAGDIR)/dryrun.txt $(SLICE) --out $(DAGDIR)/slice.dot
	dot -Tsvg $(DAGDIR)/slice.dot > $(DAGDIR)/slice.svg
	deepnoise dag-html --dot $(DAGDIR)/jobs.dot --dry-run $(DAGDIR)/dryrun.txt --title "$(DAGTITLE)" --out $(DAGDIR)/jobs.html
	@echo "wrote $(DAGDIR)/rules.svg $(DAGDIR)/slice.svg $(DAGDIR)/jobs.html"
rulegraph: dag

## dag-rxrx1: `make dag` for config/rxrx1.yaml on a fake RxRx1 metadata.csv (no images), in dag/rxrx1/,
## and docs/dag-rxrx1.png, a headless-Chromium screenshot of its jobs.html
RX1 = $(CURDIR)/dag/rxrx1
CHROMIUM ?= chromium
dag-rxrx1: setup
	mkdir -p $(RX1)/data $(RX1)/work
	python -m tests.fixtures.rxrx1 --out $(RX1)/data/metadata.csv
	python -c "import yaml; c = yaml.safe_load(open('config/rxrx1.yaml')); c['data']['root'] = '$(RX1)/data'; yaml.safe_dump(c, open('$(RX1)/config.yaml', 'w'))"
	$(MAKE) dag CONFIG=$(RX1)/config.yaml DAGDIR=$(RX1) DAGOPTS="--directory $(RX1)/work" DAGTITLE="config/rxrx1.yaml, fake RxRx1 metadata" SLICE="--round 0 --model xception --cell-type HUVEC"
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	  --disable-sync --no-first-run --user-data-dir=$$(mktemp -d) --window-size=1600,1000 --virtual-time-budget=30000 \
	  --screenshot=docs/dag-rxrx1.png file://$(RX1)/jobs.html

## report: the Snakemake HTML report of a finished run
report: setup
	$(SMK) --report report.html

## bench: ingest, balancing, training-loader and DAG benchmarks (each prints a table)
bench: setup
	python -m benchmarks.bench_ingest
	python -m benchmarks.bench_balance
	deepnoise bench train --synthetic --backbone resnet10t --input-size 64 --batch-size 32 --num-workers 1 --threads 1
	python -m benchmarks.bench_dag

## ablation: the paper's ladder on the calibrated screen, 5 seeds (each a new screen), paired differences
## + Holm (docs/ablation.md); results/ablation-calibrated/table.md (~90 min of 2 cores). The hard screen
## (stress preset): ABLATION=config/ablation-large.yaml (~4 h of 2 cores) or config/ablation.yaml;
## ABLATION=config/ablation-gpu.yaml for the device design.
ABLATION ?= config/ablation-calibrated.yaml
ablation: setup
	python -m benchmarks.ablation --config $(ABLATION)

clean:
	rm -rf results logs resources .snakemake report.html dag
