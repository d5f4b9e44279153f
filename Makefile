# The two commands of the README: `make demo` and `make test`. Both create .venv from the lock first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Succeeds when the interpreter $(1) runs and is Python 3.11. A .venv whose Python does not (removed
# since: a dangling link; or made by another Python) is created afresh, even with the stamp of an
# earlier install; `python -m venv` without --clear would keep its links as they are.
# A .venv without the stamp is one whose install never finished (interrupted in `python -m venv`,
# e.g. with no pip yet, or in pip): it is created afresh too, not reused as is. One with the stamp of
# an earlier install, older than the lock, is updated in place; its stamp goes first, so an update
# cut short is redone from scratch the next time.
IS_PY311 = $(1) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
VENV_OK := $(shell $(call IS_PY311,$(BIN)/python) && echo yes)
# pytest-xdist workers for make test: whole test modules go to one worker each (--dist loadscope), so
# the models and servers a module shares are built once. Three on CI's two cores: with two, the cores
# were busy only 59% of the time (1,700 s CPU in 1,444 s), the workers waiting on servers, kernels and
# probes; a third fills those waits. 0 runs in one process.
# Scopes go out in collection order (--no-loadscope-reorder), which tests/conftest.py sorts longest
# first (tests/scope_durations.json, `make test-durations`), so none is left running alone at the end.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

# Debian packages of the services tests run for real (Prometheus, with promtool, and Alertmanager for the monitoring
# tests; libb64-0d, a library the tritonclient wheel's perf_analyzer links). `make services` installs
# the missing ones when run as root (CI, these machines); elsewhere, or where apt-get fails (offline),
# it says what is missing and the tests that need them skip with that reason.
SERVICES_PACKAGES := prometheus prometheus-alertmanager chromium postgresql libb64-0d

.PHONY: demo test test-fast test-durations lint format venv lock clean bench ab-test feedback-loop services FORCE

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@echo ">>> creating $(VENV) from requirements.lock (one time, about 2 minutes)"
	@start=$$(date +%s); \
	  if $(call IS_PY311,$(BIN)/python) && [ -f $(STAMP) ]; then rm -f $(STAMP); \
	  else $(PYTHON) -m venv --clear $(VENV); fi && \
	  $(BIN)/python -m pip install -qq --disable-pip-version-check pip==24.2 && \
	  $(BIN)/python -m pip install -qq --disable-pip-version-check -r requirements.lock && \
	  $(BIN)/python -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e . && \
	  echo ">>> $(VENV) ready in $$(( $$(date +%s) - start ))s"
	@touch $(STAMP)

ifneq ($(VENV_OK),yes)
$(STAMP): FORCE
endif

demo: venv
	$(BIN)/python scripts/demo.py

test: lint services
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"

# make test, recording each scope's seconds in the file tests/conftest.py schedules by (longest first).
test-durations: lint services
	$(PYTEST) --record-scope-durations tests/scope_durations.json

# Packages only: the tests start their own processes on loopback and never use a system service
# (on a systemd host Debian starts one; docs/monitoring.md). No recommends (the node exporter).
services:
	@missing=""; for p in $(SERVICES_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">>> installing$$missing (Debian packages the tests use)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } || \
	    echo ">>> could not install$$missing (offline? no such package?); the tests that need them skip"; \
	else \
	  echo ">>> not installed:$$missing; install them as root (apt-get install$$missing); the tests that need them skip"; \
	fi

# ruff, configured in pyproject.toml: lint and formatting are checked first (a second or two).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The online loop: a simulated A/B test against the live server; the feedback-loop experiment.
ab-test: venv
	$(BIN)/python scripts/ab_test.py

feedback-loop: venv
	$(BIN)/python scripts/feedback_loop.py --generations 4 --users 2000

# Training benchmark: Merlin two-tower vs TensorFlow Recommenders (TFRS installed without its deps).
bench: venv
	$(BIN)/python -m pip install -qq --disable-pip-version-check --no-deps -r requirements-bench.txt
	$(BIN)/python -m benchmarks.benchmark_training

# Re-resolve requirements.in into the full lock (run after changing requirements.in).
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet pip==24.2 && build/lock-venv/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Full resolved environment for Python 3.11 (CPU). Generated by 'make lock' from requirements.in; do not edit by hand."; \
	  build/lock-venv/bin/python -m pip freeze --all --exclude-editable; } > requirements.lock
	rm -rf build/lock-venv

clean:
	rm -rf build data artifacts .pytest_cache
