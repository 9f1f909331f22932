# miLLM: the README's two commands. Both install what they need first.
HOST ?= 127.0.0.1
PORT ?= 8000
PY := .venv/bin/python

.PHONY: run test install lint demo bench

.venv/.installed: pyproject.toml requirements/constraints.txt scripts/install.sh
	bash scripts/install.sh

install: .venv/.installed

run: .venv/.installed
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

test: .venv/.installed
	bash scripts/test.sh

lint: .venv/.installed
	.venv/bin/ruff check .

demo: .venv/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py build_demo_assets --tier all

bench: .venv/.installed
	$(PY) bench/serve.py
