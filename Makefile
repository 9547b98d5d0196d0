# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and
# install what they need; nothing else has to be set up by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.estuary-installed
SRC    := estuary coordinator edge_client cloud_workers secure_agg simulation bench

.PHONY: test lint typecheck pytest extras extras-started deploy-smoke demo proto redis-server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU wheel on this machine's disk, so the project's range
# (torch>=2.4) is already satisfied and pip does not fetch several GB of CUDA packages.
# [flower] too: the suite runs in one environment with Flower (its protobuf<7 included),
# and the Flower simulation test needs flwr and Ray.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[sim,dev,flower]'
	touch $(STAMP)

# The contract and integration suites start their own redis-server; install the binary
# if it is missing (root on CI and dev machines; sudo otherwise).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

# lint-imports checks the floors (pyproject [tool.importlinter]): no role imports another,
# the core imports no role, secure_agg imports nothing of the project.
LINT      := $(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache
TYPECHECK := $(BIN)/mypy $(SRC)

lint: $(STAMP)
	$(LINT)

typecheck: $(STAMP)
	$(TYPECHECK)

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure, so
# an empty run can never pass as green. Two workers (pytest-xdist), each taking whole
# files (module fixtures such as the ONNX exports run once): much of the suite waits on
# real processes (Redis, coordinators, torchrun, Ray), so two workers finish it in about
# 8 minutes where one took 11 on a 2-core machine. The longest modules start first
# (tests/run_order.py; --no-loadscope-reorder keeps that order) so that neither worker
# ends the run alone on a long module. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

pytest: $(STAMP) redis-server
	$(PYTEST)

# Each role's extra alone, in its own fresh venv: installs, answers --help, imports all of
# its package, and the other roles' commands refuse cleanly (.ci/extras; about 3 minutes).
extras:
	.ci/extras $(PYTHON)

# deploy/docker/compose.yaml booted without a container engine: each service's command,
# environment and config as a local process on 127.0.0.1 (Redis, two coordinators with
# mutual TLS, the worker group, four agents enrolled by CSR), through version 2, a killed
# replica and version 3 (tests/deploy/smoke.py; about 3 minutes). The `base` service runs
# with 30 pretraining steps instead of its 300 (minutes of CPU), cached in
# runs/.cache/deploy-smoke/ after the first run.
SMOKE := $(BIN)/python tests/deploy/smoke.py --base-pretrain-steps 30 --base-cache runs/.cache

deploy-smoke: $(STAMP) redis-server
	$(SMOKE)

# During a run every core is busy (vmstat: 0 % idle through pytest), except while the
# project installs and ruff, mypy (about 2 minutes, one process) and lint-imports run: so
# the extras check (pip installing four fresh venvs from its own copy of the sources)
# starts first, in the background (extras-started), and runs beside them instead of beside
# pytest; `test` waits for its exit status at the end. Then pytest, then the deploy smoke.
# Every step runs even when one before it failed, so that one run shows every problem; the
# extras report and a line of each step's exit status come last, and any step failing
# fails the target. (Interrupted, `make test` leaves the extras check to finish alone; it
# writes only under .venv-extras/.)
EXTRAS := .venv-extras

extras-started:
	@mkdir -p $(EXTRAS) && rm -f $(EXTRAS)/exit
	@{ .ci/extras $(PYTHON) >$(EXTRAS)/report.log 2>&1; echo $$? >$(EXTRAS)/exit; } </dev/null & \
	  echo $$! >$(EXTRAS)/pid

test: extras-started $(STAMP) redis-server
	@echo '$(LINT)'; $(LINT); lint=$$?; \
	  echo '$(TYPECHECK)'; $(TYPECHECK); types=$$?; \
	  $(PYTEST); tests=$$?; \
	  $(SMOKE); smoke=$$?; \
	  while [ ! -f $(EXTRAS)/exit ] && kill -0 $$(cat $(EXTRAS)/pid) 2>/dev/null; do sleep 1; done; \
	  packaging=$$(cat $(EXTRAS)/exit 2>/dev/null || echo "killed before it ended"); \
	  echo "--- .ci/extras (each extra alone in a fresh venv; exit $$packaging)"; \
	  cat $(EXTRAS)/report.log; \
	  echo "--- make test: lint $$lint, typecheck $$types, pytest $$tests, deploy smoke $$smoke, extras $$packaging"; \
	  [ $$lint -eq 0 ] && [ $$types -eq 0 ] && [ $$tests -eq 0 ] && [ $$smoke -eq 0 ] && [ "$$packaging" = 0 ]

proto: $(STAMP)
	$(BIN)/python -m estuary.proto.generate

# The main job: a whole federation on this machine (in-memory state, loopback gRPC, secure
# aggregation), then local-only and centralized baselines; writes runs/<id>/.
demo: $(STAMP)
	$(BIN)/estuary simulate --config deploy/config/simulation.toml --baselines

clean:
	rm -rf $(VENV) .venv-extras .mypy_cache .ruff_cache .pytest_cache
