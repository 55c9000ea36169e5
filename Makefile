# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create .venv on first use (scripts/setup_env.sh; ~4 min, pinned CPU torch).
PY := .venv/bin/python
PYTEST_ARGS ?=
# megatron-core releases of the version matrix (docs/environment.md); .venv itself has 0.16.1.
# VERSION:core runs the smaller core subset (scripts/test_mcore.sh) on a release that sits
# between two fully tested ones.
MCORE ?= 0.16.1
MCORE_MATRIX ?= 0.14.0 0.15.3:core

.PHONY: venv lint test test-fast test-mcore test-mcore-matrix lint-docker demo clean

venv:
	@bash scripts/setup_env.sh

# ruff's lint and format check (pyproject.toml's [tool.ruff]); `make test` runs it first
lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: venv lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not multirank" $(PYTEST_ARGS)

# the version-sensitive subset against one megatron-core release: make test-mcore MCORE=0.14.0
# (MCORE=0.15.3:core for the core subset only)
test-mcore: venv
	bash scripts/test_mcore.sh $(MCORE)

# the same subset against every release of the matrix other than .venv's own (CI)
test-mcore-matrix: venv
	bash scripts/test_mcore.sh $(MCORE_MATRIX)

lint-docker: venv
	.venv/bin/hadolint docker/Dockerfile

# the main job; it checks that it reproduces the committed report (docs/demo/report.md says
# how closely) and exits 1 listing what differs
demo: venv
	$(PY) -m probsft_megatron.demo --compare docs/demo/report.json

clean:
	rm -rf .venv .venv-mcore-* outputs runs
