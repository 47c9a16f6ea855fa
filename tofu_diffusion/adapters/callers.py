"""A value per calling thread: the per-call state of every hook, so concurrent calls never see each other's."""

from __future__ import annotations

import threading


class PerCaller:
    """A value per calling thread, so concurrent calls of one model never see each other's state.

    Values live in thread-local storage, so a thread's state goes when the thread ends (a server that runs
    each request on its own thread keeps nothing of finished requests). A thread that set none of its own
    (autograd's backward threads recomputing a checkpointed block on a GPU) reads the latest value any caller
    set. ``torch.compile`` traces thread-local storage, so compiled code, code that runs eagerly around it
    (regional compilation's root, a frame past the recompile limit) and plain calls share one slot per thread.
    """

    def __init__(self):
        self._local = threading.local()
        self.latest = None

    def own(self):
        """The calling thread's value, or None."""
        return getattr(self._local, "value", None)

    def get(self):
        """The calling thread's value, else the latest of any caller (None before the first)."""
        value = self.own()
        return self.latest if value is None else value

    def set(self, value):
        self._local.value = value
        self.latest = value
        return value

    def reset(self) -> None:
        """Forget every caller's value."""
        self._local = threading.local()
        self.latest = None

    def __deepcopy__(self, memo):
        # Per-call state belongs to the calls of this model; a copy of the model starts with none.
        return PerCaller()
