#!/usr/bin/env bash
# A real-accelerator check of laser_jax on one GPU, run from the repository root:
#
#   bash bench/accelerator_smoke.sh [OUT_DIR]        # default OUT_DIR: /tmp/laser_jax_accel
#
# 1. the embedded default trains 6 RL steps with periodic eval and checkpoints, then resumes to 8
#    (orbax restore on the accelerator);
# 2. a Qwen2.5-0.5B-shaped model (random init, model.dtype=auto: bfloat16 and cuDNN attention on
#    an H100/H200) runs 3 full RL steps at 256 rows x 512 new tokens: perf/* per step in
#    OUT_DIR/qwen05b/metrics.jsonl, MFU against the H100/H200 dense bf16 peak (989 TFLOP/s);
# 3. bench/train_step.py and bench/sampler.py (transformers on the same GPU) write their JSON.
# Each part has its own time limit (seconds: TINY_S, RESUME_S, QWEN_S, STEP_S, SAMPLER_S), so one
# slow part does not cost the others; a part's log is OUT_DIR/<part>.log. PARTS="qwen05b sampler"
# runs only those parts. Needs the project installed (pip install -e '.[gpu]') or on PYTHONPATH.
set -u
OUT=${1:-/tmp/laser_jax_accel}
mkdir -p "$OUT"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
PARTS=" ${PARTS:-tiny_train tiny_resume qwen05b train_step sampler} "  # the parts to run
part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs, reports the status.
  local name=$1 limit=$2; shift 2
  [[ "$PARTS" == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s (log $OUT/$name.log)"
  tail -n 4 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

TINY=(--config=configs/tiny_cpu.py --config.workdir="$OUT/tiny" --config.sft.steps=60 --config.eval_every=3
      --config.checkpoint_every=3 --config.log_every=1)
part tiny_train ${TINY_S:-110} $PY -m laser_jax.train "${TINY[@]}" --config.total_steps=6
part tiny_resume ${RESUME_S:-80} $PY -m laser_jax.train "${TINY[@]}" --config.total_steps=8

part qwen05b ${QWEN_S:-170} $PY -m laser_jax.train --config=configs/tiny_cpu.py --config.workdir="$OUT/qwen05b" \
  --config.model.preset=qwen2.5-0.5b --config.model.dtype=auto --config.sft.steps=0 \
  --config.batch_size=32 --config.rollout.n=8 --config.rollout.max_new_tokens=512 \
  --config.eval.max_new_tokens=512 --config.micro_batch_size=64 --config.total_steps=3 \
  --config.eval_every=0 --config.checkpoint_every=100 --config.log_every=1 \
  --config.mfu_peak_flops=989e12 --config.logging.samples_every=0
[[ -f "$OUT/qwen05b/metrics.jsonl" ]] && $PY - "$OUT/qwen05b/metrics.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
         if k == "step" or k.startswith("perf/") or k in ("rollout/response_length_mean", "rollout/truncated_frac")})
PYEOF

part train_step ${STEP_S:-110} $PY bench/train_step.py --out "$OUT/train_step.json"
part sampler ${SAMPLER_S:-90} $PY bench/sampler.py --torch-device=cuda --repeats 3 \
  --measurements "${SAMPLER_MEASUREMENTS:-1,2,3,4,5}" --out "$OUT/sampler.json"
