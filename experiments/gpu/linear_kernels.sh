# H200 run for the linear-attention kernels on a 2-GPU host: GPU 0 times the kernel pieces
# (experiments/gpu/profile_linear.py, PROFILE_ARGS), GPU 1 runs the benchmark (pallas only,
# BENCH_ARGS); then the compiled kernel tests if TESTS=1.
# Usage on the GPU machine (repo root; ml_collections/fla wheels in .whl/):
#   OUT=$OUT bash experiments/gpu/linear_kernels.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/bench
LIMIT=${LIMIT:-300}
nvidia-smi -L
(export CUDA_VISIBLE_DEVICES=0
 timeout $LIMIT python3 experiments/gpu/profile_linear.py ${PROFILE_ARGS:-} > $OUT/linear_profile.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout $LIMIT python3 -m attnzoo.bench.linear --impls pallas --fla off --memory "" \
   --variants ${VARIANTS:-linear,scalar,vector,rwkv6,normalized} --out-dir $OUT/bench ${BENCH_ARGS:-} \
   2>&1 | grep -v '^{' > $OUT/linear_bench.log) &
wait
cat $OUT/linear_profile.log; tail -30 $OUT/linear_bench.log
if [ "${TESTS:-0}" = 1 ]; then
  ATTNZOO_KERNEL_IMPL=pallas timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider \
    tests/pallas_kernels/test_linear_attention_kernel.py 2>&1 | tail -15 | tee $OUT/linear_tests.log
fi
