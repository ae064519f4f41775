"""What every backend is: a `Runner` of one graph, its feeds checked, its outputs named.

A runner loads one graph (an ONNX Runtime session, a TensorRT engine), names its inputs and outputs
and runs it. `Runner.run` checks the feeds against the manifest (names, dtypes, ranks, static sizes,
profile ranges, multiples) with `FeedChecker` and only then calls the backend's own `_run`, so no
backend wires the check by hand and a wrong input is one clear error instead of a failure deep in a
kernel; an input past the graph's profile (a prompt of 50,000 tokens) never reaches it. The check
reads shapes and dtypes only, cheap per token. Other ways of running a graph (a decoder step with
its cache on the device, a server's BLS call) pass through the same `FeedChecker.check`.

Outputs come back as numpy arrays (`run`), or stay where the backend ran them (`run_device`: each a
`DeviceTensor`, its dtype and shape known without a copy, `to_host()` when the host needs it).
Each runner hands the generator its own decoder step (`decoder_step`): by default the host round
trip of `GraphDecoderStep`; ONNX Runtime (IO binding) and TensorRT (device buffers) keep the KV
cache on the device. A runner is a context manager: `close()` frees what it holds on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from vsal.runtime.errors import VsalError
from vsal.runtime.generation import DecoderStep, GraphDecoderStep
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import GraphInfo, TensorInfo
from vsal.runtime.shapes import evaluate


class BackendError(VsalError):
    """A graph that cannot be loaded or run, or feeds that do not fit it."""


class Tensor(Protocol):
    """What the checker reads of a feed: a numpy array, or facts about a tensor on a device."""

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


class DeviceTensor(Tensor, Protocol):
    """An output where its backend ran it (GPU memory, an OrtValue): dtype and shape, and a copy to
    the host on request."""

    def to_host(self) -> np.ndarray: ...


@dataclass(frozen=True)
class HostTensor:
    """A numpy array as a `DeviceTensor` (a backend that runs on the host)."""

    array: np.ndarray

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def to_host(self) -> np.ndarray:
        return self.array


@dataclass
class FeedChecker:
    """Checks feeds against a graph's manifest entry: one message listing every problem."""

    graph: str
    info: GraphInfo

    def __post_init__(self) -> None:
        # Read once, not per call: the decoder's feeds are checked at every token.
        self._expected = {t.name: (t, np.dtype(t.dtype)) for t in self.info.inputs}
        self._relations = [
            (t, i, want)
            for t in self.info.inputs
            for i, want in enumerate(t.shape)
            if not isinstance(want, int) and want not in self.info.profile
        ]

    def check(self, feeds: Mapping[str, Tensor]) -> None:
        problems = []
        if feeds.keys() != self._expected.keys():
            missing = sorted(set(self._expected) - set(feeds))
            extra = sorted(set(feeds) - set(self._expected))
            if missing:
                problems.append(f"missing inputs {missing}")
            if extra:
                problems.append(f"unknown inputs {extra}")
        sizes: dict[str, int] = {}
        for name, (spec, dtype) in self._expected.items():
            if name in feeds:
                problems += self._check_one(spec, dtype, feeds[name], sizes)
        if not problems:
            problems += self._check_relations(feeds, sizes)
        if problems:
            raise BackendError(f"{self.graph}: " + "; ".join(problems))

    def _check_one(
        self, spec: TensorInfo, dtype: np.dtype, array: Tensor, sizes: dict[str, int]
    ) -> list[str]:
        if array.dtype != dtype:
            return [f"{spec.name} is {array.dtype}, expected {spec.dtype}"]
        if len(array.shape) != len(spec.shape):
            return [f"{spec.name} has shape {array.shape}, expected rank {len(spec.shape)} {spec.shape}"]
        problems = []
        for dim, want in zip(array.shape, spec.shape, strict=True):
            if isinstance(want, int):
                if dim != want:
                    problems.append(f"{spec.name} has shape {array.shape}, expected {spec.shape}")
            elif want in self.info.profile:  # a plain axis: check its range and step
                bounds = self.info.profile[want]
                step = self.info.axis_multiples.get(want, 1)
                if sizes.setdefault(want, dim) != dim:
                    problems.append(f"axis {want} is {sizes[want]} in one input and {dim} in {spec.name}")
                elif not bounds["min"] <= dim <= bounds["max"] or dim % step:
                    problems.append(
                        f"{spec.name} axis {want} = {dim} is outside the graph's range "
                        f"[{bounds['min']}, {bounds['max']}]" + (f" in steps of {step}" if step > 1 else "")
                    )
        return problems

    def _check_relations(self, feeds: Mapping[str, Tensor], sizes: dict[str, int]) -> list[str]:
        """Dimensions given by expressions ("P+T", "S*32") must equal their value (nothing in the
        graph checks it: a wrong attention-mask length could broadcast silently)."""
        problems = []
        for spec, i, want in self._relations:
            try:
                value = evaluate(want, sizes)
            except KeyError:
                continue  # an axis that only this expression names: nothing to compare with
            got = feeds[spec.name].shape[i]
            if got != value:
                where = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
                problems.append(f"{spec.name} dimension {i} is {got}, expected {want} = {value} ({where})")
        return problems


class Runner(ABC):
    """One graph loaded by a backend. Subclasses implement `input_names`, `output_names` and `_run`
    (feeds already checked); they may override `run_device`, `decoder_step` and `close`."""

    def __init__(self, name: str, info: GraphInfo, precision: str, description: str):
        self.name = name  # the graph's name (a manifest key)
        self.info = info.interface(precision)  # the running variant's dtypes (its float16 KV cache)
        self.precision = precision  # the precision of the graph (or engine) that runs
        self.description = description  # what runs it, for the screen
        self.checker = FeedChecker(name, self.info)

    @abstractmethod
    def input_names(self) -> list[str]: ...

    @abstractmethod
    def output_names(self) -> list[str]: ...

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run the graph on checked feeds: {output: host array} for each name in `outputs`."""

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """{output: array} for `outputs` (None: all), after the feeds passed the checker."""
        self.checker.check(feeds)
        return self._run(feeds, list(outputs or self.output_names()))

    def run_device(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, DeviceTensor]:
        """Like `run`, with the outputs left where the backend ran them (no copy to the host until
        `to_host()`). This default runs on the host; a device backend overrides it and says how
        long its tensors stay valid."""
        return {name: HostTensor(array) for name, array in self.run(feeds, outputs).items()}

    def decoder_step(self, layout: KVLayout, all_logits: bool = False) -> DecoderStep:
        """The generator's step over this runner of the llm_decoder graph. This default sends the KV
        cache through the host each token (`GraphDecoderStep` over `run`). `layout`: the manifest's;
        the cache is kept in the dtype of the running variant's past (`GraphInfo.kv_layout`).
        `all_logits`: every position's logits (a step may return only the last position's, which
        is what generation reads; this one always returns all)."""
        return GraphDecoderStep(self.run, self.info.kv_layout(layout))

    def close(self) -> None:  # noqa: B027 (a runner on the host holds nothing to free)
        """Free what the runner holds (device memory, a stream); it runs no more after."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
