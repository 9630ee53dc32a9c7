"""The vLLM general plugin (entry point `vllm.general_plugins`: `peft_reft = "peft_reft.vllm.plugin:register"`).

vLLM loads it in each of its processes. It changes nothing unless the engine's `additional_config` declares ReFT
adapters (`{"reft_adapters": {name: folder}}`); then:

- front end, when the engine's config is built: every adapter is read and checked against the model (a bad one stops
  the engine before it starts, naming the adapter), compiled / CUDA-graph execution and the V2 model runner are
  switched off (with a message), and engine features the integration does not support are refused;
- front end, per request: the adapter named in `SamplingParams.extra_args["reft_adapter"]` (the server's
  `vllm_xargs`) must be declared, else that request fails with a message and the engine serves on;
- engine core: the prefix-cache hash of a block holds the ReFT edits made in it (`peft_reft.vllm.prefix_cache`);
- workers: after the model's weights are loaded, the adapters' interventions are hooked into its decoder layers
  (`peft_reft.vllm.edits`), and each forward pass of the model runner runs with the edits of its step
  (`peft_reft.vllm.plan`).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import Any, Optional

from .adapters import ADAPTERS_KEY, REQUEST_KEY, ServedAdapter, check_fits, declared_adapters, read_adapter

logger = logging.getLogger("peft_reft.vllm")

# adapter name -> adapter, for the engine this process serves (set from the engine's config in each process)
_SERVED: dict[str, ServedAdapter] = {}
# vLLM model -> the adapters hooked into it
_MODELS: "weakref.WeakKeyDictionary[Any, dict[str, ServedAdapter]]" = weakref.WeakKeyDictionary()
_REGISTERED = False


def served_adapters(vllm_config: Any) -> dict[str, ServedAdapter]:
    """Read and check the adapters that `vllm_config.additional_config` declares; they become this process's served
    adapters. {} if none are declared."""
    declared = declared_adapters(getattr(vllm_config, "additional_config", None))
    if not declared:
        return {}
    adapters = {name: read_adapter(name, path) for name, path in declared.items()}
    text = vllm_config.model_config.hf_config
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    for adapter in adapters.values():
        check_fits(adapter, list(getattr(vllm_config.model_config.hf_config, "architectures", None) or []),
                   text.hidden_size, text.num_hidden_layers)
    _SERVED.clear()
    _SERVED.update(adapters)
    return adapters


def check_engine(vllm_config: Any) -> None:
    """Refuse engine features with which ReFT edits would be skipped or misplaced."""
    names = sorted(_SERVED)
    problems = []
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or parallel.tensor_parallel_size > 1:
        problems.append("tensor or pipeline parallelism (serve with tensor_parallel_size=1, pipeline_parallel_size=1)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (drop speculative_config)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("a KV connector (kv_transfer_config): KV computed elsewhere holds no ReFT edits")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("the V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    compilation = vllm_config.compilation_config
    cudagraphs = getattr(compilation.cudagraph_mode, "value", compilation.cudagraph_mode)
    if compilation.mode != 0 or cudagraphs not in (0, None):
        problems.append("torch.compile / CUDA graphs (pass enforce_eager=True / --enforce-eager)")
    if problems:
        raise ValueError(
            f"ReFT adapters {names} cannot be served with {'; '.join(problems)}: the vLLM integration does not "
            "support it yet."
        )


def _create_engine_config(original, self, *args, **kwargs):
    if declared_adapters(self.additional_config):
        if not self.enforce_eager:
            logger.warning("ReFT adapters are served: enforce_eager switched on (the integration edits hidden states "
                           "from Python hooks, which compiled graphs and CUDA graphs would skip).")
            self.enforce_eager = True
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the engine's processes
            logger.warning("ReFT adapters are served: the V1 model runner is used (VLLM_USE_V2_MODEL_RUNNER=0).")
    vllm_config = original(self, *args, **kwargs)
    if served_adapters(vllm_config):
        check_engine(vllm_config)
        logger.warning("ReFT adapters served: %s", ", ".join(f"{a.name} ({a.path})" for a in _SERVED.values()))
    return vllm_config


def request_adapter(sampling_params: Any) -> Optional[str]:
    """The ReFT adapter a request names in `SamplingParams.extra_args`, or None (the base model)."""
    extra = getattr(sampling_params, "extra_args", None)
    return extra.get(REQUEST_KEY) if isinstance(extra, dict) else None


def check_request(sampling_params: Any, served: dict[str, Any]) -> None:
    """A ValueError if the request names an adapter that is not served (`served`: the served adapters by name)."""
    name = request_adapter(sampling_params)
    if name is not None and name not in served:
        available = sorted(served) or "none (declare them in additional_config['reft_adapters'])"
        raise ValueError(f"ReFT adapter {name!r} is not served; served adapters: {available}.")


def _validate_params(original, self, params, *args, **kwargs):
    result = original(self, params, *args, **kwargs)
    if request_adapter(params) is not None:
        from vllm.exceptions import VLLMValidationError

        declared = declared_adapters(getattr(self.vllm_config, "additional_config", None))  # this engine's names
        try:
            check_request(params, declared)
        except ValueError as error:  # a bad request (HTTP 400 from the server), and a ValueError offline
            raise type("UnknownReftAdapterError", (VLLMValidationError, ValueError), {})(
                str(error), parameter="vllm_xargs", value=request_adapter(params)) from None
    return result


def _load_model(original, self, vllm_config, model_config, *args, **kwargs):
    model = original(self, vllm_config, model_config, *args, **kwargs)
    adapters = served_adapters(vllm_config)
    if adapters:
        _attach(model, adapters, vllm_config)
    return model


def _attach(model: Any, adapters: dict[str, ServedAdapter], vllm_config: Any) -> None:
    import torch

    from .adapters import load_interventions
    from .edits import attach_edits

    text = vllm_config.model_config.hf_config
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers]
    if len(stacks) != 1:
        raise ValueError(
            f"ReFT: cannot find the decoder layers of {type(model).__name__} (found {len(stacks)} lists of "
            f"{text.num_hidden_layers} modules); this model is not supported by the vLLM integration."
        )
    device = next(model.parameters()).device
    served = {
        adapter.name: (adapter.config.component, load_interventions(adapter, text.hidden_size, device))
        for adapter in adapters.values()
    }
    attach_edits(stacks[0], served)
    _MODELS[model] = dict(adapters)


def _model_forward(original, self, *args, **kwargs):
    adapters = _MODELS.get(getattr(self, "model", None))
    if not adapters:
        return original(self, *args, **kwargs)
    from .edits import running_step
    from .plan import step_edits

    batch = self.input_batch
    num_reqs = batch.num_reqs
    row_adapters = []
    for req_id in batch.req_ids[:num_reqs]:
        sampling_params = self.requests[req_id].sampling_params
        check_request(sampling_params, adapters)  # the front end has checked; a request that bypassed it stops here
        row_adapters.append(request_adapter(sampling_params))
    edits = step_edits(adapters, row_adapters, self.query_start_loc.np[: num_reqs + 1],
                       batch.num_computed_tokens_cpu[:num_reqs], batch.num_prompt_tokens[:num_reqs],
                       device=self.device) if any(row_adapters) else {}
    with running_step(edits):
        return original(self, *args, **kwargs)


def _block_extra_keys(original, request, start_token_idx, end_token_idx, *args, **kwargs):
    keys, next_index = original(request, start_token_idx, end_token_idx, *args, **kwargs)
    name = request_adapter(getattr(request, "sampling_params", None))
    if name is None:
        return keys, next_index
    adapter = _SERVED.get(name)
    if adapter is None:  # the rule is unknown here: keep every block of this adapter and prompt length apart
        key = ("reft", name, "prompt", request.num_prompt_tokens)
    else:
        from .prefix_cache import block_extra_key

        key = block_extra_key(adapter, request.num_prompt_tokens, start_token_idx, end_token_idx)
    if key is None:
        return keys, next_index
    return (*(keys or ()), key), next_index


def _scheduler_init(original, self, vllm_config, *args, **kwargs):
    served_adapters(vllm_config)  # the engine-core process learns the adapters' position rules
    return original(self, vllm_config, *args, **kwargs)


def _wrap(owner: Any, name: str, wrapper) -> None:
    original = getattr(owner, name)
    if getattr(original, "_peft_reft_wrapped", False):
        return
    if isinstance(owner, type):
        wrapped = functools.wraps(original)(lambda self, *a, **k: wrapper(original, self, *a, **k))
    else:
        wrapped = functools.wraps(original)(lambda *a, **k: wrapper(original, *a, **k))
    wrapped._peft_reft_wrapped = True
    setattr(owner, name, wrapped)


def _wrap_hash_function(module: Any) -> None:
    _wrap(module, "generate_block_hash_extra_keys", _block_extra_keys)


def register() -> None:
    """Install the plugin's hooks into vLLM's classes (idempotent; does nothing visible until adapters are declared)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from ..autoload import after_import

    _wrap(EngineArgs, "create_engine_config", _create_engine_config)
    _wrap(BaseModelLoader, "load_model", _load_model)
    after_import("vllm.v1.engine.input_processor",
                 lambda module: _wrap(module.InputProcessor, "_validate_params", _validate_params))
    after_import("vllm.v1.worker.gpu_model_runner",
                 lambda module: _wrap(module.GPUModelRunner, "_model_forward", _model_forward))
    after_import("vllm.v1.core.sched.scheduler", lambda module: _wrap(module.Scheduler, "__init__", _scheduler_init))
    # the block hasher calls it through its module; two more modules import it by name (KV events, KV offloading)
    for module_name in ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        after_import(module_name, _wrap_hash_function)
    _REGISTERED = True


__all__ = ["ADAPTERS_KEY", "REQUEST_KEY", "register"]
