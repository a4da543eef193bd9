# The LRA table on one host with NG GPUs (1 to 8): prepare ListOps and Pathfinder-32 on the CPUs,
# then one training run per (task, family), NG at a time (one per GPU), then the table.
#   OUT=$OUT bash experiments/gpu/lra_table.sh      (repo root; wheels in .whl/)
# Knobs (environment): MIXERS (comma-separated; default every bidirectional family), TASKS
# (listops,pathfinder), SETTING (lra), LISTOPS_STEPS / PF_STEPS (0 = the config's: 5000 /
# 62400), PF_TRAIN (Pathfinder train images; 160000 = LRA's 80% of 200K), LIMIT (s per run).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; DATA=${DATA:-/tmp/lra_data}; mkdir -p $OUT/rows $OUT/logs
TASKS=${TASKS:-listops,pathfinder}; SETTING=${SETTING:-lra}; LIMIT=${LIMIT:-1800}
PF_TRAIN=${PF_TRAIN:-160000}; PF_EVAL=$(( PF_TRAIN / 8 ))
NG=$(nvidia-smi -L | wc -l); CPUS=$(nproc)
MIXERS=${MIXERS:-$(python3 -c "import attnzoo.mixers as m; print(','.join(m.registry.bidirectional_mixers()))")}
start=$(date +%s)
case ",$TASKS," in *,listops,*)
  python3 -m attnzoo data prepare lra/listops --out $DATA/listops --workers $CPUS --quiet ;; esac
case ",$TASKS," in *,pathfinder,*)
  python3 -m attnzoo data prepare lra/pathfinder --out $DATA/pathfinder --workers $CPUS --quiet \
    --config.data.shard_size=500 --config.data.num_train=$PF_TRAIN \
    --config.data.num_val=$PF_EVAL --config.data.num_test=$PF_EVAL ;; esac
echo "data prepared in $(( $(date +%s) - start )) s on $CPUS CPUs"
jobs=()
for t in ${TASKS//,/ }; do for m in ${MIXERS//,/ }; do jobs+=("$t:$m"); done; done
lane() {  # GPU $1 runs jobs $1, $1+NG, ...
  for ((j=$1; j<${#jobs[@]}; j+=NG)); do
    t=${jobs[$j]%%:*}; m=${jobs[$j]#*:}
    steps=$([ $t = listops ] && echo ${LISTOPS_STEPS:-0} || echo ${PF_STEPS:-0})
    CUDA_VISIBLE_DEVICES=$1 timeout $LIMIT python3 experiments/lra_table.py --tasks $t \
      --mixers $m --setting $SETTING --data-root $DATA --workdir $OUT/runs --steps $steps \
      --out $OUT/rows/${t}_$m > $OUT/logs/${t}_$m.log 2>&1 || echo "$t $m failed (rc $?)"
  done
}
for ((g=0; g<NG; g++)); do lane $g & done; wait
python3 experiments/lra_table.py --collect $OUT/rows/*.json --setting $SETTING \
  --out $OUT/lra_table_$SETTING
echo "total $(( $(date +%s) - start )) s"
