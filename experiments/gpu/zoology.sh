# Zoology Figure 2 (and the Based frontier) on one H200, from the repo root; every call stays
# inside one <= 9-minute command and resumes from experiments/results/zoology/cells.json, so
# copy $OUT/zoology/*.json back into experiments/results/zoology/ before the next call.
#
#   bash experiments/gpu/zoology.sh calibrate     # 8 cells, 2 epochs: tokens/s per epoch
#   ZOOLOGY_EPOCHS=4 bash experiments/gpu/zoology.sh grid    # repeat until "all cells recorded"
#   ZOOLOGY_EPOCHS=4 bash experiments/gpu/zoology.sh grid --L 64,128   # or a subset per call
#   bash experiments/gpu/zoology.sh frontier --models based,mamba,h3,hyena --epochs 4
#
# Results (cells.json, figure2.md/png, frontier.*, logs) are copied to $OUT/zoology. Runs and
# the packs' checkpoints (every 2 epochs) stay in workdirs/ (ignored, kept on a warm machine):
# there a cell cut by the timeout resumes from its last checkpoint, and finished runs are not
# re-run even if cells.json was not copied back.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/zoology_out}; mkdir -p "$OUT/zoology"
nvidia-smi -L
what=${1:-grid}; shift || true
budget=${ZOOLOGY_BUDGET_S:-420}  # start no cell after 7 min; the timeout is the hard stop
start=$SECONDS
case "$what" in
  calibrate)
    timeout 530 python3 experiments/zoology_fig2.py --L 64,512 --d 64,512 \
      --mixers attention,mamba --epochs 2 --time_budget_s "$budget" \
      --out experiments/results/zoology/calibration --workdir "$OUT/zoology/calibration_runs" "$@" \
      2>&1 | tail -40 | tee "$OUT/zoology/calibrate.log"
    cp -r experiments/results/zoology/calibration "$OUT/zoology/" ;;
  grid)
    timeout 530 python3 experiments/zoology_fig2.py --epochs "${ZOOLOGY_EPOCHS:-64}" \
      --time_budget_s "$budget" --checkpoint_epochs 2 "$@" \
      2>&1 | tail -60 | tee "$OUT/zoology/grid.log" ;;
  frontier)
    timeout 530 python3 experiments/based_frontier.py --time_budget_s "$budget" \
      --checkpoint_epochs 2 "$@" 2>&1 | tail -60 | tee "$OUT/zoology/frontier.log" ;;
  *) echo "usage: $0 calibrate|grid|frontier [script options]"; exit 2 ;;
esac
echo "$what: $((SECONDS - start)) s" | tee -a "$OUT/zoology/times.log"
cp experiments/results/zoology/*.json experiments/results/zoology/*.md \
  experiments/results/zoology/*.png "$OUT/zoology/" 2>/dev/null
true
