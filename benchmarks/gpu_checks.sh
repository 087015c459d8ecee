#!/usr/bin/env bash
# Issue 13's GPU measurements in one run, for a session that is lent a GPU for a few minutes:
#   bash benchmarks/gpu_checks.sh OUT_DIR            # on the GPU (~5-8 minutes on an H100/H200)
#   QUICK=1 bash benchmarks/gpu_checks.sh OUT_DIR    # the same sequence at toy sizes on a CPU, to test it
# Needs medsemi importable with its dependencies (pip install -e .; on a machine without internet, carry
# the wheels). Writes into OUT_DIR one log per step (env.log: versions and device), one JSON per benchmark,
# and summary.txt; the synthetic dataset and the training runs (checkpoints) go to a scratch folder, WORK.
# Every step runs even if an earlier one failed; the exit status says whether all of them succeeded.
set -uo pipefail
OUT=${1:-gpu_checks}
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
if [ "${QUICK:-0}" = 1 ]; then
  DEVICE=cpu SIZE=32 BASE=2 ROUNDS=3 ITERS=2 VSIZE=32 VBATCH=2 VFILTERS=4 SYNTH=64 PATCH=32 STEPS=4 BASE_E2E=2
  export OMP_NUM_THREADS=1
else
  DEVICE=cuda SIZE=256 BASE=64 ROUNDS=60 ITERS=30 VSIZE=96 VBATCH=8 VFILTERS=16 SYNTH=800 PATCH=256 STEPS=300 BASE_E2E=64
fi
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  if ! "$@" > "$OUT/$name.log" 2>&1; then
    echo "   FAILED (see $OUT/$name.log)" | tee -a "$OUT/summary.txt"; status=1
  fi
  tail -n 6 "$OUT/$name.log" | sed 's/^/   /' >> "$OUT/summary.txt"
}

step env "$PY" -c "import torch, platform; print(torch.__version__, platform.python_version(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
# grouped / fused: channels-last (the CUDA default, where grouped_norm=auto is loop), then NCHW with interleaved
step grouped_channels_last "$PY" benchmarks/grouped_overhead.py --device "$DEVICE" --size "$SIZE" \
  --base-channels "$BASE" --amp bf16 --rounds "$ROUNDS" --variants fused,grouped/loop,grouped/one_pass \
  --out "$OUT/grouped_channels_last.json"
step grouped_nchw "$PY" benchmarks/grouped_overhead.py --device "$DEVICE" --size "$SIZE" --base-channels "$BASE" \
  --amp bf16 --rounds "$ROUNDS" --channels-last false --variants fused,grouped/interleaved,grouped/loop \
  --out "$OUT/grouped_nchw.json"
# every forward mode against its model floor, and what sampling + augmentation add (--data pool)
step train_speed "$PY" benchmarks/train_speed.py --device "$DEVICE" --size "$SIZE" --base-channels "$BASE" \
  --amp bf16 --methods midss,ustrun --iters "$ITERS" --out "$OUT/train_speed.json"
step train_speed_pool "$PY" benchmarks/train_speed.py --device "$DEVICE" --size "$SIZE" --base-channels "$BASE" \
  --amp bf16 --methods supervised,ustrun:grouped --kinds multilabel --data pool --iters "$ITERS" \
  --out "$OUT/train_speed_pool.json"
# VerSemi: fp32 (TF32) and bf16, stage 1 and stage 2 steps
step versemi_fp32 "$PY" benchmarks/versemi_speed.py --device "$DEVICE" --size "$VSIZE" --batch "$VBATCH" \
  --base-filters "$VFILTERS" --out "$OUT/versemi_fp32.json"
step versemi_bf16 "$PY" benchmarks/versemi_speed.py --device "$DEVICE" --size "$VSIZE" --batch "$VBATCH" \
  --base-filters "$VFILTERS" --amp bf16 --out "$OUT/versemi_bf16.json"
# end to end: medsemi train on 800x800 fundus-format folders, UST-RUN grouped and separate (it/s in the logs)
step synth "$PY" -m medsemi.cli data synth "$WORK/fundus$SYNTH" --size "$SYNTH" --overwrite
for mode in grouped separate; do
  step "train_ustrun_$mode" "$PY" -m medsemi.cli train configs/fundus/ustrun.yaml "data.root=$WORK/fundus$SYNTH" \
    "data.patch_size=$PATCH" "model.base_channels=$BASE_E2E" "method.forward_mode=$mode" "train.iterations=$STEPS" \
    train.eval_every=100000 train.checkpoint_every=100000 train.log_every=20 --no-eval --run-dir "$WORK/run_$mode"
done
echo "exit status $status" | tee -a "$OUT/summary.txt"
exit $status
