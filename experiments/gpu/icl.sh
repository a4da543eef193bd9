# ICL reproductions on one H200, from the repo root: `bash experiments/gpu/icl.sh f2 f3 f5`, then
# `bash experiments/gpu/icl.sh f4 f1` (each call stays inside one 10-minute command). Results
# (markdown, json, png, logs) are copied to $OUT.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/icl_out}; mkdir -p "$OUT"
nvidia-smi -L
FIGS=${*:-f2 f3 f5 f4 f1}
for f in $FIGS; do
  start=$SECONDS
  timeout "${ICL_TIMEOUT:-280}" python3 experiments/icl.py $f 2>&1 | tail -40 | tee "$OUT/$f.log"
  echo "$f: $((SECONDS - start)) s" | tee -a "$OUT/times.log"
  cp -r experiments/results/icl "$OUT/" 2>/dev/null
done
