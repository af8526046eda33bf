#!/usr/bin/env bash
# GPU readiness check of cryofield, in one call (under 8 minutes on one GPU).
#
#   bash benchmarks/gpu_check.sh                 # results in $OUT, default ./gpu_out
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # dry run on a CPU
#
# Stages (each with a time cap; the whole script stops starting new work after
# GPU_CHECK_SECONDS, default 450 s):
#   1. environment: torch, CUDA, the GPU (env.json, nvidia-smi.txt);
#   2. the CUDA tests: pytest -m cuda tests/inference/test_cuda.py (pytest_cuda.log/.xml);
#   3. step throughput and peak GPU memory per phase (search, gradient, local) at D=128,
#      homogeneous and zdim 8, with the defaults of cryofield train on the device
#      (benchmarks/bench_step.py -> step/bench_step.json);
#   4. a short ab initio run: cryofield simulate (demo-homo: 5000 images, D=64, SNR 0.1),
#      cryofield train with its defaults, cryofield evaluate -> pose errors
#      (abinitio/evaluate.json, run.log, metrics.jsonl, verdict.json; the data and the
#      checkpoints stay in $GPU_CHECK_WORK, default /tmp/cryofield_gpu_check).
# Everything is summed up in $OUT/gpu_check.json. Python: the first of .venv/bin/python,
# python3, python whose torch sees CUDA; the package is imported from src/ when it is not
# installed (pip install -e . is tried when its dependencies are missing).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_out}
WORK=${GPU_CHECK_WORK:-/tmp/cryofield_gpu_check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
BUDGET=${GPU_CHECK_SECONDS:-450}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
# Python: the first of .venv/bin/python, python3, python whose torch sees CUDA (any of
# them with GPU_CHECK_DEVICE=cpu; a carried .venv may hold a CPU-only torch)
PY=
for c in "$REPO/.venv/bin/python" python3 python; do
    command -v "$c" > /dev/null 2>&1 || continue
    [ -z "$PY" ] && "$c" -c "import torch" 2>/dev/null && PY=$c  # fallback: has torch
    if [ "$DEVICE" = cpu ] || "$c" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=$c
        break
    fi
done
PY=${PY:-python3}
# the package: installed, else from src/ (its dependencies must be there; else try pip)
if ! "$PY" -c "import cryofield" 2>/dev/null; then
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import cryofield.cli.main" > "$OUT/setup.log" 2>&1; then
        "$PY" -m pip install -e "$REPO[test]" >> "$OUT/setup.log" 2>&1 \
            || echo "cryofield is not importable with $PY: see $OUT/setup.log"
    fi
fi
echo "python: $PY"
export PYTHONUNBUFFERED=1
START=$(date +%s)
STAGES=$OUT/stages.jsonl
: > "$STAGES"

if [ "$TINY" = 1 ]; then
    STEP_ARGS=(-D 32 -n 256 --batches 2 --warmup 1)
    SIM_ARGS=(-n 300 -D 32 --apix 8 --snr 0.4)
    TRAIN_ARGS=(--epochs 2)
else
    STEP_ARGS=(-D 128 -n 4096 --batches 10 --warmup 2)
    SIM_ARGS=()
    TRAIN_ARGS=()
fi

# run NAME CAP_S CMD...: run CMD with at most min(CAP_S, time left) seconds, log it to
# $OUT/NAME.log and record its exit status and time in stages.jsonl
run() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$cap" ]; then cap=$left; fi
    if [ "$cap" -lt 10 ]; then
        echo "{\"stage\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"no time left\"}" >> "$STAGES"
        echo "== $name: skipped (no time left)"
        return 1
    fi
    echo "== $name (at most ${cap} s)"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(($(date +%s) - t0))
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)}" >> "$STAGES"
    tail -n 5 "$OUT/$name.log"
    return $rc
}

# 1. environment
"$PY" - > "$OUT/env.json" 2> "$OUT/env.err" <<'EOF'
import json, os, platform, sys, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda, "host": platform.node(),
        "cpus": os.cpu_count(), "device": os.environ.get("GPU_CHECK_DEVICE", "cuda"),
        "python": sys.executable}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gb=p.total_memory / 2**30,
                bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info, indent=2))
EOF
cat "$OUT/env.json"
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 2. CUDA tests (skipped, not failed, without a GPU)
run pytest_cuda 120 "$PY" -m pytest -q -m cuda tests/inference/test_cuda.py -p no:cacheprovider \
    --junitxml="$OUT/pytest_cuda.xml"

# 3. step throughput and peak memory per phase
run step 150 "$PY" benchmarks/bench_step.py --device "$DEVICE" --zdim 0 8 -o "$WORK/step" \
    "${STEP_ARGS[@]}"
mkdir -p "$OUT/step"
cp "$WORK/step/bench_step.json" "$OUT/step/" 2>/dev/null

# 4. a short ab initio run, scored against the truth
CF=("$PY" -m cryofield.cli.main)
mkdir -p "$OUT/abinitio"
if [ ! -f "$WORK/sim/truth.npz" ]; then
    run simulate 90 "${CF[@]}" simulate -o "$WORK/sim" --preset demo-homo "${SIM_ARGS[@]}"
fi
rm -rf "$WORK/run"
# the train stage gets what is left but 60 s for the evaluation
LEFT=$((BUDGET - ($(date +%s) - START) - 60))
run train "$LEFT" "${CF[@]}" train "$WORK/sim/particles.star" -o "$WORK/run" --device "$DEVICE" \
    "${TRAIN_ARGS[@]}"
run evaluate 60 "${CF[@]}" evaluate "$WORK/run" --truth "$WORK/sim/truth.npz" \
    --ceiling-max-images 0 -o "$OUT/abinitio/evaluate.json"
for f in run.log metrics.jsonl verdict.json config.yaml; do
    cp "$WORK/run/$f" "$OUT/abinitio/" 2>/dev/null
done

# summary
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(p):
    try:
        return json.loads((out / p).read_text())
    except Exception:
        return None
stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines() if x.strip()]
tests = None
try:
    import xml.etree.ElementTree as ET
    s = ET.parse(out / "pytest_cuda.xml").getroot()
    s = s if s.tag == "testsuite" else s[0]
    tests = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception:
    pass
metrics = []
try:
    metrics = [json.loads(x) for x in (out / "abinitio/metrics.jsonl").read_text().splitlines()]
except Exception:
    pass
ev = load("abinitio/evaluate.json")
summary = {
    "env": load("env.json"), "stages": stages, "cuda_tests": tests,
    "step": load("step/bench_step.json"),
    "abinitio": {
        "epochs": len(metrics),
        "phases": [m.get("phase") for m in metrics],
        "images_s_by_epoch": [round(m.get("images_s") or 0, 1) for m in metrics],
        "time_s": round(sum(m.get("time_s") or 0 for m in metrics), 1),
        "verdict": load("abinitio/verdict.json"),
        "pose_errors": (ev or {}).get("poses") or (ev or {}).get("pose_errors"),
        "evaluate": ev,
    },
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: summary[k] for k in ("stages", "cuda_tests")}, indent=1))
for r in summary["step"] or []:
    print(f"step D={r['D']} zdim={r['zdim']} {r['phase']}: {r['images_s']:.1f} images/s, "
          f"peak {r['peak_memory_mb']:.0f} MB")
print("ab initio:", json.dumps({k: v for k, v in summary["abinitio"].items() if k != "evaluate"},
                               default=str)[:2000])
EOF
echo "results in $OUT (total $(($(date +%s) - START)) s)"
