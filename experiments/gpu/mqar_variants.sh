# MQAR (L=256, 16 key-value pairs, d_model=128, 2 layers, configs/mqar.py defaults otherwise:
# lr 3e-3, batch 64, early stop at 0.99 accuracy) for the softmax variants of issue 18 beside
# attention and sliding-window attention, on one H200, from the repo root:
#   OUT=$OUT bash experiments/gpu/mqar_variants.sh          (wheels in .whl/, as the other scripts)
# The models are tiny and launch-bound (~2 ms/step for attention), so every run shares the one
# GPU at once (XLA memory fraction 1/NRUN each) and compiles on its own CPU cores; STEPS=2000
# (evaluated every 250 steps) keeps the whole call near 4-6 minutes; sinkhorn's causal form is
# O(T^3) (Sinkhorn over every query's prefix block), so it gets SINKHORN_STEPS=500 (the table
# lists each run's steps). One learning rate, one seed (0): a screening table, not a sweep.
# Knobs (environment): MIXERS, STEPS, SINKHORN_STEPS, LIMIT (s per run). Writes the table (markdown + json) to
# $OUT and to experiments/results/mqar_variants/.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/runs $OUT/logs
MIXERS=${MIXERS:-attention,sliding_window,aaren,shaped,sinkhorn,gaussian_adaptive,moh,routing,hat}
STEPS=${STEPS:-2000}; LIMIT=${LIMIT:-330}
nvidia-smi -L
NRUN=$(echo $MIXERS | tr , '\n' | wc -l)
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $NRUN, 3))")
start=$(date +%s)
for m in ${MIXERS//,/ }; do
  steps=$([ $m = sinkhorn ] && echo ${SINKHORN_STEPS:-500} || echo $STEPS)
  timeout $LIMIT python3 -m attnzoo train --quiet --workdir $OUT/runs/$m \
    --config configs/mqar.py:mixer=$m,d_model=128,num_layers=2,seq_len=256,num_kv_pairs=16,num_steps=$steps \
    --config.train.eval_every=250 --config.train.checkpoint_every=$steps \
    > $OUT/logs/$m.log 2>&1 || echo "$m failed or timed out (rc $?)" &
done
wait
echo "all runs: $(( $(date +%s) - start )) s"
python3 - "$OUT" "$MIXERS" <<'EOF'
import json, pathlib, sys
out, mixers = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
rows = []
for m in mixers:
  path = out / "runs" / m / "summary.json"
  s = json.loads(path.read_text()) if path.exists() else {}
  rows.append({"mixer": m, **s})
lines = [
  "# MQAR, L=256, 16 KV pairs, d_model=128, 2 layers (H200, seed 0, lr 3e-3, batch 64)",
  "",
  "Written by experiments/gpu/mqar_variants.sh. state size: bytes a decoder keeps per example "
  "at L=256 over both layers (float32, as Zoology counts).",
  "",
  "| mixer | accuracy | state size (bytes) | params | steps | status | wall (s) |",
  "|---|---|---|---|---|---|---|",
]
for r in rows:
  if "status" not in r:
    lines.append(f"| {r['mixer']} | — | — | — | — | failed or timed out (see logs) | — |")
    continue
  lines.append(
    f"| {r['mixer']} | {r.get('eval/accuracy', float('nan')):.4f} | {r['state_size']:,} | "
    f"{r['params']:,} | {r['step']} | {r['status']} | {r['wall_time_s']:.0f} |"
  )
text = "\n".join(lines) + "\n"
for d in (out, pathlib.Path("experiments/results/mqar_variants")):
  d.mkdir(parents=True, exist_ok=True)
  (d / "mqar_variants.md").write_text(text)
  (d / "mqar_variants.json").write_text(json.dumps(rows, indent=2))
print(text)
EOF
echo "total $(( $(date +%s) - start )) s"
