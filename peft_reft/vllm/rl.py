"""TRL's RL trainers (GRPO, RLOO) generating through vLLM with a ReFT policy (`use_vllm=True`).

TRL moves a PEFT policy into its vLLM engine by merging the adapter into the base weights and pushing every tensor
(`VLLMGeneration.sync_weights`). ReFT's edits depend on token positions and cannot be merged, so for a ReFT policy
`VLLMGeneration` is changed in three places, through the package's vLLM integration:

- the engine (`_init_vllm`) starts serving the policy as a ReFT adapter, named `POLICY`, from a copy of the adapter
  saved when the trainer is built (same position rule, same interventions as `PeftModel.generate`), in the policy's
  dtype where TRL leaves vLLM to choose (vLLM's "auto" runs a float32 checkpoint in half precision);
- every generation request names that adapter (`generation_kwargs["extra_args"]`, which TRL passes to
  `SamplingParams`);
- a weight sync (`sync_weights`, after each optimizer step) writes the policy's intervention tensors into the
  engine's copy, in place (kilobytes: no merge, no base weight moves; under DeepSpeed ZeRO-3 the tensors are gathered
  as TRL gathers parameters), then empties the prefix cache, so that no KV computed under older edits is reused.

What cannot be made right is refused when the trainer is built, naming the setting: `vllm_mode="server"` (TRL's
server receives merged base weights only), `vllm_enable_sleep_mode=True` (a sleeping engine drops the base weights,
which a ReFT sync does not push again), and adapters the vLLM integration does not serve (a LoRA part, ...).
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any, Optional

import torch

from ..call_state import CallState
from .adapters import REQUEST_KEY, read_adapter, served_key

POLICY = "policy"  # the policy's name in the engine
# the policy adapter's folder and the policy's dtype while TRL builds its engine (read by the plugin when the engine's
# config is built)
POLICY_ENGINE: CallState[tuple[str, torch.dtype]] = CallState("reft_vllm_policy_engine")


def reft_policy(model: Any) -> Optional[str]:
    """The active adapter's name if `model` is a PeftModel whose active adapter is a ReFT adapter, else None."""
    from ..config import ReftConfig

    config = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(config, dict) and isinstance(active, str) and isinstance(config.get(active), ReftConfig):
        return active
    return None


def generation_problem(generation: Any) -> Optional[str]:
    """Why TRL's vLLM generation `generation` (a `VLLMGeneration` being built) cannot serve its ReFT policy, or None."""
    if generation.mode != "colocate":
        return (f"use_vllm=True with vllm_mode={generation.mode!r} and a ReFT policy: TRL's vLLM server receives the "
                "policy as merged base weights, which a ReFT adapter cannot become. Use vllm_mode='colocate' (vLLM "
                "in the training process), or use_vllm=False.")
    if generation.enable_sleep_mode:
        return ("use_vllm=True with vllm_enable_sleep_mode=True and a ReFT policy: the sleeping engine drops the base "
                "model's weights, and a ReFT weight sync pushes the interventions only. Set "
                "vllm_enable_sleep_mode=False.")
    return None


def _init_vllm(original, self):
    name = reft_policy(self.model)
    if name is None:
        return original(self)
    problem = generation_problem(self)
    if problem:
        raise ValueError(problem)
    folder = tempfile.mkdtemp(prefix="peft_reft_policy_")
    self.model.save_pretrained(folder, selected_adapters=[name])
    saved = folder if name == "default" else f"{folder}/{name}"
    try:
        read_adapter(POLICY, saved)  # a policy the integration cannot serve stops here, saying why
    except ValueError as error:
        raise ValueError(f"use_vllm=True with this ReFT policy: {error} With use_vllm=False, generation goes through "
                         "PeftModel.generate, which applies every part of the adapter.") from None
    with POLICY_ENGINE.bound((saved, self.model.dtype)):
        original(self)
    extra = dict(self.generation_kwargs.get("extra_args") or {})
    extra[REQUEST_KEY] = POLICY
    self.generation_kwargs = {**self.generation_kwargs, "extra_args": extra}


def policy_state(model: Any, name: str) -> dict[str, torch.Tensor]:
    """The policy's intervention tensors, named as the engine names them (`layer.group.parameter`)."""
    from peft.utils import get_peft_model_state_dict

    return {served_key(key): value.detach() for key, value in
            get_peft_model_state_dict(model, adapter_name=name).items()}


def _sync_weights(original, self):
    name = reft_policy(self.model)
    if name is None:
        return original(self)
    params = [p for n, p in self.model.named_parameters() if ".reft_interventions." in n]
    with self._dist.gather_params(params):
        state = policy_state(self.model, name)
        self.llm.collective_rpc("peft_reft_update_adapter", args=(POLICY, state))
    self.llm.reset_prefix_cache()


def install(module: Any) -> None:
    """Wrap `VLLMGeneration` of `trl.generation.vllm_generation` (`module`) for ReFT policies; other policies are
    untouched."""
    cls = module.VLLMGeneration
    for method, wrapper in (("_init_vllm", _init_vllm), ("sync_weights", _sync_weights)):
        original = getattr(cls, method)
        if getattr(original, "_peft_reft_wrapped", False):
            continue
        setattr(cls, method, _method(wrapper, original))


def _method(wrapper, original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    method._peft_reft_wrapped = True
    return method
