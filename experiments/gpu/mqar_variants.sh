# MQAR (L=256, kv=16, d_model=128, 2 layers) for the softmax variants and sparse attention of
# issue #18 beside attention and sliding-window attention, on one H200, from the repo root:
# `OUT=$OUT bash experiments/gpu/mqar_variants.sh` (one command, ~6 min: 13 runs, 6 at a time,
# each capped at 150 s, all at 330 s; sinkhorn's causal form is O(T^3) and trains 500 steps,
# NSA and AHN get blocks and windows scaled to L=256: see experiments/mqar_table.py). Writes
# experiments/results/mqar_variants/mqar_variants.{md,json} and copies them to $OUT.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/mqar_variants_out}; mkdir -p "$OUT"
nvidia-smi -L
MIXERS=${MIXERS:-attention,sliding_window,aaren,shaped,sinkhorn,gaussian_adaptive,moh,routing,hat,nsa,ahn,ran,lte}
python3 experiments/mqar_table.py --name mqar_variants --mixers "$MIXERS" \
  --steps "${STEPS:-2000}" --lanes "${LANES:-6}" --run-cap "${RUN_CAP:-150}" \
  --total-cap "${TOTAL_CAP:-330}" 2>&1 | tee "$OUT/mqar_variants.log"
rm -rf experiments/results/mqar_variants/runs/*/checkpoints
cp -r experiments/results/mqar_variants "$OUT/"
