"""peft's generic tuner suite (`PeftCommonTester`, fetched for the installed peft, see `peft_upstream.py`) run against
ReFT, as peft runs it against every tuner it ships (`tests/test_decoder_models.py` of peft).

Adapted as little as needed: the model ids are folders of tiny models built here from configs (no hub), and
`init_weights=False` is set where peft's decoder tests set it, and the two mixed-adapter-batch tests, which peft
runs only for the tuners it lists, count ReFT among them. The cases that end in an error by design are listed in
`EXPECTED` with the error they must raise: merges (position-dependent edits have no merged weights) and, for
adapters with prompt positions, training-mode forward passes without labels. Every other case must pass.
"""

import peft_upstream
import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from peft_reft import ReftConfig

HARNESS, MISSING = peft_upstream.load()  # fetched by `make install`; None and pip's message when it could not be
PeftCommonTester = HARNESS.PeftCommonTester if HARNESS is not None else object

CONFIGS = {
    "defaults": {},
    # every token, no head: peft's training cases (no labels, a loss on the logits) run and pass
    "noreft-mlp-all": {"intervention": "noreft", "component": "mlp_output", "positions": "all"},
    "nodireft-attention-all": {"intervention": "nodireft", "component": "attention_output", "positions": "all",
                               "modules_to_save": ["lm_head"]},
    "untied-f1+l1-tokens": {"positions": "f1+l1", "share_weights": False, "trainable_token_indices": [0, 1, 2]},
}
ARCHITECTURES = ["llama", "qwen2", "gpt2"]
# name -> (peft's method, extra arguments, whether peft's decoder tests make the adapter non-identity first)
METHODS = {
    "model_attr": ("_test_model_attr", {}, False),
    "adapter_name": ("_test_adapter_name", {}, False),
    "add_adapter_no_autocast_adapter_dtype_fp16": ("_test_add_adapter_no_autocast_adapter_dtype",
                                                   {"dtype": torch.float16}, False),
    "add_adapter_no_autocast_adapter_dtype_bf16": ("_test_add_adapter_no_autocast_adapter_dtype",
                                                   {"dtype": torch.bfloat16}, False),
    "prepare_for_training": ("_test_prepare_for_training", {}, False),
    "save_pretrained": ("_test_save_pretrained", {}, True),
    "save_pretrained_pickle": ("_test_save_pretrained", {"safe_serialization": False}, True),
    "save_pretrained_selected_adapters": ("_test_save_pretrained_selected_adapters", {}, True),
    "save_pretrained_selected_adapters_pickle": ("_test_save_pretrained_selected_adapters",
                                                 {"safe_serialization": False}, True),
    "save_pretrained_adapter_name_substring": ("_test_save_pretrained_adapter_name_substring", {}, False),
    "from_pretrained_config_construction": ("_test_from_pretrained_config_construction", {}, False),
    "load_model_low_cpu_mem_usage": ("_test_load_model_low_cpu_mem_usage", {}, False),
    "load_multiple_adapters": ("_test_load_multiple_adapters", {}, False),
    "merge_layers": ("_test_merge_layers", {}, True),
    "merge_layers_multi": ("_test_merge_layers_multi", {}, True),
    "merge_layers_nan": ("_test_merge_layers_nan", {}, True),
    "merge_layers_fp16": ("_test_merge_layers_fp16", {}, False),
    "merge_layers_is_idempotent": ("_test_merge_layers_is_idempotent", {}, False),
    "safe_merge": ("_test_safe_merge", {}, False),
    "mixed_adapter_batches": ("_test_mixed_adapter_batches", {}, True),
    "generate_with_mixed_adapter_batches_and_beam_search": (
        "_test_generate_with_mixed_adapter_batches_and_beam_search", {}, True),
    "generate": ("_test_generate", {}, False),
    "generate_pos_args": ("_test_generate_pos_args", {"raises_err": False}, False),
    "generate_half_prec": ("_test_generate_half_prec", {}, False),
    "training": ("_test_training", {}, False),
    "training_layer_indexing": ("_test_training_layer_indexing", {}, False),
    "training_gradient_checkpointing_reentrant": ("_test_training_gradient_checkpointing", {"use_reentrant": True},
                                                  False),
    "training_gradient_checkpointing": ("_test_training_gradient_checkpointing", {"use_reentrant": False}, False),
    "inference_safetensors": ("_test_inference_safetensors", {}, False),
    "peft_model_device_map": ("_test_peft_model_device_map", {}, False),
    "delete_adapter": ("_test_delete_adapter", {}, False),
    "delete_inactive_adapter": ("_test_delete_inactive_adapter", {}, False),
    "delete_unknown_adapter_raises": ("_test_delete_unknown_adapter_raises", {}, False),
    "unload_adapter": ("_test_unload_adapter", {}, True),
    "disable_adapter": ("_test_disable_adapter", {}, True),
    "passing_input_embeds_works": ("_test_passing_input_embeds_works", {"test_name": ""}, False),
    "get_base_model_state_dict": ("_test_get_base_model_state_dict", {}, False),
}
MIXED_BATCHES = ("mixed_adapter_batches", "generate_with_mixed_adapter_batches_and_beam_search")
MERGES = ("merge_layers", "merge_layers_multi", "merge_layers_nan", "merge_layers_fp16", "merge_layers_is_idempotent",
          "safe_merge")
# peft's training checks call the model in training mode without labels (loss = logits.sum())
UNLABELLED_TRAINING = ("training", "training_layer_indexing", "training_gradient_checkpointing_reentrant",
                       "training_gradient_checkpointing", "inference_safetensors", "unload_adapter",
                       "passing_input_embeds_works")
PROMPT_POSITION_CONFIGS = ("defaults", "untied-f1+l1-tokens")
HEAD_GETS_A_GRADIENT = "assert param.grad is None"  # the statement of peft's harness that fails, with no message
# (method, config) -> the error expected instead of a pass (type, and a regex on its message or, for peft's bare
# `assert`, the failing statement), and why. Every other case must pass.
EXPECTED = {
    **{(name, config): (ValueError, r"^ReFT adapters cannot be merged into the base model: the edit depends on the "
                                    r"token position")  # no weight change reproduces a position-dependent edit
       for name in MERGES for config in CONFIGS},
    **{(name, config): (ValueError, r"^ReFT adapter\(s\) \[.*\] edit prompt positions, but this training forward "
                                    r"pass has neither `labels`")  # the prompt cannot be told: refused, not guessed
       for name in UNLABELLED_TRAINING for config in PROMPT_POSITION_CONFIGS},
    # peft's harness asserts that no parameter but the tuner's own gets a gradient; a `modules_to_save` copy of the
    # head (which LoRA would train the same way) does
    **{(name, "nodireft-attention-all"): (AssertionError, HEAD_GETS_A_GRADIENT)
       for name in ("training_gradient_checkpointing_reentrant", "training_gradient_checkpointing")},
}


def test_peft_harness_is_there():
    """Fails with pip's own message where peft's harness could not be fetched (no package index at `make install`);
    the other cases of this module then do not run."""
    assert HARNESS is not None, MISSING


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved tiny model per architecture: the "model ids" peft's harness loads with from_pretrained. The folder
    names do not name the architecture: peft skips every non-LoRA method on model ids containing "gpt2" (GPT-2's
    Conv1D layers), which ReFT does not touch."""
    dirs = {}
    for index, arch in enumerate(ARCHITECTURES):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny-decoder-{index}")
        AutoModelForCausalLM.from_config(tiny_config(arch, initializer_range=0.02)).save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.mark.skipif(HARNESS is None, reason="peft's harness is missing: see test_peft_harness_is_there")
class TestPeftCommon(PeftCommonTester):
    transformers_class = AutoModelForCausalLM

    def prepare_inputs_for_testing(self):  # the inputs of peft's decoder tests (a hole in the second mask)
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @pytest.mark.filterwarnings("ignore:ReFT. positions=")  # the last layer's dead first window (untied config)
    @pytest.mark.parametrize("config_name", list(CONFIGS))
    @pytest.mark.parametrize("arch", ARCHITECTURES)
    @pytest.mark.parametrize("name", list(METHODS))
    def test_peft_common(self, model_dirs, name, arch, config_name, monkeypatch):
        method, extra, non_identity = METHODS[name]
        if name in MIXED_BATCHES:  # peft runs these for the tuners it knows support `adapter_names`: ReFT does too
            monkeypatch.setattr(HARNESS, "LoraConfig", ReftConfig)
        config_kwargs = {"task_type": "CAUSAL_LM", **CONFIGS[config_name]}
        if non_identity or name in MERGES:  # a refused merge must be reached: peft checks the adapter changes logits
            config_kwargs["init_weights"] = False
        run = getattr(self, method)
        args = (model_dirs[arch], ReftConfig, config_kwargs)
        if "test_name" in extra:
            call = lambda: run(extra["test_name"], *args)  # noqa: E731
        else:
            call = lambda: run(*args, **extra)  # noqa: E731
        expected = EXPECTED.get((name, config_name))
        if expected is None:
            call()
        elif expected[0] is AssertionError:  # a bare assert: the statement and the parameter it was about
            with pytest.raises(AssertionError) as failure:
                call()
            where = failure.traceback[-1]
            assert str(where.statement).strip() == expected[1]
            assert ".modules_to_save." in where.frame.f_locals["n"]
        else:
            with pytest.raises(expected[0], match=expected[1]):
                call()
