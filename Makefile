# Two entry points: `make demo` (install, run the quickstart) and `make test` (install, run every test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision pinned as a pair: other torchvision builds do not import beside this torch.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ntdist run configs/quickstart.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) -m ntdist bench fusion --out runs/bench_fusion.csv

clean:
	rm -rf $(VENV) runs .pytest_cache
