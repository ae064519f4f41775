"""TensorRT's documented ONNX support, as tables: the ONNX parser's operators (supported or not, the
data types, the restrictions), its opset range, the data types it accepts at all.

Sources of the tables below (read for this module; re-read them when a new TensorRT ships):
- TensorRT 10.x: onnx/onnx-tensorrt `docs/operators.md`, the TensorRT 10.15 revision ("TensorRT
  10.15 supports operators in the inclusive range of opset 9 to opset 24"; the stored copy does not
  name its commit). The 10.0 revision (onnx/onnx-tensorrt@96e781103cfc, tag release/10.1-GA) gives
  the opset ceiling of early 10.x (20) and, with `docs/Changelog.md`, the minor release that added
  each operator (`SINCE_10`).
- TensorRT 11.x: onnx/onnx-tensorrt `docs/operators.md` and `docs/Changelog.md` at
  2f3fa349247d9ff52d7662cb995c82278df31a86 ("TensorRT 11.0 supports operators in the inclusive range
  of opset 9 to opset 24"; 11.0 adds `Swish`). Later 11.x: NVIDIA/TensorRT release notes 11.2 (DFT
  through a cuFFT plugin) and 11.5 (opset 25).
- TensorRT 11 removals: NVIDIA "Migrating from TensorRT 10.x to 11.x" (docs.nvidia.com/deeplearning/
  tensorrt/11.x/api/migration/tensorrt-10x-to-11x.html): strongly typed networks only, the
  FP16/INT8/BF16 builder flags and IInt8Calibrator removed (explicit Q/DQ instead); JetPack is not
  supported by 11.x, Jetson stays on 10.x (JetPack 6.x ships TensorRT 10.3). TensorRT 10 C++ API
  "deprecated" list: the INT8 calibrators are deprecated since 10.1; 10.12 release notes: weak-typing
  APIs deprecated.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

VERSIONS = ("10", "11")
BASIS = (
    "checked against TensorRT's published ONNX support (onnx-tensorrt docs/operators.md of TensorRT "
    "10.15 and 11.0, NVIDIA's 10.x-to-11.x migration guide), not against a real TensorRT: "
    "build an engine on the target to confirm"
)
SOURCES = {
    "10": "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 revision (10.0 revision at 96e781103cfc)",
    "11": "onnx/onnx-tensorrt docs/operators.md @ 2f3fa349247d (TensorRT 11.0); TensorRT 11.2/11.5 notes",
}

# --- the documented tables -------------------------------------------------------------------------
# One row per operator of docs/operators.md (TensorRT 10.15): name | Y/N | supported types | restriction.
# Restrictions are shortened from the document's wording. "F3" abbreviates "FP32, FP16, BF16" and
# "I" abbreviates "INT32, INT64" (the document spells them out on every row).
_TABLE_10_15 = """
Abs | Y | F3, I |
Acos | Y | F3 |
Acosh | Y | F3 |
Add | Y | F3, I |
AffineGrid | N | |
And | Y | BOOL |
ArgMax | Y | F3, I |
ArgMin | Y | F3, I |
Asin | Y | F3 |
Asinh | Y | F3 |
Atan | Y | F3 |
Atanh | Y | F3 |
Attention | Y | F3, INT8, FP8 | Q, K, V and attn_mask must be 4D; inputs past_key, past_value, \
nonpad_kv_seqlen, outputs present_key, present_value, qk_matmul_output and attributes \
qk_matmul_output_mode, softcap are unsupported
AveragePool | Y | F3 | 2D or 3D pooling only; dilations must be empty or all ones
BatchNormalization | Y | F3 |
Bernoulli | N | |
BitShift | N | |
BitwiseAnd | N | |
BitwiseNot | N | |
BitwiseOr | N | |
BitwiseXor | N | |
BlackmanWindow | Y | FP32, FP16 |
Cast | Y | F3, I, UINT8, BOOL |
CastLike | Y | F3, I, UINT8, BOOL |
Ceil | Y | F3 |
Col2Im | N | |
Celu | Y | F3 |
CenterCropPad | N | |
Clip | Y | F3 |
Compress | N | |
Concat | Y | F3, I, BOOL |
ConcatFromSequence | N | |
Constant | Y | F3, FP8, FP4, INT4, I, BOOL | sparse_value, value_string and value_strings are unsupported
ConstantOfShape | Y | F3, FP8, FP4, INT4, I, BOOL |
Conv | Y | F3 |
ConvInteger | N | |
ConvTranspose | Y | F3 |
Cos | Y | F3 |
Cosh | Y | F3 |
CumSum | Y | F3 | axis must be a build-time constant
DFT | N | |
DeformConv | Y | FP32, FP16 | 1D or 2D spatial input only; begin and end pads equal on each spatial axis
DepthToSpace | Y | F3, I |
DequantizeLinear | Y | INT8, FP8, FP4, INT4 | x_zero_point must be zero
Det | N | |
Div | Y | F3, I |
Dropout | Y | F3 | is_training must be an initializer that evaluates to False
DynamicQuantizeLinear | N | | compose it from ONNX operators as a model-local function instead
Einsum | Y | F3 |
Elu | Y | F3 |
Equal | Y | F3, I |
Erf | Y | F3 |
Exp | Y | F3 |
Expand | Y | F3, I, BOOL |
EyeLike | Y | F3, I, BOOL | input must have static dimensions
Flatten | Y | F3, I, BOOL |
Floor | Y | F3 |
Gather | Y | F3, I, BOOL |
GatherElements | Y | F3, I, BOOL |
GatherND | Y | F3, I, BOOL |
Gelu | Y | F3, INT8, I |
Gemm | Y | F3 |
GlobalAveragePool | Y | F3 |
GlobalLpPool | Y | F3 |
GlobalMaxPool | Y | F3 |
Greater | Y | F3, I |
GreaterOrEqual | Y | F3, I |
GridSample | Y | FP32, FP16 | input must be 4D
GroupNormalization | Y | F3 |
GRU | Y | F3 | bidirectional GRUs need the same activations in both directions
HammingWindow | Y | FP32, FP16 |
HannWindow | Y | FP32, FP16 |
HardSigmoid | Y | F3 |
HardSwish | Y | F3 |
Hardmax | Y | F3 | the axis dimension of the input must be a build-time constant
Identity | Y | F3, I, BOOL |
If | Y | F3, I, BOOL | both branches' outputs must have the same rank and different names
ImageScaler | Y | F3 |
ImageDecoder | N | |
InstanceNormalization | Y | F3 |
IsInf | Y | F3 |
IsNaN | Y | F3, I |
LayerNormalization | Y | F3 | only the first output Y is supported
LeakyRelu | Y | F3 |
Less | Y | F3, I |
LessOrEqual | Y | F3, I |
Log | Y | F3 |
LogSoftmax | Y | F3 |
Loop | Y | F3, I, BOOL | scan output length cannot be dynamic; loop-carried shapes must not change
LRN | Y | F3 |
LSTM | Y | F3 | same activations in both directions; input_forget must be 0; layout must be 0
LpNormalization | Y | F3 |
LpPool | Y | F3 | dilations must be empty or all ones
MatMul | Y | F3 |
MatMulInteger | N | |
Max | Y | F3, I |
MaxPool | Y | F3 | 2D or 3D pooling only; no Indices output; dilations must be empty or all ones
MaxRoiPool | N | |
MaxUnpool | N | |
Mean | Y | F3, FP8, I |
MeanVarianceNormalization | Y | F3 |
MelWeightMatrix | N | |
Min | Y | F3, I |
Mish | Y | FP32, FP16 |
Mod | Y | F3, I |
Mul | Y | F3, I |
Multinomial | N | |
Neg | Y | F3, I |
NegativeLogLikelihoodLoss | N | |
NonMaxSuppression | Y | FP32, FP16 |
NonZero | Y | FP32, FP16 |
Not | Y | BOOL |
OneHot | Y | F3, I, BOOL | depth must be a build-time constant
Optional | N | |
OptionalGetElement | N | |
OptionalHasElement | N | |
Or | Y | BOOL |
Pad | Y | F3, I |
ParametricSoftplus | Y | F3 |
Pow | Y | F3, I |
PRelu | Y | F3 |
QLinearConv | N | |
QLinearMatMul | N | |
QuantizeLinear | Y | F3 | y_zero_point must be 0
RandomNormal | Y | F3 | the seed is ignored
RandomNormalLike | Y | F3 | the seed is ignored
RandomUniform | Y | F3 | the seed is ignored
RandomUniformLike | Y | F3 | the seed is ignored
Range | Y | F3, I |
Reciprocal | Y | F3 |
ReduceL1 | Y | F3, I | axes must be an initializer
ReduceL2 | Y | F3, I | axes must be an initializer
ReduceLogSum | Y | F3, I | axes must be an initializer
ReduceLogSumExp | Y | F3, I | axes must be an initializer
ReduceMax | Y | F3, I | axes must be an initializer
ReduceMean | Y | F3, I | axes must be an initializer
ReduceMin | Y | F3, I | axes must be an initializer
ReduceProd | Y | F3, I | axes must be an initializer
ReduceSum | Y | F3, I | axes must be an initializer
ReduceSumSquare | Y | F3, I | axes must be an initializer
RegexFullMatch | N | |
Relu | Y | F3, I |
Reshape | Y | F3, I, BOOL |
Resize | Y | F3 | coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, \
align_corners; modes nearest, linear; aspect ratio policy stretch; no antialiasing
ReverseSequence | Y | F3, I, BOOL |
RMSNormalization | Y | F3 |
RNN | Y | F3 | bidirectional RNNs need the same activations in both directions
RoiAlign | Y | FP32, FP16 |
RotaryEmbedding | Y | F3 | position_ids must be INT64
Round | Y | F3 |
STFT | Y | FP32 | frame_step and window must be initializers; real-valued input only
ScaledTanh | Y | F3 |
Scan | Y | F3 |
Scatter | Y | F3, I |
ScatterElements | Y | F3, I |
ScatterND | Y | F3, I | reduction other than none is unsupported
Selu | Y | F3 |
SequenceAt | N | |
SequenceConstruct | N | |
SequenceEmpty | N | |
SequenceErase | N | |
SequenceInsert | N | |
SequenceLength | N | |
SequenceMap | N | |
Shape | Y | F3, I, BOOL |
Shrink | Y | F3, I |
Sigmoid | Y | F3 |
Sign | Y | F3, I |
Sin | Y | F3 |
Sinh | Y | F3 |
Size | Y | F3, I, BOOL |
Slice | Y | F3, I, BOOL |
Softmax | Y | F3 |
SoftmaxCrossEntropyLoss | N | |
Softplus | Y | F3 |
Softsign | Y | F3 |
SpaceToDepth | Y | F3, I |
Split | Y | F3, I, BOOL |
SplitToSequence | N | |
Sqrt | Y | F3 |
Squeeze | Y | F3, I, BOOL | axes must be resolvable to a constant
StringConcat | N | |
StringNormalizer | N | |
StringSplit | N | |
Sub | Y | F3, I |
Sum | Y | F3, I |
Tan | Y | F3 |
Tanh | Y | F3 |
TensorScatter | Y | F3, INT32 | past_cache and update must be 4D; axis must be -2
TfIdfVectorizer | N | |
ThresholdedRelu | Y | F3 |
Tile | Y | F3, I, BOOL |
TopK | Y | F3, I | sorted must be 1; K must be less than 3840
Transpose | Y | F3, I, BOOL |
Trilu | Y | F3, I, BOOL |
Unique | N | |
Unsqueeze | Y | F3, I, BOOL | axes must be resolvable to a constant
Upsample | Y | F3 |
Where | Y | F3, I, BOOL |
Xor | Y | BOOL |
"""

# TensorRT 11.0's operators.md is the 10.15 table plus these rows.
_ADDED_11_0 = """
Swish | Y | F3 |
"""

# Minor 10.x release that added an operator (docs/Changelog.md); JetPack 6.x ships TensorRT 10.3.
SINCE_10 = {
    "DeformConv": "10.1",
    "BlackmanWindow": "10.4",
    "HammingWindow": "10.4",
    "HannWindow": "10.4",
    "STFT": "10.5",
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}
# Operators that the 11.0 table marks N but a later 11.x release note adds.
LATER_11 = {"DFT": "11.2 (through a cuFFT plugin)"}
# TensorRT's own custom operators (docs/TRT_custom_ops.md @ 2f3fa349247d, TensorRT 11.0).
TRT_CUSTOM_11 = {"TRT_QuantizedAttention", "TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"}

# Where operators.md's type column is narrower than the parser: onnxOpImporters.cpp at
# onnx/onnx-tensorrt@96e781103cfc (10.1 GA), Clip importer: "For INT32 and multi-input clips, use
# elementwise operators instead" and it accepts INT64 the same way. Reported as warnings, not errors.
SOURCE_ALSO = {("Clip", "INT32"), ("Clip", "INT64")}

# Data types TensorRT's ONNX parser accepts at all ("TensorRT supports the following ONNX data types").
QUANTIZED_TYPES = {"INT8", "INT4", "FP8", "FP4"}  # only through Q/DQ from a wider float type
ACCEPTED_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL", "DOUBLE"} | QUANTIZED_TYPES


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    dtypes: frozenset[str]
    restriction: str = ""


@dataclass(frozen=True)
class TrtTable:
    """What one TensorRT major version documents for its ONNX parser."""

    version: str  # "10" | "11"
    documented: str  # the release whose operators.md the table is
    opset_min: int
    opset_max: int  # of the documented release
    opset_max_early: int  # of the major's first release (older minors may stop here)
    opset_max_later: int  # of the newest minor's release notes
    ops: dict[str, OpSupport]


def _parse_table(text: str) -> dict[str, OpSupport]:
    expand = {"F3": ("FP32", "FP16", "BF16"), "I": ("INT32", "INT64")}
    ops = {}
    for line in text.replace("\\\n", "").strip().splitlines():
        name, flag, types, restriction = (part.strip() for part in line.split("|"))
        dtypes = {
            t for tag in types.split(",") if tag.strip() for t in expand.get(tag.strip(), (tag.strip(),))
        }
        ops[name] = OpSupport(flag == "Y", frozenset(dtypes), restriction)
    return ops


TRT10 = TrtTable("10", "10.15", 9, 24, 20, 24, _parse_table(_TABLE_10_15))
TRT11 = TrtTable("11", "11.0", 9, 24, 24, 25, {**TRT10.ops, **_parse_table(_ADDED_11_0)})
TABLES = {"10": TRT10, "11": TRT11}


def doc_dtype(elem_type: int) -> str:
    """ONNX element type -> the document's spelling (FP32, INT64, FP8 ...)."""
    names = {
        TensorProto.FLOAT: "FP32",
        TensorProto.FLOAT16: "FP16",
        TensorProto.BFLOAT16: "BF16",
        TensorProto.FLOAT8E4M3FN: "FP8",
        TensorProto.FLOAT4E2M1: "FP4",
    }
    if elem_type in names:
        return names[elem_type]
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")


def numpy_dtype(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return doc_dtype(elem_type).lower()
