"""One index over an ONNX graph, torch-free: who produces and who reads each tensor, its element
type, which tensors are constants, and the walks into subgraphs and model-local functions.

Shared by the transforms (fp16, int8 static and weight-only, the x86 int8 re-encoding) and
`vsal-export check` (vsal.export.check), so each reads a graph the same way.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, ValueInfoProto

DEFAULT_DOMAINS = ("", "ai.onnx")


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs a node carries as attributes (If's branches, Loop's and Scan's bodies)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def node_inputs(node: NodeProto) -> Iterator[str]:
    """A node's inputs, and those its subgraphs read from the enclosing scope."""
    yield from (n for n in node.input if n)
    for sub in subgraphs(node):
        local = {v.name for v in (*sub.input, *sub.initializer)}
        for inner in sub.node:
            for name in node_inputs(inner):
                if name not in local:
                    yield name
            local.update(inner.output)


def walk(
    graph: GraphProto, functions: Mapping[tuple[str, str], onnx.FunctionProto] | None = None
) -> Iterator[tuple[NodeProto, GraphProto | None]]:
    """(node, the graph it is in) for every node, subgraphs included; a call of a model-local
    function yields the function's nodes instead, with None for their graph (they see only the
    function's formal inputs), as TensorRT imports them by inlining."""
    functions = functions or {}
    for node in graph.node:
        body = functions.get((node.domain, node.op_type))
        if body is not None:
            for inner in body.node:
                yield inner, None
            continue
        yield node, graph
        for sub in subgraphs(node):
            yield from walk(sub, functions)


def initializers(graph: GraphProto) -> Iterator[TensorProto]:
    """The graph's initializers and its subgraphs'."""
    yield from graph.initializer
    for node in graph.node:
        for sub in subgraphs(node):
            yield from initializers(sub)


def external_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    """Every tensor ONNX Runtime would read from a side file: initializers and node attributes
    (Constant's value), in subgraphs too."""
    candidates = [*graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            candidates += [attr.t] if attr.type == AttributeProto.TENSOR else list(attr.tensors)
    yield from (t for t in candidates if t.data_location == TensorProto.EXTERNAL)
    for node in graph.node:
        for sub in subgraphs(node):
            yield from external_tensors(sub)


def constant_tensor(node: NodeProto) -> TensorProto | None:
    """The value of a Constant node given as a tensor (value=), else None."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
    return None


def attribute(node: NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def feed_inputs(graph: GraphProto) -> list[ValueInfoProto]:
    """The inputs a caller feeds (old IR versions list the weights as inputs too)."""
    weights = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in weights]


@dataclass
class GraphIndex:
    """Maps over one graph (its nodes; the types and constants of its subgraphs too)."""

    graph: GraphProto
    producer: dict[str, NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[NodeProto]] = field(default_factory=lambda: defaultdict(list))
    types: dict[str, int] = field(default_factory=dict)  # tensor name -> ONNX element type
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    constant_values: dict[str, TensorProto] = field(default_factory=dict)  # initializers, Constant(value=)
    constants: set[str] = field(default_factory=set)  # every name known when the graph is built
    inputs: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, graph: GraphProto) -> GraphIndex:
        index = cls(graph)
        index.inputs = {v.name for v in graph.input}
        index.initializers = {t.name: t for t in graph.initializer}
        index.constant_values = dict(index.initializers)
        _collect_types(graph, index.types)
        _collect_constants(graph, index.constants)
        for node in graph.node:
            for name in node.output:
                index.producer[name] = node
            for name in dict.fromkeys(node_inputs(node)):  # a node reading x twice is one consumer
                index.consumers[name].append(node)
            value = constant_tensor(node)
            if value is not None:
                index.constant_values[node.output[0]] = value
        return index

    def users(self, node: NodeProto) -> Iterator[NodeProto]:
        """The nodes that read any output of `node`."""
        for name in node.output:
            yield from self.consumers.get(name, ())

    def sources(self, node: NodeProto) -> Iterator[NodeProto]:
        """The nodes that produce an input of `node`."""
        yield from (self.producer[n] for n in node.input if n in self.producer)


def _collect_types(graph: GraphProto, out: dict[str, int]) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            out[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        out[tensor.name] = tensor.data_type
    for node in graph.node:
        value = constant_tensor(node)
        if value is not None:
            out[node.output[0]] = value.data_type
        for sub in subgraphs(node):
            _collect_types(sub, out)


def _collect_constants(graph: GraphProto, out: set[str]) -> None:
    """Initializers and Constant outputs; a branch of an If may use its parent's weights."""
    out.update(t.name for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            out.add(node.output[0])
        for sub in subgraphs(node):
            _collect_constants(sub, out)


def name_nodes(graph: GraphProto) -> None:
    """Give unnamed nodes, and every repeat of a name, a unique name (quantizers and the fp16
    converter select nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        seen.add(name)


def rename_inputs(graph: GraphProto, rename: Mapping[str, str]) -> None:
    """Read `rename[x]` wherever a node (or a node of a subgraph) reads x."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for sub in subgraphs(node):
            rename_inputs(sub, rename)


def drop_unread(graph: GraphProto, removable: Callable[[NodeProto], bool]) -> int:
    """Remove `removable` nodes whose outputs nothing reads (nor the graph outputs), until none is
    left; returns how many were removed."""
    outputs = {v.name for v in graph.output}
    removed = 0
    while True:
        read = {name for node in graph.node for name in node_inputs(node)} | outputs
        keep = [n for n in graph.node if not removable(n) or any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            return removed
        removed += len(graph.node) - len(keep)
        del graph.node[:]
        graph.node.extend(keep)


def drop_unread_initializers(graph: GraphProto) -> None:
    read = {name for node in graph.node for name in node_inputs(node)} | {v.name for v in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def toposort(graph: GraphProto) -> None:
    """Sort the nodes topologically (Kahn's algorithm, keeping the order where it is already
    valid); ValueError when the graph has a cycle."""
    nodes = list(graph.node)
    produced = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        needs = {produced[n] for n in node_inputs(node) if n in produced and produced[n] != i}
        deps.append(needs)
        for j in needs:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order = []
    remaining = [len(d) for d in deps]
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
