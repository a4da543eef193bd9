# MQAR (L=256, kv=16, d_model=128, 2 layers) for the mixers of issue #17 and attention, on one
# H200, from the repo root: `OUT=$OUT bash experiments/gpu/mqar_ssm.sh` (one command, ~6 min:
# 12 runs, 6 at a time on the GPU, each capped at 150 s, all at 330 s). Writes
# experiments/results/mqar_ssm/mqar_ssm.{md,json} (+ per-run logs) and copies them to $OUT.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/mqar_ssm_out}; mkdir -p "$OUT"
nvidia-smi -L
python3 experiments/mqar_table.py --name mqar_ssm ${MIXERS:+--mixers $MIXERS} \
  --steps "${STEPS:-2000}" --lanes "${LANES:-6}" --run-cap "${RUN_CAP:-150}" \
  --total-cap "${TOTAL_CAP:-330}" 2>&1 | tee "$OUT/mqar_ssm.log"
rm -rf experiments/results/mqar_ssm/runs/*/checkpoints
cp -r experiments/results/mqar_ssm "$OUT/"
