#!/usr/bin/env bash
# Loading and generating within a memory budget, on one GPU, in fresh processes, each with its device
# memory capped at process start (engine_bench.py --cap-gib), generating 704x384 down the ladder.
#
#   bash benchmarks/gpu_loading.sh OUT checkpoint [CHECKPOINT_DIR]   write a full-size official-layout
#       checkpoint from seeded random weights, then load it (and random weights) under 16-48 GiB caps
#   bash benchmarks/gpu_loading.sh OUT random PRECISION               random weights only: PRECISION
#       (fp8 or bf16) uncapped, then under the caps the issue names for it; a 4-clip timed segment and
#       a segment continued from it
#   bash benchmarks/gpu_loading.sh OUT chain PRECISION                under a 24 GiB cap, two
#       consecutive segments of 16 clips (30.7 s, the line's default length), the second continued
#       from the first, as a GPU worker runs a lecture's segments
#
# Results: OUT/loading.json (one entry per run this machine has made, calls before this one included,
# in order), the log on stdout. Runs are ordered by importance; a run that did not finish is absent.
set -u
out=${1:?OUT}
mode=${2:?checkpoint, random or chain}
res=/tmp/loading-results
mkdir -p "$out" "$res"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n=$(ls "$res" | wc -l)
bench() {  # name, then engine_bench arguments
  local name=$1; shift
  n=$((n + 1))
  echo "=== $name"
  python3 benchmarks/engine_bench.py "$res/$(printf %02d $n)-$name" --sizes 704x384 --chains eager "$@"
  python3 - "$res" "$out/loading.json" <<'PY'
import json, pathlib, sys
runs = []
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "engine_bench.json"
    runs.append({"run": d.name, **(json.loads(f.read_text()) if f.exists() else {"error": "no result"})})
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
PY
}
if [ "$mode" = random ]; then
  p=${3:?PRECISION}
  caps=(24 16)
  [ "$p" = bf16 ] && caps=(48 24)
  bench "random-$p-uncapped" --precisions "$p" --clips 4
  for cap in "${caps[@]}"; do bench "random-$p-cap$cap" --precisions "$p" --clips 4 --cap-gib "$cap"; done
  exit 0
fi
if [ "$mode" = chain ]; then
  p=${3:?PRECISION}
  bench "chain-$p-cap24" --precisions "$p" --clips 16 --segments 2 --no-continue --cap-gib 24
  exit 0
fi
ckpt=${3:-/tmp/ckpt}
python3 benchmarks/full_checkpoint.py "$ckpt" || exit 1
du -sh "$ckpt"
two=(--clips 2 --no-continue)
bench ckpt-fp8-uncapped "${two[@]}" --checkpoint-dir "$ckpt" --precisions fp8
bench ckpt-fp8-cap24 "${two[@]}" --checkpoint-dir "$ckpt" --precisions fp8 --cap-gib 24
bench ckpt-bf16-cap24 "${two[@]}" --checkpoint-dir "$ckpt" --precisions bf16 --cap-gib 24
bench ckpt-bf16-uncapped "${two[@]}" --checkpoint-dir "$ckpt" --precisions bf16
bench random-fp8-cap24 "${two[@]}" --precisions fp8 --cap-gib 24
bench ckpt-bf16-cap48 "${two[@]}" --checkpoint-dir "$ckpt" --precisions bf16 --cap-gib 48
bench random-bf16-cap24 "${two[@]}" --precisions bf16 --cap-gib 24
bench ckpt-fp8-cap16 "${two[@]}" --checkpoint-dir "$ckpt" --precisions fp8 --cap-gib 16
