.PHONY: install test lint demo bench
install:
	bash scripts/install
test:
	bash scripts/test
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
demo:
	.venv/bin/pgqueue demo
bench:
	bash bench/run.sh
