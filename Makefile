# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create .venv on first use (scripts/setup_env.sh; ~4 min, pinned CPU torch).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean

venv:
	@bash scripts/setup_env.sh

test: venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not multirank" $(PYTEST_ARGS)

demo: venv
	$(PY) -m probsft_megatron.demo

clean:
	rm -rf .venv outputs runs
