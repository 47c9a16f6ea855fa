PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install demo classify test clean

# The main job on the bundled model, sized to finish in a few minutes on 2 CPU cores.
DEMO_ARGS ?= --model tiny-unet --methods tome tofu mctf --ratios 0 0.25 0.5 0.75 --num-images 128 --steps 20 --out results/sweep

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
	$(BIN)/python -m eval.sweep $(DEMO_ARGS)

classify: install
	$(BIN)/python -m eval.classify --model tiny-vit --out results/classify

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) results
