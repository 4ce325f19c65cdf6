# One place for set-up: .ci/run and a person on a fresh machine both use these targets.
PYTHON := .venv/bin/python

.PHONY: install test serve bench

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
