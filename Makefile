# The two commands of the README. Each sets itself up on a fresh machine (apt + venv + pip), then runs.
.PHONY: demo test setup lint bench

demo:
	bash scripts/setup.sh
	.venv/bin/python -m pipeline demo

test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check pipeline tests jobs

bench:
	bash scripts/setup.sh
	.venv/bin/python -m pipeline bench
