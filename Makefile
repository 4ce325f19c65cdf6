# One place for set-up: .ci/run and a person on a fresh machine both use these targets.
PYTHON := .venv/bin/python

.PHONY: install test serve

# torch first and pinned: the CPU build lies on local disk; unpinned, pip would fetch a multi-GB CUDA build.
install:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q

serve: install
	$(PYTHON) -m app
