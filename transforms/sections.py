"""Run a large ONNX graph a section at a time, so that one decoder layer's weights are in memory at once.

The 13B decoder is 26 GB of float16 weights. One ONNX Runtime session of it maps every weight (RSS
reaches the machine's memory) and, with its optimizer on, folds each weight's Cast into a float32
copy (52 GB). `SectionedGraph` cuts the graph, as the exporter wrote it, into consecutive sections
of whole decoder layers and runs them one after another: each section is a graph of its own over the
same side file (its initializers keep their external-data entries), loaded, run on every case, and
freed before the next one. Values that cross a cut are held per case and dropped once no later
section reads them. The nodes run are the graph's own nodes, every one exactly once, so the outputs
are the whole graph's (tests/test_sections.py compares them with one session of the whole graph).

Sections come from the exporter's metadata: torch.onnx's dynamo exporter records each node's
module path (`pkg.torch.onnx.name_scopes`, e.g. [..., "lm.model.layers.3", ...]). A node in layer i
belongs to layer i's section; a node with no layer (a weight's Cast, the rotary tables, the final
norm) to the section of its first reader, or to the section before it when nothing reads it (the LM
head, a graph output). Consecutive layers are grouped while their weights fit `max_section_bytes`.
A graph without such metadata, or whose cuts would not flow forward, is one section: the whole
graph, as one session would run it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from vsal.transforms.onnx_io import tensor_nbytes

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
LAYER_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)$")
DEFAULT_SECTION_BYTES = 1 << 30  # about one 13B layer in float16 (0.63 GB) at a time

# (case index, value name, values): called as each observed value is made
Observer = Callable[[int, str, np.ndarray], None]
SessionFactory = Callable[[str], object]  # a graph file -> an object with run(names, feeds)


def node_layers(graph: onnx.GraphProto) -> list[int | None]:
    """Per node, the decoder layer its name scope names, or None."""
    layers = []
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "")
        found = None
        for scope in re.findall(r"'([^']*)'", scopes):
            match = LAYER_SCOPE.search(scope)
            if match:
                found = int(match.group(1))
        layers.append(found)
    return layers


def node_sections(graph: onnx.GraphProto) -> list[int]:
    """Per node, its section (0, 1, ...; see the module docstring). One section for a graph
    without layer scopes or whose sections would not flow forward."""
    layers = node_layers(graph)
    nodes = list(graph.node)
    if not any(layer is not None for layer in layers) or any(_has_subgraph(n) for n in nodes):
        return [0] * len(nodes)
    first_reader: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            first_reader.setdefault(name, index)
    # reverse pass: an unscoped node takes its first reader's section (found later in the graph)
    section: list[int | None] = list(layers)
    for index in range(len(nodes) - 1, -1, -1):
        if section[index] is None:
            readers = [first_reader[o] for o in nodes[index].output if o in first_reader]
            later = [section[r] for r in readers if r > index and section[r] is not None]
            section[index] = min(later) if later else None
    previous = 0
    for index, value in enumerate(section):  # nothing reads it: the section before it
        section[index] = previous = value if value is not None else previous
    producer = {o: section[i] for i, n in enumerate(nodes) for o in n.output}
    for index, node in enumerate(nodes):
        if any(producer.get(name, -1) > section[index] for name in node.input):
            return [0] * len(nodes)  # a cut that would flow backwards: run the graph whole
    return [int(s) for s in section]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


@dataclass
class Section:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    inputs: list[str]  # values it reads that it does not make (graph inputs or earlier sections')
    made: list[str]  # values its nodes make
    weight_bytes: int


class CaseError(ValueError):
    """A case (feed dict) the graph cannot run: a graph input missing, or ONNX Runtime's failure."""

    def __init__(self, case: int, detail: str):
        super().__init__(f"case {case}: {detail}")
        self.case, self.detail = case, detail


class SectionedGraph:
    """An ONNX graph run a section at a time (module docstring). `path`'s side file stays where
    it is; each section's graph is written beside it for the moment its session loads."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_section_bytes: int = DEFAULT_SECTION_BYTES,
        session_factory: SessionFactory | None = None,
    ):
        self.path = Path(path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.session_factory = session_factory or _low_memory_session
        self.sections = _group(_split(self.model.graph), max_section_bytes)
        self.input_names = [i.name for i in self.model.graph.input]

    def run(
        self,
        outputs: Sequence[str],
        cases: Sequence[Mapping[str, np.ndarray]],
        *,
        observe: Iterable[str] = (),
        observer: Observer | None = None,
    ) -> list[list[np.ndarray]]:
        """Per case, the values `outputs` names. `observe`: values (graph inputs, or any node's
        outputs) handed to `observer` as they are fed or made, per case, and not kept."""
        observe = set(observe)
        wanted = set(outputs)
        last_reader: dict[str, int] = {}
        for index, section in enumerate(self.sections):
            for name in section.inputs:
                last_reader[name] = index
        values = [dict(feeds) for feeds in cases]
        for case, env in enumerate(values):
            missing = [name for name in self.input_names if name not in env]
            if missing:
                raise CaseError(case, f"no value for graph input(s) {', '.join(missing)}")
        for case, env in enumerate(values):  # an observed graph input: seen as it is fed
            for name in observe & set(env):
                if observer is not None:
                    observer(case, name, env[name])
        for index, section in enumerate(self.sections):
            later = {n for n, last in last_reader.items() if last > index}
            keep = [n for n in section.made if n in later or n in wanted or n in observe]
            if not keep:
                continue
            with _SectionSession(self, section, keep, values[0]) as session:
                for case, env in enumerate(values):
                    try:
                        results = session.run(keep, {n: env[n] for n in section.inputs})
                    except Exception as exc:  # ONNX Runtime's own types: say which case
                        raise CaseError(case, f"{type(exc).__name__}: {exc}") from exc
                    for name, array in zip(keep, results, strict=True):
                        if name in observe and observer is not None:
                            observer(case, name, array)
                        if name in later or name in wanted:
                            env[name] = array
            for env in values:  # what no later section reads and no one asked for
                for name in [n for n in env if n not in wanted and last_reader.get(n, -1) <= index]:
                    del env[name]
        missing = wanted - set(values[0]) if values else set()
        if missing:
            raise KeyError(f"{self.path}: no node makes {sorted(missing)}")
        return [[env[name] for name in outputs] for env in values]


class _SectionSession:
    """A section's graph written beside the full graph (so its side file's relative location
    resolves), loaded, and removed with its session. The `with` target is this object, not the
    session: the name it binds outlives the block, and must not keep one section's session alive
    while the next one loads."""

    def __init__(self, owner: SectionedGraph, section: Section, outputs: list[str], example):
        model = owner.model
        graph = helper.make_graph(
            section.nodes,
            f"{model.graph.name}_section",
            [_value_info(name, example.get(name)) for name in section.inputs],
            [helper.make_empty_tensor_value_info(name) for name in outputs],
            initializer=section.initializers,
        )
        sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        sub.functions.extend(model.functions)
        self.owner = owner
        self.proto = sub

    def __enter__(self) -> _SectionSession:
        handle, self.file = tempfile.mkstemp(
            prefix=f".{self.owner.path.stem}.section.", suffix=".onnx", dir=self.owner.path.parent
        )
        os.close(handle)
        try:
            onnx.save_model(self.proto, self.file)
            del self.proto
            self.session = self.owner.session_factory(self.file)
        except BaseException:  # __exit__ does not run when __enter__ fails
            Path(self.file).unlink(missing_ok=True)
            raise
        return self

    def run(self, outputs: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)

    def __exit__(self, *exc) -> None:
        del self.session  # its only reference: the section's weights are freed here
        Path(self.file).unlink(missing_ok=True)


def _value_info(name: str, example: np.ndarray | None) -> onnx.ValueInfoProto:
    """An input declared with its element type and rank (dims left symbolic: cases differ)."""
    if example is None:
        raise KeyError(f"section input {name}: no value for it (a graph input not fed?)")
    dtype = helper.np_dtype_to_tensor_dtype(np.asarray(example).dtype)
    return helper.make_tensor_value_info(name, dtype, [None] * np.ndim(example))


def _split(graph: onnx.GraphProto) -> list[Section]:
    sections = node_sections(graph)
    inits = {t.name: t for t in graph.initializer}
    count = max(sections, default=0) + 1
    parts = [Section([], [], [], [], 0) for _ in range(count)]
    for node, index in zip(graph.node, sections, strict=True):
        parts[index].nodes.append(node)
    for part in parts:
        made, seen = set(), set()
        for node in part.nodes:
            for name in node.input:
                if not name or name in made or name in seen:
                    continue
                seen.add(name)
                if name in inits:
                    part.initializers.append(inits[name])
                    part.weight_bytes += _bytes(inits[name])
                else:
                    part.inputs.append(name)
            made.update(o for o in node.output if o)
        part.made = [o for node in part.nodes for o in node.output if o]
    return [p for p in parts if p.nodes]


def _group(sections: list[Section], max_bytes: int) -> list[Section]:
    """Consecutive sections merged while their weights fit `max_bytes` (one at least each)."""
    groups: list[list[Section]] = []
    for section in sections:
        if groups and sum(s.weight_bytes for s in groups[-1]) + section.weight_bytes <= max_bytes:
            groups[-1].append(section)
        else:
            groups.append([section])
    return [_merge(group) for group in groups]


def _merge(group: list[Section]) -> Section:
    if len(group) == 1:
        return group[0]
    nodes = [n for s in group for n in s.nodes]
    made = [o for s in group for o in s.made]
    made_set = set(made)
    inputs, seen = [], set()
    for s in group:
        for name in s.inputs:
            if name not in made_set and name not in seen:
                seen.add(name)
                inputs.append(name)
    inits, names = [], set()
    for s in group:
        for t in s.initializers:
            if t.name not in names:
                names.add(t.name)
                inits.append(t)
    return Section(nodes, inits, inputs, made, sum(_bytes(t) for t in inits))


def _bytes(tensor: onnx.TensorProto) -> int:
    return tensor_nbytes(tensor) or 0


def _low_memory_session(path: str):
    from vsal.runtime.backends.sessions import ort_session

    return ort_session(path, optimization="disable", low_memory=True)
