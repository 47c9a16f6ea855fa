PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install demo classify lint test test-fast clean

# The main job on the three bundled generators: every method at ratio 0.5, the default and the "fast" preset,
# tomesd on the UNet; results/index.html shows it all (tofu-diffusion demo --help for the sizes).
DEMO_ARGS ?=
CLI := $(BIN)/tofu-diffusion

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first, pinned, so no dependency can pull another build (and its CUDA packages).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,eval,peers]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(CLI) demo --out results $(DEMO_ARGS)

classify: install
	$(CLI) classify --model tiny-vit --out results/classify

lint: install
	$(BIN)/ruff check tofu_diffusion tests

test: lint
	$(BIN)/python -m pytest tests

# The fast lane while developing (about two minutes); CI runs everything.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" tests

clean:
	rm -rf $(VENV) results
