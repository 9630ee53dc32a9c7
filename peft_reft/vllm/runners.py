"""Where the vLLM integration meets vLLM's model runners: which request each row of a step is, and the step's edits
bound around the model's forward pass.

The model's layers only see flattened tokens; which request a row is, its adapter, its prompt length and how far it
has come live in the runner. Both of vLLM's runners are read, each where it keeps them, and hand the same four
sequences to the package's plan (`peft_reft.vllm.plan.step_edits`):

- V1 (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, and the CPU runner built on it; vLLM 0.32-0.33): its persistent
  input batch, read when `_model_forward` runs; the edits are bound around that call.
- V2 (`vllm.v1.worker.gpu.model_runner.GPUModelRunner`, the default on GPUs, the only runner of vLLM 0.34): the
  requests' adapters and prompt lengths are kept as `add_requests` receives them (dropped with `_remove_request`),
  the rows of a step are read from the `InputBatch` that `prepare_inputs` returns, and the edits hold for the rest of
  that `execute_model` call, which runs the forward pass. A prompt token's absolute position is the number of prefill
  tokens already computed (after a preemption the prefill holds the prompt and the tokens generated before it, so
  the position still counts from the prompt's start); rows past their prefill can only be edited by `"all"`
  adapters, whose rule does not depend on the position.

The start-up check (`peft_reft.vllm.proof`) proves, through whichever runner an engine uses, that the edits arrive
where they should.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .edits import running_step, set_step, step_scope
from .plan import StepEdits, step_edits

# V2 runner -> {request id: (adapter uid or None, prompt length)}
_V2_REQUESTS: "weakref.WeakKeyDictionary[Any, dict[str, tuple[Optional[str], int]]]" = weakref.WeakKeyDictionary()


def _plan(served: Any, uids: Sequence[Optional[str]], query_start: np.ndarray, computed: np.ndarray,
          prompt_lengths: np.ndarray, device: Any, in_use: Iterable[Optional[str]]) -> StepEdits:
    for uid in uids:
        if uid is not None and uid not in served.adapters:  # the front end has checked; a bypass stops here
            raise ValueError(f"ReFT adapter {uid!r} is not served by this engine's workers (they hold "
                             f"{sorted(served.adapters)}).")
    edits = step_edits(served.adapters, uids, query_start, computed, prompt_lengths, device=device) \
        if any(uid is not None for uid in uids) else {}
    if served.retired:
        served.drop_retired(in_use)
    return edits


def v1_model_forward(original, self, *args, **kwargs):
    """V1 `GPUModelRunner._model_forward`: the forward pass, with its step's edits."""
    from .plugin import request_uid, served_model

    served = served_model(self)
    if served is None or not (served.adapters or served.retired):
        return original(self, *args, **kwargs)
    batch = self.input_batch
    num_reqs = batch.num_reqs
    uids = [request_uid(self.requests[req_id].sampling_params) for req_id in batch.req_ids[:num_reqs]]
    edits = _plan(served, uids, self.query_start_loc.np[: num_reqs + 1], batch.num_computed_tokens_cpu[:num_reqs],
                  batch.num_prompt_tokens[:num_reqs], self.device,
                  (request_uid(state.sampling_params) for state in self.requests.values()))
    with running_step(served.layer_edits, edits):
        return original(self, *args, **kwargs)


def v2_add_requests(original, self, scheduler_output, *args, **kwargs):
    """V2 `GPUModelRunner.add_requests`: keep each new request's adapter and prompt length."""
    from .plugin import request_uid

    result = original(self, scheduler_output, *args, **kwargs)
    requests = _V2_REQUESTS.setdefault(self, {})
    for new in scheduler_output.scheduled_new_reqs:
        requests[new.req_id] = (request_uid(new.sampling_params), int(new.prompt_len))
    return result


def v2_remove_request(original, self, req_id, *args, **kwargs):
    """V2 `GPUModelRunner._remove_request`: forget the request."""
    _V2_REQUESTS.get(self, {}).pop(req_id, None)
    return original(self, req_id, *args, **kwargs)


def v2_execute_model(original, self, *args, **kwargs):
    """V2 `GPUModelRunner.execute_model`: the edits that `prepare_inputs` plans hold until the call returns."""
    with step_scope():
        return original(self, *args, **kwargs)


def v2_prepare_inputs(original, self, *args, **kwargs):
    """V2 `GPUModelRunner.prepare_inputs`: plan the step's edits from the rows of the batch it returns."""
    from .plugin import served_model

    batch = original(self, *args, **kwargs)
    served = served_model(self)
    if served is None or not (served.adapters or served.retired):
        return batch
    requests = _V2_REQUESTS.get(self, {})
    num_reqs = batch.num_reqs
    rows = [requests.get(req_id, (None, 0)) for req_id in batch.req_ids[:num_reqs]]
    prompt_lengths = np.array([length for _, length in rows], dtype=np.int64)
    prefilling = np.asarray(batch.is_prefilling_np[:num_reqs], dtype=bool)
    computed = np.where(prefilling, batch.num_computed_prefill_tokens_np[:num_reqs],
                        np.maximum(batch.num_computed_tokens_np[:num_reqs], prompt_lengths))
    edits = _plan(served, [uid for uid, _ in rows], batch.query_start_loc_np[: num_reqs + 1], computed,
                  prompt_lengths, self.device, (uid for uid, _ in requests.values()))
    set_step(served.layer_edits, edits)
    return batch


# (module, class, method, wrapper): the runner methods the integration wraps
V1_HOOKS = [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward", v1_model_forward)]
V2_HOOKS = [("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", name, wrapper) for name, wrapper in [
    ("add_requests", v2_add_requests), ("_remove_request", v2_remove_request),
    ("execute_model", v2_execute_model), ("prepare_inputs", v2_prepare_inputs)]]
