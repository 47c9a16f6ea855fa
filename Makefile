PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install demo classify lint test test-fast clean

# The main job on the three bundled generators: every method at ratio 0.5, the default and the "fast" preset,
# tomesd on the UNet; sized to finish in about fifteen minutes on 2 CPU cores.
DEMO_ARGS ?= --ratios 0 0.5 --presets default fast --num-images 128 --steps 20

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first, pinned, so no dependency can pull another build (and its CUDA packages).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,eval,peers]"
	touch $@

install: $(VENV)/.installed

SWEEP := $(BIN)/python -m eval.sweep
METHODS := tome tofu mctf todo

demo: install
	$(SWEEP) --model tiny-unet --methods $(METHODS) tomesd $(DEMO_ARGS) --out results/sweep_tiny-unet
	$(SWEEP) --model tiny-dit --methods $(METHODS) $(DEMO_ARGS) --out results/sweep_tiny-dit
	$(SWEEP) --model tiny-mmdit --methods $(METHODS) $(DEMO_ARGS) --out results/sweep_tiny-mmdit

classify: install
	$(BIN)/python -m eval.classify --model tiny-vit --out results/classify

lint: install
	$(BIN)/ruff check tofu_diffusion pipelines eval tests

test: lint
	$(BIN)/python -m pytest tests

# The fast lane while developing (about two minutes); CI runs everything.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" tests

clean:
	rm -rf $(VENV) results
