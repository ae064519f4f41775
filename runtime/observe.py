"""Watching a pipeline run: one stopwatch for its stages, and the observers it tells.

An observer is any object with `stage(name, seconds)`, `feeds(graph, feeds)` or both; a method it
lacks is not called. The runtime's Pipeline and the PyTorch reference time their stages with the
same Stopwatch under the same names, so a bench reads both the same way; a Stopwatch is itself an
observer, so a tool can hang one on a pipeline and take its sums after each run.

Torch-free (vsal.export imports it for the reference).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import numpy as np

Feeds = Mapping[str, np.ndarray]


class Observer(Protocol):
    """What a pipeline tells (both methods are optional)."""

    def stage(self, name: str, seconds: float) -> None:
        """One piece of a stage ran for `seconds` (a stage in pieces is told once per piece)."""

    def feeds(self, graph: str, feeds: Feeds) -> None:
        """`graph` is about to run on `feeds` (the decoder's steps are not told)."""


def check_observer(observer: object) -> object:
    """The observer, or a TypeError when it has neither method (a mistake in the caller's code)."""
    if not callable(getattr(observer, "stage", None)) and not callable(getattr(observer, "feeds", None)):
        raise TypeError(
            f"{observer!r} is not an observer: give it a stage(name, seconds) or feeds(graph, feeds)"
        )
    return observer


def tell_feeds(observers: Iterable[object], graph: str, feeds: Feeds) -> None:
    for observer in observers:
        tap = getattr(observer, "feeds", None)
        if tap is not None:
            tap(graph, feeds)


class FeedTap:
    """An observer of feeds alone, from a function `fn(graph, feeds)` (Pipeline.observe_feeds)."""

    def __init__(self, fn):
        self.feeds = fn


class Stopwatch:
    """Seconds per stage, summed over its pieces, each piece told to the observers.

        watch = Stopwatch(observers)
        with watch("vision_encoder"):   # once per chunk of frames: the sum is the stage's time
            ...
        watch.seconds  # {"vision_encoder": 0.12, ...} in the order the stages first ran

    `seconds` may be a dict to add into (an answer's timings).
    """

    def __init__(self, observers: Iterable[object] = (), seconds: dict[str, float] | None = None):
        self.observers = tuple(observers)
        self.seconds = {} if seconds is None else seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage(name, time.perf_counter() - start)

    def stage(self, name: str, seconds: float) -> None:
        """Add a piece timed elsewhere (and, as an observer, one another stopwatch timed)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        for observer in self.observers:
            told = getattr(observer, "stage", None)
            if told is not None:
                told(name, seconds)

    def take(self) -> dict[str, float]:
        """The sums so far, starting afresh (a bench's run by run)."""
        seconds, self.seconds = self.seconds, {}
        return seconds
