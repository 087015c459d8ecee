# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch that lies on disk on these machines; a CUDA user keeps the torch they have
# (see README, "Installing on a GPU machine").
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c "import torch,sys,shutil; sys.exit('a CUDA build of torch was installed on a machine without a GPU' if torch.version.cuda and not shutil.which('nvidia-smi') else 0)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/medsemi demo

test: venv
	cd $(CURDIR) && $(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --timeout 600

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
