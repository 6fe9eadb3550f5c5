"""Callbacks: functions an application asks the library to call at a point of its work.

Why: the command line has a policy for its own process (core/startup.py: the garbage collector rests until the model
is loaded), and the library must not know it. So the library only says *when* something happened (a model was
loaded, a decoding worker process started) through a :class:`Callbacks`, and the command line registers its policy
there; a Python caller that registers nothing gets nothing.
"""

from __future__ import annotations

from typing import Any, Callable


class Callbacks:
    """An ordered list of functions, all called with the same arguments when the event happens."""

    def __init__(self, event: str):
        self.event = event
        self._functions: list[Callable[..., Any]] = []

    def add(self, function: Callable[..., Any]) -> Callable[[], None]:
        """Call ``function`` at every event from now on; returns the function that removes it again."""
        self._functions.append(function)

        def remove() -> None:
            if function in self._functions:
                self._functions.remove(function)

        return remove

    def __call__(self, *args: Any) -> None:
        for function in list(self._functions):
            function(*args)

    def __repr__(self) -> str:
        return f"Callbacks({self.event!r}, {len(self._functions)} registered)"
