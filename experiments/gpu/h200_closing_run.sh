# One call on a 4-GPU H200 host: the attention and linear benchmarks and the compiled kernel
# tests, one GPU per job, in parallel (Triton compiles use the 64 host cores).
#   OUT=$OUT LIMIT=480 bash experiments/gpu/h200_closing_run.sh   (repo root; wheels in .whl/)
# GPU 0: attention benchmark. GPU 1: linear benchmark of LIN1 (with fla in its own process and
# the peak-memory table), then the linear-attention kernel tests. GPU 2: linear benchmark of
# LIN2, then the delta-rule kernel tests. GPU 3: the flash kernel tests. The linear tables are
# merged into one.
# JOBS (default "att lin1 lin2 tests") picks the jobs to run.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/att $OUT/lin1 $OUT/lin2 $OUT/lin
LIMIT=${LIMIT:-480}
JOBS=${JOBS:-att lin1 lin2 tests}
LIN1=${LIN1:-linear,scalar,normalized}
LIN2=${LIN2:-vector,rwkv6,delta_rule}
has() { case " $JOBS " in *" $1 "*) return 0;; esac; return 1; }
nvidia-smi -L
has att && (export CUDA_VISIBLE_DEVICES=0
 timeout $LIMIT python3 -m attnzoo bench attention --impls pallas,cudnn,mha --out-dir $OUT/att \
   > $OUT/att.log 2>&1) &
has lin1 && (export CUDA_VISIBLE_DEVICES=1
 timeout $((LIMIT - 180)) python3 -m attnzoo.bench.linear --variants $LIN1 --fla-timeout 120 \
   --out-dir $OUT/lin1 > $OUT/lin1.log 2>&1
 ATTNZOO_KERNEL_IMPL=pallas timeout 170 python3 -m pytest -q -p no:cacheprovider \
   tests/pallas_kernels/test_linear_attention_kernel.py > $OUT/linear_tests.log 2>&1) &
has lin2 && (export CUDA_VISIBLE_DEVICES=2
 timeout $((LIMIT - 100)) python3 -m attnzoo.bench.linear --fla off --memory "" --variants $LIN2 \
   --out-dir $OUT/lin2 > $OUT/lin2.log 2>&1
 ATTNZOO_KERNEL_IMPL=pallas timeout 90 python3 -m pytest -q -p no:cacheprovider \
   tests/pallas_kernels/test_delta_rule_kernel.py > $OUT/delta_tests.log 2>&1) &
has tests && (export CUDA_VISIBLE_DEVICES=3 ATTNZOO_KERNEL_IMPL=pallas
 timeout $((LIMIT - 10)) python3 -m pytest -q -p no:cacheprovider \
   tests/pallas_kernels/test_flash_attention.py > $OUT/flash_tests.log 2>&1) &
wait
jsons=$(ls $OUT/lin1/*.json $OUT/lin2/*.json 2>/dev/null | paste -sd,)
[ -n "$jsons" ] && python3 -m attnzoo.bench.linear --merge $jsons --out-dir $OUT/lin > /dev/null
for f in att lin1 lin2; do [ -f $OUT/$f.log ] && grep -v '^{' $OUT/$f.log | grep -E "^\||fail|Error" | tail -40; done
for f in flash_tests delta_tests linear_tests; do [ -f $OUT/$f.log ] && tail -4 $OUT/$f.log; done
