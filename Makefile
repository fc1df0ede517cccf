# pgops: `make demo` and `make test` do all set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup demo down test test-fast bench lint lock

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/pgops demo up

down:
	@if [ -x .venv/bin/pgops ]; then .venv/bin/pgops demo down; fi

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	@$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: setup
	@$(PY) bench/run_all.py

lint: setup
	@.venv/bin/ruff check plugins dags tests bench

lock:
	uv pip compile -q --python-version 3.11 requirements.in -o requirements.txt
	uv pip compile -q --python /usr/bin/python3 --python-version 3.11 include/dbhost/requirements.in -o include/dbhost/requirements.txt
