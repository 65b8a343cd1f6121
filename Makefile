# Two entry points (see README):
#   make run   install everything, then run the daemon serving the default model
#   make test  install everything, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Engine environments and the default model for the tests, kept between runs
# so that llama.cpp is compiled once.
TEST_STATE := $(CURDIR)/.state

.PHONY: install run test soak bench gpu-check bench-throughput bench-routing bench-front bench-overhead bench-failover clean

$(BIN)/node-supervisor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/node-supervisor

run: install
	$(BIN)/node-supervisor run

test: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create llamacpp exllamav2 fake openai
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python -m pytest -v -rs

# The soak (tests/soak.py, docs/RELIABILITY.md): 1,000 injected faults (worker SIGKILL and SIGSTOP, slow and
# dead clients, HTTP abuse, reloads) under ZeroMQ and HTTP load, on fake engines and the real llama.cpp engine;
# not part of `make test` (its short seeded pass is). Options in SOAK_ARGS, e.g. SOAK_ARGS="--faults 5000 --seed 7".
soak: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create llamacpp fake
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python -m tests.soak $(SOAK_ARGS)

# The report (bench/compare.py): the daemon beside llama-cpp-python, llama-server
# (built once from the same llama.cpp) and llama-cpp-python's own server (its
# environment made once with the same build), the HTTP front's own cost, routing capacity; options in BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--rounds 6 --tokens 64 --threads 2" (or "--gpu").
bench: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create llamacpp fake
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/compare.py $(BENCH_ARGS)

# The GPU check (bench/gpu_check.py): the llama.cpp environment built as the node chooses (CUDA, its
# architecture only), the cuda-marked tests, then the report with --gpu; each phase's time printed and every
# figure written as JSON. Offline, pip's own options name the wheel folder: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR.
# Options in GPU_CHECK_ARGS, e.g. "--model M.gguf", "--only tests,bench", "--cpu" (the same phases without CUDA).
gpu-check: install
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

bench-throughput: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create llamacpp
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/throughput.py $(BENCH_ARGS)

bench-routing: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create fake
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/routing.py $(BENCH_ARGS)

# What the HTTP front adds over ZeroMQ, with a fake engine of fixed token time (bench/front.py).
bench-front: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create fake
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/front.py $(BENCH_ARGS)

bench-overhead: install
	NODESUP_STATE_DIR=$(TEST_STATE) NODESUP_DATA_DIR=$(TEST_STATE)/data \
		$(BIN)/node-supervisor envs create llamacpp
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/overhead.py

bench-failover: install
	NODESUP_TEST_STATE=$(TEST_STATE) $(BIN)/python bench/failover.py

clean:
	rm -rf $(VENV) $(TEST_STATE)
