"""ReFT adapters as models of vLLM's OpenAI-compatible server, as LoRA adapters are.

- `/v1/models` lists each served ReFT adapter (its folder as `root`, the base model as `parent`);
- a request names an adapter in `model` (completions, chat completions, responses; streaming or not), or in
  `vllm_xargs` as before; an unknown name is a 404 that lists the served names;
- `POST /v1/load_lora_adapter` with a ReFT folder (a saved adapter whose config says `peft_type: REFT`) loads it into
  the running engine, checked as at start-up; `POST /v1/unload_lora_adapter` removes it. The endpoints, and the
  switch that enables them (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), are vLLM's own; LoRA folders still go to LoRA.
- requests whose path drops per-request arguments (beam search) are refused when they name a ReFT adapter.

The names live in the engine front end's table (`peft_reft.vllm.plugin.FrontEnd`), shared with the offline engine's
checks; workers get adapters through `collective_rpc` (`peft_reft.vllm.worker.WorkerMethods`).
"""

from __future__ import annotations

import contextvars
import uuid
from http import HTTPStatus
from typing import Any, Optional

from .adapters import MAX_ADAPTERS_KEY, REQUEST_KEY, check_fits, is_reft_folder, read_adapter

# the ReFT adapter the request in progress names in `model` (set by `_check_model`, read when vLLM names the model
# in its answer); a context variable: each HTTP request runs in its own asyncio task
_REQUESTED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("peft_reft_requested_adapter", default=None)


def _front_end(models: Any):
    from .plugin import front_end

    processor = getattr(models, "input_processor", None)
    return front_end(processor) if processor is not None else None


def _error(message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: Optional[str] = None):
    from vllm.entrypoints.serve import create_error_response

    err_type = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "BadRequestError"
    return create_error_response(message, err_type=err_type, status_code=status, param=param)


def _served_names(models: Any) -> list[str]:
    front = _front_end(models)
    return [*(m.name for m in models.base_model_paths), *getattr(models, "lora_requests", {}),
            *(front.names() if front is not None else [])]


async def check_model(original, self, request):
    """`BaseServing._check_model`: a ReFT adapter's name is a model; it travels to the engine in `vllm_xargs`."""
    _REQUESTED.set(None)
    front = _front_end(self.models)
    name = getattr(request, "model", None)
    adapter = front.get(name) if front is not None and name else None
    if adapter is None:
        error = await original(self, request)
        if error is not None and front is not None and error.error.code == HTTPStatus.NOT_FOUND:
            names = ", ".join(_served_names(self.models))
            return _error(f"The model `{name}` does not exist. Valid models: {names}.", HTTPStatus.NOT_FOUND, "model")
        if error is None and getattr(request, "use_beam_search", False) and _xargs_adapter(request) is not None:
            return _beam_search_refused(_xargs_adapter(request))
        return error
    if getattr(self, "request_logger", None) is not None and hasattr(self.request_logger, "log_request_body"):
        self.request_logger.log_request_body(request)
    named = _xargs_adapter(request)
    if named is not None and named != adapter.name:
        return _error(f"The request names the ReFT adapter {adapter.name!r} in `model` and {named!r} in "
                      f"`vllm_xargs.{REQUEST_KEY}`: name one.", param="vllm_xargs")
    if getattr(request, "use_beam_search", False):
        return _beam_search_refused(adapter.name)
    if hasattr(request, "vllm_xargs"):
        request.vllm_xargs = {**(request.vllm_xargs or {}), REQUEST_KEY: adapter.name}
    _REQUESTED.set(adapter.name)
    return None


def _xargs_adapter(request) -> Optional[str]:
    xargs = getattr(request, "vllm_xargs", None)
    return xargs.get(REQUEST_KEY) if isinstance(xargs, dict) else None


def _beam_search_refused(name: str):
    return _error(f"Beam search does not carry ReFT adapters (vLLM's beam search builds its own sampling parameters, "
                  f"without `extra_args`): the request for {name!r} would get the base model's beams. Sample with "
                  "`n` instead, or drop `use_beam_search`.", param="use_beam_search")


def maybe_get_adapters(original, self, request, *args, **kwargs):
    """`BaseServing._maybe_get_adapters`: a ReFT adapter's name is no LoRA request (None), not an unknown model."""
    front = _front_end(self.models)
    if front is not None and front.get(getattr(request, "model", None)) is not None:
        return None
    return original(self, request, *args, **kwargs)


def model_name(original, self, lora_request=None):
    """`OpenAIServingModels.model_name`: answers to a ReFT adapter's request name the adapter, as LoRA's do."""
    if lora_request is None and _REQUESTED.get() is not None:
        return _REQUESTED.get()
    return original(self, lora_request)


async def show_available_models(original, self):
    """`OpenAIServingModels.show_available_models`: the base model, LoRA adapters and ReFT adapters."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    listing = await original(self)
    front = _front_end(self)
    if front is not None:
        parent = self.base_model_paths[0].name
        listing.data.extend(ModelCard(id=a.name, root=a.path, parent=parent, permission=[ModelPermission()])
                            for a in front.adapters())
    return listing


async def load_lora_adapter(original, self, request, *args, **kwargs):
    """`OpenAIServingModels.load_lora_adapter`: a ReFT folder is loaded as a ReFT adapter, every other one as LoRA."""
    if not (request.lora_path and is_reft_folder(request.lora_path)):
        return await original(self, request, *args, **kwargs)
    name, path = request.lora_name, request.lora_path
    front = _front_end(self)
    if front is None:
        return _error(f"ReFT adapter {name!r}: this server was started without ReFT; start it with "
                      f"--additional-config '{{\"{MAX_ADAPTERS_KEY}\": 8}}' (or declared `reft_adapters`) to load "
                      "ReFT adapters at run time.")
    async with self.lora_resolver_lock[name]:
        if not name:
            return _error("Both 'lora_name' and 'lora_path' must be provided.")
        if self.is_base_model(name) or name in self.lora_requests:
            return _error(f"The ReFT adapter name {name!r} is already a served model (the base model or a LoRA "
                          "adapter): choose another name.")
        previous = front.get(name)
        if previous is not None and not request.load_inplace:
            return _error(f"The ReFT adapter {name!r} has already been loaded. To replace it, set 'load_inplace' "
                          "to true, or unload it first.")
        if previous is None and len(front.names()) >= front.limit:
            return _error(f"ReFT adapter {name!r}: the server holds {front.limit} ReFT adapters, its limit "
                          f"({MAX_ADAPTERS_KEY}); unload one, or start the server with a higher {MAX_ADAPTERS_KEY}.")
        try:
            adapter = read_adapter(name, path, uid=f"{name}@{uuid.uuid4().hex[:12]}")
            text = self.model_config.hf_config
            text = text.get_text_config() if hasattr(text, "get_text_config") else text
            check_fits(adapter, list(getattr(self.model_config.hf_config, "architectures", None) or []),
                       text.hidden_size, text.num_hidden_layers)
        except ValueError as error:
            return _error(str(error))
        try:
            await self.engine_client.collective_rpc("peft_reft_add_adapter", args=(name, adapter.path, adapter.uid))
        except Exception as error:  # the workers refused it: the engine serves on without it
            return _error(f"ReFT adapter {name!r} could not be loaded by the engine: {error}")
        front.add(adapter)
        if previous is not None:
            await self.engine_client.collective_rpc("peft_reft_retire_adapter", args=(previous.uid,))
        return f"Success: ReFT adapter '{name}' added successfully."


async def unload_lora_adapter(original, self, request, *args, **kwargs):
    """`OpenAIServingModels.unload_lora_adapter`: a ReFT adapter's name is unloaded as a ReFT adapter. Requests that
    already run keep it until they finish; new requests for the name get a 404."""
    front = _front_end(self)
    if front is None or front.get(request.lora_name) is None:
        return await original(self, request, *args, **kwargs)
    async with self.lora_resolver_lock[request.lora_name]:
        adapter = front.remove(request.lora_name)
        if adapter is not None:
            await self.engine_client.collective_rpc("peft_reft_retire_adapter", args=(adapter.uid,))
        return f"Success: ReFT adapter '{request.lora_name}' removed successfully."
