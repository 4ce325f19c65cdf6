# One place for set-up: .ci/run and a person on a fresh machine both use these targets.
PYTHON := .venv/bin/python

.PHONY: install test serve bench checkpoints

# torch first and pinned: the CPU build lies on local disk; unpinned, pip would fetch a multi-GB CUDA build.
# Chromium from Debian, for the playground's browser test (playwright drives it; it never downloads one).
# Without apt-get (not Debian) there is nothing to install it with, and that test skips itself.
install:
	test -x $(PYTHON) || python3 -m venv .venv
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q

serve: install
	$(PYTHON) -m app

# Every benchmark, then docs/benchmarks.md regenerated from the results (about 10 minutes).
bench: install
	$(PYTHON) -m benchmarks

# The long reliability runs (tests marked `long`, which `make test` leaves out): a 5,000-request fuzz,
# ten disconnect storms, real slow readers, 60 trainer kills. -rP prints what each measured. See docs/reliability.md.
reliability: install
	$(PYTHON) -m pytest -m long -rP tests/reliability

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
