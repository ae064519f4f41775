#!/usr/bin/env bash
# Install onnxruntime-genai and what its model builder needs to convert a Hugging Face Llama
# folder (transformers, torch CPU, onnx, sentencepiece) into a venv of its own, outside the
# project's environment, so that scripts/peers/ort_genai_eval.py and `vsal bench` can measure it
# beside vsal on the same weights.
#
#   bash scripts/peers/install_ort_genai.sh          # -> ${VSAL_PEERS:-/work/peers}/ort-genai
#
# Wheels only, nothing compiled: about a minute. Rerunning it keeps a finished venv.
set -euo pipefail

ORT_GENAI_VERSION=0.18.0
# Pinned on purpose: the project's machines hold torch 2.13.0+cpu in pip's local wheel folder
# (find-links), which this pin takes; an unpinned torch pulls the registry's CUDA wheels (several
# GB) that a CPU-only builder never uses. Elsewhere, point pip at PyTorch's CPU wheel index.
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PEERS=${VSAL_PEERS:-/work/peers}
VENV="$PEERS/ort-genai"
PYTHON=${PYTHON:-python3}

# Importing the builder checks its dependencies; its `--help` is no check: in 0.18 it raises
# ValueError (a bare '%' in a help string), so its flags are read from get_args() in builder.py.
installed() {
    "$VENV/bin/python" -c "import onnxruntime_genai.models.builder, sentencepiece, safetensors" \
        2>/dev/null
}

if [ -x "$VENV/bin/python" ] && installed; then
    echo "ort-genai: already installed in $VENV"
    exit 0
fi

mkdir -p "$PEERS"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel setuptools
# torch first and alone, so nothing later resolves it to another (CUDA) build.
"$VENV/bin/pip" install "torch==$TORCH_VERSION"
# The builder (onnxruntime_genai.models.builder) imports onnx, onnx_ir, transformers and torch;
# sentencepiece, protobuf and safetensors read Llama tokenizers and checkpoints.
"$VENV/bin/pip" install "onnxruntime-genai==$ORT_GENAI_VERSION" "torch==$TORCH_VERSION" \
    onnx onnx_ir transformers sentencepiece protobuf safetensors numpy

if ! installed; then
    echo "ort-genai: 'import onnxruntime_genai.models.builder' fails in $VENV; see the pip" \
        "output above" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    echo "ort-genai: warning: $VENV got a CUDA build of torch (not needed for -e cpu)" >&2
fi
"$VENV/bin/python" -c "import onnxruntime_genai as og; print('ort-genai:', og.__version__, 'in $VENV')"
