# Two commands: `make demo` and `make test`. Both set up the virtual environment first (CPU-only torch, pinned).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[test,data,batch]"
	# nnU-Net's network definitions for the weight-compatibility test; without its timm/torchvision dependencies
	# (not needed by ResidualEncoderUNet, and a PyPI torchvision does not match the CPU torch build)
	$(PY) -m pip install -q --no-deps "dynamic-network-architectures==0.4.4"
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(VENV)/bin/petworkbench demo --out out/demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q Testing
	$(PY) -m pytest -q Testing/gui

bench: venv
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) out .pytest_cache
