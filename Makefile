# Entry points for a fresh machine: `make demo`, `make test` and `make lint`.
# Each creates .venv and installs the package into it first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision are installed first so a local wheel cache or index pin can be chosen here.
TORCH_PACKAGES ?= torch torchvision
EXTRAS ?= vision,timm,llm,deepspeed,peft,test,lint

.PHONY: install demo test bench bench-kernel gpu-check lint docs docs-serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# the `robust` extra: torchattacks pins requests~=2.25 (an old pin it does not import); skip its deps
	$(PY) -m pip install -q --no-deps "torchattacks>=3.5"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dkl demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/adv_step.py --widen 1 --reps 3

bench-kernel: install
	$(PY) benchmarks/kernel_speed.py

# one CUDA GPU, under 8 minutes: correctness, kernel speed and training steps in one report
gpu-check: install
	$(PY) benchmarks/gpu_check.py

# the documentation site (mkdocs.yml, docs/), built with --strict into site/, then checked to load
# nothing from another host (MathJax is bundled) and to resolve every link under its sub-path
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	$(PY) docs/_hooks/check_site.py site

docs-serve: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# the import-layer contract is [tool.importlinter] in pyproject.toml
lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
