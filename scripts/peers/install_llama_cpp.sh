#!/usr/bin/env bash
# Install llama.cpp (through llama-cpp-python, built from its sdist, CPU only) and its GGUF
# converter into a venv of its own, outside the project's environment, so that
# scripts/perplexity_table.py and `vsal bench` can measure it beside vsal on the same weights.
#
#   bash scripts/peers/install_llama_cpp.sh          # -> ${VSAL_PEERS:-/work/peers}/llama-cpp
#
# The build compiles llama.cpp: about 15 minutes on 2 cores. Rerunning it keeps a finished venv.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
PEERS=${VSAL_PEERS:-/work/peers}
VENV="$PEERS/llama-cpp"
PYTHON=${PYTHON:-python3}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, gguf" 2>/dev/null \
    && [ -d "$VENV/share/llama.cpp/conversion" ]; then
    echo "llama-cpp: already installed in $VENV"
    exit 0
fi

mkdir -p "$PEERS"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel setuptools scikit-build-core cmake ninja

# CPU build: no CUDA/Metal; native ISA so the timings are this machine's best.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$VENV/bin/pip" install --no-binary llama-cpp-python --no-build-isolation \
    --no-cache-dir --verbose "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"

# The GGUF converter: convert_hf_to_gguf.py and its `conversion` package ship in the sdist's
# vendored llama.cpp; its Python dependencies (gguf, torch, transformers, sentencepiece,
# safetensors) go in the same venv (torch pinned to 2.13.0, the CPU build; unpinned it pulls a CUDA build of several GB).
SDIST_DIR=$(mktemp -d)
trap 'rm -rf "$SDIST_DIR"' EXIT
"$VENV/bin/pip" download --no-deps --no-binary :all: --no-build-isolation -d "$SDIST_DIR" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
tar -xzf "$SDIST_DIR"/llama_cpp_python-*.tar.gz -C "$SDIST_DIR"
VENDOR=$(echo "$SDIST_DIR"/llama_cpp_python-*/vendor/llama.cpp)
mkdir -p "$VENV/share/llama.cpp"
cp "$VENDOR/convert_hf_to_gguf.py" "$VENV/share/llama.cpp/"
rm -rf "$VENV/share/llama.cpp/conversion"
cp -r "$VENDOR/conversion" "$VENV/share/llama.cpp/"
"$VENV/bin/pip" install "$VENDOR/gguf-py" numpy sentencepiece safetensors transformers "torch==2.13.0"

"$VENV/bin/python" -c "import llama_cpp, gguf; print('llama-cpp:', llama_cpp.__version__, 'in $VENV')"
