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

.PHONY: setup demo test test-fast lint format dryrun dag rulegraph report bench ablation clean

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

## dryrun / dag / rulegraph: what would run, as text and as SVG pictures (needs graphviz: apt-get install graphviz)
dryrun: setup
	$(SMK) -n
dag: setup
	mkdir -p dag
	snakemake all --dag --configfile $(CONFIG) | dot -Tsvg > dag/jobs.svg
	snakemake all --rulegraph --configfile $(CONFIG) | dot -Tsvg > dag/rules.svg
	@echo "wrote dag/jobs.svg dag/rules.svg"
rulegraph: dag

## report: the Snakemake HTML report of a finished run
report: setup
	$(SMK) --report report.html

## bench: ingest, balancing, training-loader and DAG benchmarks (each prints a table)
bench: setup
	python benchmarks/bench_ingest.py
	python benchmarks/bench_balance.py
	deepnoise bench train --synthetic --backbone resnet10t --input-size 64 --batch-size 32 --num-workers 1 --threads 1
	python benchmarks/bench_dag.py

## ablation: the paper's ladder, 5 seeds (each a new screen), paired differences + Holm (docs/ablation.md);
## results/ablation/table.md. ABLATION=config/ablation-gpu.yaml for the device design.
ABLATION ?= config/ablation.yaml
ablation: setup
	python benchmarks/ablation.py --config $(ABLATION)

clean:
	rm -rf results logs resources .snakemake report.html dag
