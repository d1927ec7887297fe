# The two commands the README opens with; each sets up .venv itself (scripts/bootstrap.sh).
PY := .venv/bin/python

.PHONY: demo test bench setup clean references
setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m dainr_app.cli demo -o dainr-demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m dainr_app.cli bench

clean:
	rm -rf dainr-demo .pytest_cache

references: setup
	$(PY) -m tests.integration --regenerate
