# Two commands do everything on a fresh machine: `make demo` and `make test` (both install first).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Running as root (containers, CI): Open MPI refuses without these.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: install demo demo-tf demo-bert lint check test test-bench test-cluster test-all test-acceptance test-unit test-latest lock clean container-check

install:
	@bash scripts/install.sh

# Ctrl-C on a demo's horovodrun: the ranks get this many seconds (twice) to agree, save and exit (Open MPI: 1 s).
# Not for the tests: mpirun waits out both stages whenever it ends a job, after a failed rank too.
demo demo-tf demo-bert: export OMPI_MCA_odls_base_sigkill_timeout ?= 20

# ResNet-18 on the built-in shapes dataset, 2 ranks, Horovod ring-allreduce; prints top-1 accuracy.
demo: install
	horovodrun -np $(NP) python -m hpctrain.resnet --config configs/demo.toml --new-run $(ARGS)

# The same ResNet-18 demo on the TensorFlow engine (Keras 3 model from keras-hub, Horovod).
demo-tf: install
	horovodrun -np $(NP) python -m hpctrain.resnet --framework tf --config configs/demo.toml --run-dir runs/demo-tf --new-run $(ARGS)

# Tiny BERT MLM on the built-in corpus (stdlib docstrings, prepared once into runs/corpus-builtin), 2 ranks.
demo-bert: install
	horovodrun -np $(NP) python -m hpctrain.bert --config configs/bert_tiny.toml --new-run $(ARGS)

# The lint gate: ruff (rules in pyproject.toml) and the import contracts (import-linter: the framework-free
# core, the layers, the engines' independence, no cycles). Any finding fails.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Lint + the unit tier (tests/unit, one process each, about a minute): before every commit.
check: lint
	$(PY) -m pytest -ra -m unit tests/unit $(PYTEST_ARGS)

# The tiers that need more than a workstation: infrastructure stood up first (root: a Slurm test cluster,
# emulated hosts with their own network, container roots) or a large node's memory (bigmem: ~16 GiB free).
CLUSTER_TIERS := slurm or container or network or bigmem

# The everyday suite: lint, then the unit and multi-rank (mpi, tf) tiers.
test: lint
	$(PY) -m pytest -ra -m "not acceptance and not benchmark and not ($(CLUSTER_TIERS))" tests $(PYTEST_ARGS)

# Each benchmark script at tiny sizes (tests/benchmarks; a few minutes): its own tier, so `make test` stays
# within its time budget on a 2-core machine.
test-bench: lint
	$(PY) -m pytest -ra -m "benchmark and not ($(CLUSTER_TIERS))" tests $(PYTEST_ARGS)

test-cluster: lint
	$(PY) -m pytest -ra -m "$(CLUSTER_TIERS)" tests $(PYTEST_ARGS)

# All three in one pytest run (CI runs the three above in turn, each timed: .ci/run).
test-all: lint
	$(PY) -m pytest -ra -m "not acceptance" tests $(PYTEST_ARGS)

# The full demo trainings to their accuracy targets (each synchronization strategy preempted, resumed, >= 85 %).
test-acceptance: install
	$(PY) -m pytest -ra -m acceptance tests $(PYTEST_ARGS)

test-unit: check

# containers/: parse both definitions, build the CPU one for real in a Debian 12 root (debootstrap + bubblewrap,
# installed when missing; cached in ~/.cache/hpctrain/container-roots), run its %test, train in it with mpirun
# and on a Slurm test cluster (preempt, requeue, resume). Also part of `make test`. Figures go to the JSON.
container-check: install
	HPCTRAIN_CONTAINER_RECORD=$(CURDIR)/benchmarks/results/container-build.json $(PY) -m pytest -ra tests/containers $(PYTEST_ARGS)

# Re-resolve the pins (requirements/base.in -> requirements/lock.txt); then `make test` before committing.
lock:
	bash scripts/lock.sh

# Not in CI: the same suite in a separate venv with the newest releases of requirements/base.in, so the
# day a pin can move (or a user's newer stack breaks us) is found here first.
test-latest:
	HPCTRAIN_VENV=$(CURDIR)/.venv-latest HPCTRAIN_DEPS=latest bash scripts/install.sh
	PATH=$(CURDIR)/.venv-latest/bin:$$PATH .venv-latest/bin/python -m pytest -ra tests $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
