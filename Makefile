PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first, pinned, so no dependency can pull another build (and its CUDA packages).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m eval.demo

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) results
