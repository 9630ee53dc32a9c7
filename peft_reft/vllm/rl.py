"""TRL's RL trainers (GRPO, RLOO) generating through vLLM with a ReFT policy (`use_vllm=True`).

TRL moves a PEFT policy into vLLM by merging the adapter into the base weights and pushing every tensor
(`VLLMGeneration.sync_weights`). ReFT's edits depend on token positions and cannot be merged, so for a ReFT policy
`VLLMGeneration` is changed in three places, through the package's vLLM integration (same position rule, same
interventions as `PeftModel.generate`):

- the engine serves the policy as a ReFT adapter named `POLICY`, from a copy of the adapter saved when the trainer is
  built. `vllm_mode="colocate"`: the engine TRL builds (`_init_vllm`) declares it, in the policy's dtype where TRL
  leaves vLLM to choose (vLLM's "auto" runs a float32 checkpoint in half precision). `vllm_mode="server"`: the
  trainer loads it into the running server through vLLM's runtime endpoint (`/v1/load_lora_adapter`, which the
  server's ReFT integration takes for a ReFT folder); TRL's NCCL weight-transfer group is not opened (nothing of the
  base model moves);
- every generation request names that adapter: `generation_kwargs["extra_args"]` (colocate: TRL passes it to
  `SamplingParams`) or `generation_kwargs["model"]` (server: TRL puts it in the request's body, as a LoRA user names
  an adapter);
- a weight sync (`sync_weights`, after each optimizer step) sends the policy's intervention tensors (kilobytes: no
  merge, no base weight moves; under DeepSpeed ZeRO-3 gathered as TRL gathers parameters): colocate writes them into
  the engine's copy in place; server writes them into the adapter's folder and loads it again (`load_inplace`: a new
  load, whose prefix-cache blocks are keyed apart from the old one's). Then the prefix cache is emptied, so that no KV
  computed under older edits is reused.

What cannot be made right is refused when the trainer is built, naming the setting: `vllm_enable_sleep_mode=True`
(a sleeping colocated engine drops the base weights, which a ReFT sync does not push again), FSDP (the sync reads
whole tensors; FSDP shards them), a server that cannot load the policy (the reason from the server, and what it needs),
and adapters the vLLM integration does not serve (a LoRA part, ...).
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Optional

import torch

from ..call_state import CallState
from .adapters import REQUEST_KEY, read_adapter, served_key

POLICY = "policy"  # the policy's name in the engine
# the policy adapter's folder and the policy's dtype while TRL builds its engine (read by the plugin when the engine's
# config is built)
POLICY_ENGINE: CallState[tuple[str, torch.dtype]] = CallState("reft_vllm_policy_engine")
# set while TRL connects to its server for a ReFT policy: the NCCL weight-transfer group is not opened
WITHOUT_WEIGHT_TRANSFER: CallState[bool] = CallState("reft_vllm_without_weight_transfer")


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
    if generation.mode == "colocate" and generation.enable_sleep_mode:
        return ("use_vllm=True with vllm_enable_sleep_mode=True and a ReFT policy: the sleeping engine drops the base "
                "model's weights, and a ReFT weight sync pushes the interventions only. Set "
                "vllm_enable_sleep_mode=False.")
    if generation._dist.is_fsdp:
        return ("use_vllm=True under FSDP with a ReFT policy: the weight sync sends whole intervention tensors, which "
                "FSDP shards. Train with DDP or DeepSpeed (ZeRO-3 included), or use_vllm=False.")
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
    self.peft_reft_policy_folder = saved
    if self.mode == "server":
        with WITHOUT_WEIGHT_TRANSFER.bound(True):
            original(self)
        if self.accelerator.is_main_process:
            load_policy(self.vllm_client, saved)
        self.generation_kwargs = {**self.generation_kwargs, "model": POLICY}
        return
    with POLICY_ENGINE.bound((saved, self.model.dtype)):
        original(self)
    extra = dict(self.generation_kwargs.get("extra_args") or {})
    extra[REQUEST_KEY] = POLICY
    self.generation_kwargs = {**self.generation_kwargs, "extra_args": extra}


def names_the_policy(generation: Any) -> bool:
    """Whether TRL's vLLM generation `generation` asks its engine for the ReFT policy (set up by `_init_vllm`)."""
    kwargs = getattr(generation, "generation_kwargs", None) or {}
    if getattr(generation, "mode", None) == "server":
        return kwargs.get("model") == POLICY
    return (kwargs.get("extra_args") or {}).get(REQUEST_KEY) == POLICY


def _init_communicator(original, self, *args, **kwargs):
    """`VLLMClient.init_communicator`: not for a ReFT policy, whose sync goes through the server's load endpoint."""
    if WITHOUT_WEIGHT_TRANSFER.get():
        return None
    return original(self, *args, **kwargs)


SERVER_NEEDS = ("peft-reft installed beside vLLM, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment, "
                "--additional-config '{\"max_reft_adapters\": 1}', and the trainer's temporary folders in reach "
                "(the same machine, or TMPDIR on a shared file system)")


def load_policy(client: Any, folder: str) -> None:
    """Load (or load again) the ReFT adapter saved in `folder` into the server behind TRL's `VLLMClient` `client`,
    as `POLICY`; a refusal raises, with the server's reason and what the server needs."""
    url = f"{client.base_url}/v1/load_lora_adapter"
    reply = client.session.post(url, json={"lora_name": POLICY, "lora_path": folder, "load_inplace": True})
    if reply.status_code == 200:
        return
    try:
        reason = reply.json()["error"]["message"]  # vLLM's error body
    except (ValueError, KeyError, TypeError):
        reason = reply.text.strip()[:500]
    raise RuntimeError(f"use_vllm=True, vllm_mode='server' with a ReFT policy: the vLLM server at {client.base_url} "
                       f"did not load the policy from {folder} (HTTP {reply.status_code}: {reason}). A server serves "
                       f"a ReFT policy with {SERVER_NEEDS}: see the README's GRPO-with-vLLM section.")


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
    server = self.mode == "server"
    with self._dist.gather_params(params):
        if server and self.accelerator.is_main_process:
            _write_adapter_weights(self.model, name, self.peft_reft_policy_folder)
            load_policy(self.vllm_client, self.peft_reft_policy_folder)
        elif not server:
            self.llm.collective_rpc("peft_reft_update_adapter", args=(POLICY, policy_state(self.model, name)))
    if not server:
        self.llm.reset_prefix_cache()
    elif self.accelerator.is_main_process:
        self.vllm_client.reset_prefix_cache()


def _write_adapter_weights(model: Any, name: str, folder: str) -> None:
    """Replace the weights file of the adapter saved in `folder` with `model`'s current tensors of adapter `name`
    (what `save_pretrained` writes; a reader never sees a half-written file)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {key: value.detach().to("cpu").contiguous()
             for key, value in get_peft_model_state_dict(model, adapter_name=name).items()}
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    save_file(state, path + ".partial", metadata={"format": "pt"})
    os.replace(path + ".partial", path)


def install(module: Any) -> None:
    """Wrap `VLLMGeneration` (and its `VLLMClient`) of `trl.generation.vllm_generation` (`module`) for ReFT policies;
    other policies are untouched."""
    for cls, method, wrapper in ((module.VLLMGeneration, "_init_vllm", _init_vllm),
                                 (module.VLLMGeneration, "sync_weights", _sync_weights),
                                 (module.VLLMClient, "init_communicator", _init_communicator)):
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
