"""`CallState` (peft_reft/call_state.py): a value bound for one block, per thread, restored on exit (errors included),
and traced by torch.compile without a graph break."""

import threading

import pytest
import torch

from peft_reft.call_state import CallState


def test_bound_values_nest_and_come_back_on_exit_and_on_error():
    state = CallState("test")
    assert state.get() is None
    with state.bound("outer"):
        with state.bound("inner") as value:
            assert value == "inner" and state.get() == "inner"
            state.set("replaced")
            assert state.get() == "replaced"
        assert state.get() == "outer"
        with pytest.raises(KeyError), state.bound("failing"):
            raise KeyError("in the block")
        assert state.get() == "outer"
    assert state.get() is None


def test_each_thread_sees_its_own_value():
    state = CallState("test")
    inside, seen = threading.Barrier(2), {}

    def work(name):
        with state.bound(name):
            inside.wait()  # both threads are inside their blocks at once ...
            seen[name] = state.get()
            inside.wait()  # ... until both have read

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"a": "a", "b": "b"} and state.get() is None


def test_dynamo_traces_a_bound_value_into_one_graph():
    state = CallState("test")

    def inner(x):
        return x * state.get()

    def outer(x, scale):
        with state.bound(scale):
            return inner(x) + 1

    x, scale = torch.randn(3), torch.tensor(2.0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(outer)(x, scale)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch.testing.assert_close(torch.compile(outer, fullgraph=True, backend="eager")(x, scale), x * 2 + 1)
    assert state.get() is None
