#!/usr/bin/env bash
# The CUDA path end to end, timed, in one go: `bash benchmarks/gpu_check.sh [OUT_DIR]` on a GPU machine.
# Needs the real data under $PNEUMONIA_SHARED_DATA (default ../shared/data). Steps: a tiny demo run on
# cuda (stops here if the CUDA path is broken); then, on demo phantoms, a 1-process torchrun (NCCL), a run
# interrupted with Ctrl-C and resumed, --deterministic, a forced fp16 run (GradScaler), evaluate and predict
# on cuda, predict under torchrun (one process per GPU, the same CSV); then the default real run on cuda, the same with --compile,
# with --task cause and with --ensemble 3, a site calibration with AdaBN, the pipeline benchmark where its full-resolution images are present, and
# decode plus one epoch of a 20,000-image synthetic archive (benchmarks/scale_out.py simulate). Set CPU_RUN=runs/X to print
# a CPU run's metrics beside the GPU's.
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED=${PNEUMONIA_SHARED_DATA:-../shared/data}
OUT=${1:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

timed() {  # timed NAME CMD...: run CMD with its log in $OUT/NAME.log; print exit status and wall seconds
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-16s exit %d  %7.1f s wall\n' "$name" "$rc" "$($PY -c "print($EPOCHREALTIME - $t0)")"
  [ $rc -eq 0 ] || tail -25 "$OUT/$name.log"
  return $rc
}

REAL=(--data "$SHARED/chest_xray_224sq" --external "$SHARED/official_test_a_224sq" --device cuda --quiet)
DEMO=(--demo --device cuda --epochs 3 --demo-patients 20 --quiet)
timed demo_cuda $PY main.py "${DEMO[@]}" --out "$OUT/demo_cuda" || exit 1

interrupt_and_resume() {  # a demo run stopped by SIGINT once its first last.pt is written, then --resume to the end
  $PY main.py "${DEMO[@]}" --epochs 20 --out "$OUT/resume_cuda" & local pid=$!  # 20: a GPU must not finish first
  while [ ! -f "$OUT/resume_cuda/last.pt" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  kill -INT "$pid"; wait "$pid"; local rc=$?
  echo "interrupted run: exit $rc (130 expected)"
  [ $rc -eq 130 ] || return 1
  $PY main.py --resume "$OUT/resume_cuda" --device cuda --quiet
}
timed torchrun_nccl $PY -m torch.distributed.run --standalone --nproc_per_node=1 main.py "${DEMO[@]}" \
  --out "$OUT/torchrun_nccl_cuda"
timed resume_cuda interrupt_and_resume
timed deterministic_cuda $PY main.py "${DEMO[@]}" --deterministic --out "$OUT/deterministic_cuda"
timed fp16_cuda $PY main.py "${DEMO[@]}" --precision fp16 --out "$OUT/fp16_cuda" && grep -h '"chosen"' "$OUT/fp16_cuda/metrics.json"
timed evaluate_cuda $PY main.py evaluate --checkpoint "$OUT/demo_cuda/best.pt" --data "$OUT/demo_cuda/split.csv" \
  --device cuda --quiet --out "$OUT/evaluate_cuda"
timed predict_cuda $PY main.py predict "$OUT/demo_cuda/demo_data" --checkpoint "$OUT/demo_cuda/best.pt" --device cuda \
  --cam --out "$OUT/predict_cuda"
# predict sharded by torchrun, one process per GPU (NCCL): its CSV must equal the one-process run's, byte for byte
timed predict_torchrun_cuda $PY -m torch.distributed.run --standalone --nproc_per_node="$(nvidia-smi -L | wc -l)" \
  main.py predict "$OUT/demo_cuda/demo_data" --checkpoint "$OUT/demo_cuda/best.pt" --device cuda --quiet \
  --out "$OUT/predict_torchrun_cuda" \
  && cmp "$OUT/predict_cuda/predictions.csv" "$OUT/predict_torchrun_cuda/predictions.csv" && echo "predict: torchrun CSV identical"
timed default_cuda $PY main.py "${REAL[@]}" --out "$OUT/default_cuda"
timed compile_cuda $PY main.py "${REAL[@]}" --compile --out "$OUT/compile_cuda"
timed cause_cuda $PY main.py "${REAL[@]}" --task cause --out "$OUT/cause_cuda"
timed ensemble3_cuda $PY main.py "${REAL[@]}" --ensemble 3 --out "$OUT/ensemble3_cuda"
timed calibrate_cuda $PY main.py calibrate --checkpoint "$OUT/default_cuda/best.pt" \
  --data "$SHARED/official_test_a_224sq" --adapt-bn --device cuda --quiet --out "$OUT/calibrate_cuda"
if [ -d "$SHARED/chest_xray_fullres_train" ]; then
  timed bench_pipeline $PY benchmarks/bench_pipeline.py --shared "$SHARED" && cat "$OUT/bench_pipeline.log"
else
  echo "bench_pipeline  skipped: $SHARED/chest_xray_fullres_train not present"
fi
# decode plus one epoch at scale: 20,000 synthetic phantoms, first decode into the mapped cache, then main.py --epochs 1
timed simulate_20k $PY benchmarks/scale_out.py simulate --images 20000 --root /tmp/pneumonia-synthetic-20k \
  --out "$OUT/simulate" && cat "$OUT/simulate_20k.log"
$PY - "$OUT" "${CPU_RUN:-}" <<'PYEOF'
import json, sys
from pathlib import Path
import runs as project_runs
runs = {p.name: p for p in sorted(Path(sys.argv[1]).glob("*_cuda")) if (p / "timing.json").exists()}  # training runs
if sys.argv[2]:
    runs["cpu (" + sys.argv[2] + ")"] = Path(sys.argv[2])
for name, run in runs.items():
    m = project_runs.read_metrics(run / "metrics.json")
    t = json.loads((run / "timing.json").read_text())
    sets = {name: block["rates"] for name, block in m["sets"].items()}
    text = "; ".join(f"{s}: " + " ".join(f"{k} {v[k]:.3f}" for k in ("auc", "accuracy", "sensitivity", "specificity"))
                     for s, v in sets.items())
    causes = {name: block.get("cause") for name, block in m["sets"].items()}
    text += "".join(f"; {s} bacterial vs viral AUC {c['bacterial_vs_viral']['auc']:.3f}" for s, c in causes.items() if c)
    print(f"{name:<16} {t['epochs_run']} epochs, {t['seconds_since_data_loaded']:.1f} s after data load | {text}")
PYEOF
