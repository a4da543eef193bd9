# ICL reproductions on one H200, from the repo root: `bash experiments/gpu/icl.sh f1 f3 f4 f5`
# runs the figures at once, one process each (small models: the GPU has room, the host's cores
# compile in parallel); `FAMILIES=1` adds the per-mixer F1 table (`f1 --families`, WORKERS
# threads). Every process stops at ICL_TIMEOUT seconds (one 10-minute device command in all).
# Results (markdown, json, png) go to $OUT/icl.tgz (one file: the device returns few), logs
# to $OUT/<figure>.log.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/icl_out}; mkdir -p "$OUT"; T=${ICL_TIMEOUT:-540}
nvidia-smi -L
run() {  # name, then the arguments of experiments/icl.py
  local name=$1; shift
  timeout "$T" python3 experiments/icl.py "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? at $SECONDS s" | tee -a "$OUT/times.log"
}
for f in ${*:-f1 f3 f4 f5}; do run "$f" "$f" & done
[ -n "$FAMILIES" ] && run families f1 --families --workers "${WORKERS:-8}" &
wait
tar czf "$OUT/icl.tgz" -C experiments/results icl
grep -h "PASS\|FAIL" "$OUT"/*.log
