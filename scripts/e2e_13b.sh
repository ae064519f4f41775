#!/usr/bin/env bash
# The 13b package end to end on one machine (issue 13, item 5): export, the int8 encoders, the int4
# decoder (and its fused twin), one answer with one stage in memory at a time, the bench.
# Each step runs under /usr/bin/time -v; its log and peak RSS go to LOGS.
#   bash scripts/e2e_13b.sh [PACKAGE] [LOGS]      (about 75 GB of free disk; 2 h on 2 cores)
set -euo pipefail
PKG=${1:-models/vs13b}
LOGS=${2:-runs/e2e_13b}
VENV=${VENV:-.venv}
mkdir -p "$LOGS"
ENCODERS=vision_encoder,frame_qformer,whisper_encoder,beats_encoder,mrc_qformer

step() {  # step NAME COMMAND...: run it timed, then say its wall time and peak RSS
  local name=$1
  shift
  /usr/bin/time -v "$@" >"$LOGS/$name.log" 2>&1 || { tail -20 "$LOGS/$name.log"; exit 1; }
  echo "$name: $(grep 'Elapsed' "$LOGS/$name.log" | awk '{print $NF}') wall," \
    "peak RSS $(grep 'Maximum resident' "$LOGS/$name.log" | awk '{printf "%.2f GiB", $NF / 1048576}')"
}

[ -f "$PKG/manifest.json" ] || step export "$VENV/bin/vsal-export" export --preset 13b --output "$PKG"
# random weights: the end-to-end agreement is meaningless (docs/performance.md), hence --allow-below
step build_int8 "$VENV/bin/vsal-export" build "$PKG" --precision int8 --graphs "$ENCODERS" --allow-below
step build_int4 "$VENV/bin/vsal-export" build "$PKG" --precision int4 --allow-below  # random weights: see docs/performance.md
"$VENV/bin/python" -c "from vsal.runtime.synthetic import write_clip; write_clip('$LOGS/clip.mp4', seconds=8.0)"
step run "$VENV/bin/vsal" run "$PKG" --video "$LOGS/clip.mp4" --prompt "What happens in this clip?" \
  --precision int4 --max-new-tokens 16 --beams 5 --low-memory --json
step bench "$VENV/bin/vsal" bench "$PKG" --precision int4 --runs 2 --max-new-tokens 16 --media "$LOGS/clip.mp4" \
  --low-memory
du -sh "$PKG" "$PKG"/graphs/* | tee "$LOGS/disk.txt"
