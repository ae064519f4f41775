"""The device-resident TensorRT decoder step against a numpy stand-in of TensorRT and cuda-python.

No TensorRT or GPU here: `FakeCudart` keeps "device memory" in numpy buffers whose addresses are the
pointers (so the step's pointer arithmetic and copies are real), and `FakeContext` is an execution
context that records every shape and address it is given and, on execute_async_v3, runs a toy
decoder (numpy) on the tensors at those addresses. This checks the step's bookkeeping, not
TensorRT: which buffer is past and which present at each step, the shapes set, the cache's growth,
its P max limit, beam reorders on the device, and what crosses to the host. Its tokens must equal
those of the host round trip (`GraphDecoderStep`) over the same toy decoder.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np
import pytest
from vsal.runtime.backends import BackendError
from vsal.runtime.backends.tensorrt import CudaMemory, TensorRTDecoderStep
from vsal.runtime.generation import GraphDecoderStep, beam_search, generate_tokens
from vsal.runtime.graphs import KVLayout
from vsal.runtime.manifest import GraphInfo, TensorInfo
from vsal.runtime.prompt import DecodingOptions

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 2, 3, 4, 7
B_MAX, T_MAX, P_MAX = 4, 6, 12
H2D, D2H, D2D = "h2d", "d2h", "d2d"


def decoder_info(dtype: str) -> GraphInfo:
    layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, dtype)
    kv = ["B", KV_HEADS, "P", HEAD_DIM]
    present = ["B", KV_HEADS, "P+T", HEAD_DIM]
    inputs = [
        TensorInfo("inputs_embeds", "float32", ["B", "T", HIDDEN]),
        TensorInfo("attention_mask", "int64", ["B", "P+T"]),
        TensorInfo("position_ids", "int64", ["B", "T"]),
        *(TensorInfo(name, dtype, kv) for name in layout.past_names()),
    ]
    outputs = [
        TensorInfo("logits", "float32", ["B", "T", VOCAB]),
        *(TensorInfo(name, dtype, present) for name in layout.present_names()),
    ]
    profile = {
        "B": {"min": 1, "opt": 1, "max": B_MAX},
        "T": {"min": 1, "opt": 1, "max": T_MAX},
        "P": {"min": 0, "opt": 4, "max": P_MAX},
    }
    return GraphInfo("graphs/llm_decoder.onnx", "0" * 64, inputs, outputs, profile)


class ToyDecoder:
    """A decoder whose logits depend on every cached row: a wrong past, order or length shows."""

    def __init__(self, layout: KVLayout, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.layout = layout
        self.kv = [rng.standard_normal((HIDDEN, KV_HEADS * HEAD_DIM)) for _ in layout.past_names()]
        self.out = rng.standard_normal((HIDDEN, VOCAB))
        self.mix = rng.standard_normal((KV_HEADS * HEAD_DIM, VOCAB))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["inputs_embeds"].astype(np.float64)  # [B, T, H]
        b, t, _ = x.shape
        outputs, summary = {}, 0.0
        for w, past, present in zip(
            self.kv, self.layout.past_names(), self.layout.present_names(), strict=True
        ):
            new = (x @ w + feeds["position_ids"][..., None]).reshape(b, t, KV_HEADS, HEAD_DIM)
            new = new.transpose(0, 2, 1, 3).astype(self.layout.dtype)  # [B, kvH, T, hd]
            outputs[present] = np.concatenate([feeds[past], new], axis=2)  # [B, kvH, P+T, hd]
            summary = summary + outputs[present].astype(np.float64).sum(axis=2)  # [B, kvH, hd]
        mixed = summary.reshape(b, 1, -1) @ self.mix / 10  # [B, 1, V]
        outputs["logits"] = (np.tanh(x @ self.out + mixed)).astype(np.float32)
        return outputs


@dataclass
class Copy:
    kind: str
    nbytes: int


class FakeCudart:
    """cuda-python's runtime API, over host memory: a pointer is a numpy buffer's address."""

    class cudaMemcpyKind:  # noqa: N801 (cuda-python's name)
        cudaMemcpyHostToDevice = H2D
        cudaMemcpyDeviceToHost = D2H
        cudaMemcpyDeviceToDevice = D2D

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.copies: list[Copy] = []
        self.freed: list[int] = []

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaMalloc(self, nbytes):  # noqa: N802
        block = np.zeros(nbytes, np.uint8)
        self.blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, pointer):  # noqa: N802
        self.freed.append(pointer)
        del self.blocks[pointer]
        return (0,)

    def cudaMemcpyAsync(self, destination, source, nbytes, kind, stream):  # noqa: N802
        if kind in (H2D, D2D):
            self.block_at(destination, nbytes)
        if kind in (D2H, D2D):
            self.block_at(source, nbytes)
        ctypes.memmove(destination, source, nbytes)
        self.copies.append(Copy(kind, nbytes))
        return (0,)

    def block_at(self, pointer: int, nbytes: int) -> np.ndarray:
        """The device bytes [pointer, pointer + nbytes): within one allocation, or a failed test."""
        for base, block in self.blocks.items():
            if base <= pointer and pointer + nbytes <= base + block.nbytes:
                return block[pointer - base : pointer - base + nbytes]
        raise AssertionError(f"{nbytes} bytes at {pointer:#x} are outside every device allocation")

    def view(self, pointer: int, dtype, shape) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.block_at(pointer, int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)


@dataclass
class FakeContext:
    """An execution context with TensorRT 10's name-based API over the toy decoder."""

    cudart: FakeCudart
    decoder: ToyDecoder
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    calls: list[dict] = field(default_factory=list)  # per execute: {name: (address, shape)}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def get_tensor_shape(self, name):
        b, t, _ = self.shapes["inputs_embeds"]
        if name == "logits":
            return (b, t, VOCAB)
        past = self.decoder.layout.past_names()[self.decoder.layout.present_names().index(name)]
        b, heads, p, d = self.shapes[past]
        return (b, heads, p + t, d)

    def execute_async_v3(self, stream):
        feeds = {n: self.cudart.view(self.addresses[n], self.dtypes[n], s) for n, s in self.shapes.items()}
        outputs = self.decoder({n: a.copy() for n, a in feeds.items()})
        for name, array in outputs.items():
            assert array.shape == tuple(self.get_tensor_shape(name))
            self.cudart.view(self.addresses[name], self.dtypes[name], array.shape)[...] = array
        self.calls.append({n: (self.addresses[n], self.shapes.get(n)) for n in self.addresses})
        return True


def make_step(dtype: str = "float32"):
    layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, dtype)
    info = decoder_info(dtype)
    dtypes = {t.name: np.dtype(t.dtype) for t in (*info.inputs, *info.outputs)}
    cudart = FakeCudart()
    decoder = ToyDecoder(layout)
    context = FakeContext(cudart, decoder, dtypes)
    step = TensorRTDecoderStep(context, CudaMemory(cudart), info, layout, dtypes)
    reference = GraphDecoderStep(decoder, layout)
    return step, reference, context, cudart, layout


def feeds(batch: int, t: int, past: int, seed: int = 1):
    x = np.random.default_rng(seed).standard_normal((batch, t, HIDDEN)).astype(np.float32)
    mask = np.ones((batch, past + t), np.int64)
    positions = np.broadcast_to(np.arange(past, past + t, dtype=np.int64), (batch, t)).copy()
    return x, mask, positions


def test_buffers_are_preallocated_at_b_max_and_p_max_in_the_layouts_dtype():
    step, _, _, cudart, layout = make_step("float16")
    kv_bytes = B_MAX * KV_HEADS * P_MAX * HEAD_DIM * 2  # float16
    assert len(step.buffers) == 2 * LAYERS
    assert all(cudart.blocks[p].nbytes == kv_bytes for pair in step.buffers for p in pair)
    assert len(cudart.blocks) == 2 * 2 * LAYERS  # two per past tensor, nothing else yet


def test_past_and_present_swap_by_pointer_and_the_shapes_follow_p():
    step, _, context, _, layout = make_step()
    cache = None
    past_length = 0
    for i, t in enumerate((3, 1, 1)):
        logits, cache = step(*feeds(1, t, past_length, seed=i), cache)
        call = context.calls[-1]
        for n, (past, present) in enumerate(zip(layout.past_names(), layout.present_names(), strict=True)):
            pair = step.buffers[n]
            assert call[past] == (pair[i % 2], (1, KV_HEADS, past_length, HEAD_DIM))
            assert call[present][0] == pair[1 - i % 2]  # written into the other buffer
        assert call["inputs_embeds"][1] == (1, t, HIDDEN)
        assert call["attention_mask"][1] == (1, past_length + t)
        past_length += t
        assert (cache.batch, cache.length) == (1, past_length) and logits.shape == (1, t, VOCAB)


def test_only_the_small_inputs_go_in_and_the_logits_come_out():
    step, _, _, cudart, _ = make_step()
    _, cache = step(*feeds(1, 4, 0), None)
    cudart.copies.clear()
    for past in (4, 5, 6):
        logits, cache = step(*feeds(1, 1, past), cache)
    to_host = [c.nbytes for c in cudart.copies if c.kind == D2H]
    to_device = [c.nbytes for c in cudart.copies if c.kind == H2D]
    assert to_host == [logits.nbytes] * 3  # one [1, 1, V] float32 per token, no cache
    per_token = HIDDEN * 4 + (past + 1) * 8 + 8  # inputs_embeds, attention_mask, position_ids
    assert sum(to_device[-3:]) == per_token
    assert max(to_device) <= HIDDEN * 4 + (P_MAX + 1) * 8  # never a past
    assert not [c for c in cudart.copies if c.kind == D2D]  # no reorder, no copy on the device


def test_decoding_allocates_nothing_per_token():
    step, _, _, cudart, _ = make_step()
    _, cache = step(*feeds(1, 2, 0), None)
    held = dict(cudart.blocks)
    for past in range(2, P_MAX):  # the mask grows each token: its buffer holds [B max, P max] already
        _, cache = step(*feeds(1, 1, past), cache)
    assert cudart.blocks == held and not cudart.freed


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_greedy_tokens_and_logits_equal_the_host_round_trip(dtype):
    step, reference, _, _, _ = make_step(dtype)
    prompt = feeds(1, 5, 0)[0]
    options = DecodingOptions(num_beams=1, max_new_tokens=P_MAX - 5 + 1, min_length=0, eos_token_id=None)
    embed = np.random.default_rng(3).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    lookup = lambda ids: embed[ids]  # noqa: E731
    got = list(generate_tokens(step, lookup, prompt, options))
    want = list(generate_tokens(reference, lookup, prompt, options))
    assert got == want and len(got) == options.max_new_tokens
    logits, _ = step(*feeds(2, 3, 0), None)  # a new sequence over the same buffers
    expected, _ = reference(*feeds(2, 3, 0), None)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_beam_search_reorders_on_the_device_like_the_host():
    step, reference, _, cudart, _ = make_step()
    prompt = feeds(1, 4, 0)[0]
    options = DecodingOptions(num_beams=3, max_new_tokens=6, min_length=0, eos_token_id=None)
    embed = np.random.default_rng(5).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    lookup = lambda ids: embed[ids]  # noqa: E731
    assert beam_search(step, lookup, prompt, options) == beam_search(reference, lookup, prompt, options)
    assert [c for c in cudart.copies if c.kind == D2D]  # the reorders gathered on the device
    to_host = {c.nbytes for c in cudart.copies if c.kind == D2H}
    assert to_host == {4 * VOCAB * 4, 3 * VOCAB * 4}  # the prefill's logits, then the 3 beams' logits


def test_a_reorder_gathers_rows_into_the_other_buffer():
    step, _, _, cudart, layout = make_step()
    _, cache = step(*feeds(3, 2, 0), None)
    live = [cudart.view(pair[step.live], np.float32, layout.shape(3, 2)).copy() for pair in step.buffers]
    cudart.copies.clear()
    moved = cache.reorder(np.array([2, 0, 0, 1]))  # B' = 4 from 3 rows
    assert (moved.batch, moved.length) == (4, 2)
    for before, pair in zip(live, step.buffers, strict=True):
        after = cudart.view(pair[step.live], np.float32, layout.shape(4, 2))
        np.testing.assert_array_equal(after, before[[2, 0, 0, 1]])
    row = KV_HEADS * 2 * HEAD_DIM * 4
    assert [c.nbytes for c in cudart.copies] == [row] * 4 * 2 * LAYERS  # all on the device
    assert {c.kind for c in cudart.copies} == {D2D}


def test_a_cache_past_p_max_is_refused_before_the_engine_runs():
    step, _, context, _, _ = make_step()
    _, cache = step(*feeds(1, T_MAX, 0), None)
    _, cache = step(*feeds(1, T_MAX, T_MAX), cache)  # P + T = P max: fits exactly
    runs = len(context.calls)
    with pytest.raises(BackendError, match=f"P\\+T = {P_MAX + 1} positions; .* P max = {P_MAX}"):
        step(*feeds(1, 1, P_MAX), cache)
    assert len(context.calls) == runs


def test_wrong_feeds_and_stale_caches_are_refused():
    step, _, context, _, _ = make_step()
    with pytest.raises(BackendError, match="inputs_embeds axis T = 7 is outside"):
        step(*feeds(1, T_MAX + 1, 0), None)
    with pytest.raises(BackendError, match="axis B = 5 is outside"):
        step(*feeds(B_MAX + 1, 1, 0), None)
    _, first = step(*feeds(1, 2, 0), None)
    with pytest.raises(BackendError, match="attention_mask dimension 1 is 1, expected P\\+T = 3"):
        step(*feeds(1, 1, 0), first)  # a mask that forgets the past
    _, second = step(*feeds(1, 1, 2), first)
    with pytest.raises(BackendError, match="a stale KV cache"):
        step(*feeds(1, 1, 2), first)
    with pytest.raises(BackendError, match="cannot reorder 1 cache rows"):
        second.reorder(np.array([1]))
    assert len(context.calls) == 2


def test_an_engine_with_another_kv_dtype_is_refused():
    layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, "float16")
    info = decoder_info("float32")
    dtypes = {t.name: np.dtype(t.dtype) for t in (*info.inputs, *info.outputs)}
    cudart = FakeCudart()
    with pytest.raises(
        BackendError, match="past_key_values.0.key is float32, the package's KV layout says float16"
    ):
        TensorRTDecoderStep(
            FakeContext(cudart, ToyDecoder(layout), dtypes), CudaMemory(cudart), info, layout, dtypes
        )


def test_close_frees_every_buffer():
    step, _, _, cudart, _ = make_step()
    step(*feeds(1, 2, 0), None)
    step.close()
    assert not cudart.blocks
