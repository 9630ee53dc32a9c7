"""Per-call state: a value that holds for one call of the model, in the thread that makes the call.

ReFT hands what belongs to one call (its intervention positions, a mixed batch's adapter names, the `generate` call in
progress) to code that runs inside that call but is not given extra arguments: hooks on the attention / MLP
submodules that transformers' decoder layers call with the hidden states only. A `CallState` holds such a value for
the duration of a `with state.bound(value):` block, in the calling thread only, so concurrent calls from several
threads never see each other's values, and nothing is left behind on exit.

It is backed by `threading.local`, not `contextvars.ContextVar`: torch.compile (dynamo) traces the reads and writes of
a thread-local's attributes into the graph, so a compiled model has no graph break there; it cannot trace a
`ContextVar`. (A model call is synchronous, so per-thread is per-call.)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class CallState(Generic[T]):
    """A per-thread value, None outside a `bound` block."""

    def __init__(self, name: str):
        self.name = name
        self._local = threading.local()

    def get(self) -> Optional[T]:
        """The value of the enclosing `bound` block in this thread, or None."""
        return getattr(self._local, "value", None)

    def set(self, value: Optional[T]) -> None:
        """Replace the value for the rest of the enclosing `bound` block (restored when the block exits)."""
        self._local.value = value

    @contextlib.contextmanager
    def bound(self, value: Optional[T]) -> Iterator[Optional[T]]:
        """Make `value` this state's value inside the block, in this thread; the previous value comes back on exit."""
        previous = self.get()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = previous

    def __repr__(self) -> str:
        return f"CallState({self.name!r})"
