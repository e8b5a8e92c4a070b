# Each target does its own set-up on a fresh machine (Python >= 3.10 with pip).
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test test-all demo

install:
	# torch pinned: on the project's machines this is the CPU wheel on local disk (an unpinned torch pulls CUDA).
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q --run-slow

demo: install
	$(PY) -m llm_modules demo
