# The two commands a fresh machine needs: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast bench clean

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m titan_world.demo $(DEMO_ARGS)

# System packages for the SLURM and browser tests (root + apt only; otherwise those tests skip with the reason).
# Formatting and lint (ruff, config in pyproject.toml); `make test` runs it first, so CI fails on either.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: install lint
	@bash scripts/install_system.sh || echo "[test] system packages not installed: SLURM/browser tests will skip"
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow and not slurm and not browser" $(PYTEST_ARGS)

# The benchmarks that mean something on any machine (tiny model, CPU); each prints its ratios
# against a baseline measured in the same run. GPU figures: benchmarks/gpu_session.sh.
bench: install
	$(PY) -m benchmarks.bench_data
	$(PY) -m benchmarks.bench_train
	$(PY) -m benchmarks.bench_serving --chunks 100
	$(PY) -m benchmarks.bench_decoder
	$(PY) -m benchmarks.serving_model

clean:
	rm -rf runs data_cache .pytest_cache
