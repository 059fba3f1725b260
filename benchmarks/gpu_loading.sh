#!/usr/bin/env bash
# Loading within a memory budget, on one GPU: write a full-size official-layout checkpoint from seeded
# random weights, then in fresh processes, each with its device memory capped at process start, load
# it (or random weights) and generate 704x384 clips down the ladder. Results: OUT/loading.json (one
# entry per run, in order), OUT/log.txt. Runs are ordered by importance; a run that did not finish in
# time is absent.        bash benchmarks/gpu_loading.sh OUT [CHECKPOINT_DIR]
set -u
out=${1:?OUT}
ckpt=${2:-/tmp/ckpt}
res=/tmp/loading-results
mkdir -p "$out" "$res"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/full_checkpoint.py "$ckpt" || exit 1
du -sh "$ckpt"
common=(--sizes 704x384 --chains eager --clips 2 --no-continue)
n=0
bench() {  # name, then engine_bench arguments
  local name=$1; shift
  n=$((n + 1))
  echo "=== $name"
  python3 benchmarks/engine_bench.py "$res/$(printf %02d $n)-$name" "${common[@]}" "$@"
  python3 - "$res" "$out/loading.json" <<'PY'
import json, pathlib, sys
runs = []
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "engine_bench.json"
    runs.append({"run": d.name, **(json.loads(f.read_text()) if f.exists() else {"error": "no result"})})
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
PY
}
bench ckpt-fp8-uncapped --checkpoint-dir "$ckpt" --precisions fp8
bench ckpt-fp8-cap24 --checkpoint-dir "$ckpt" --precisions fp8 --cap-gib 24
bench ckpt-bf16-cap24 --checkpoint-dir "$ckpt" --precisions bf16 --cap-gib 24
bench ckpt-bf16-uncapped --checkpoint-dir "$ckpt" --precisions bf16
bench random-fp8-cap24 --precisions fp8 --cap-gib 24
bench ckpt-bf16-cap48 --checkpoint-dir "$ckpt" --precisions bf16 --cap-gib 48
bench random-bf16-cap24 --precisions bf16 --cap-gib 24
bench ckpt-fp8-cap16 --checkpoint-dir "$ckpt" --precisions fp8 --cap-gib 16
