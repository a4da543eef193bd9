# H200 run for the linear-attention kernels: per-kernel profile, default-config benchmark,
# a block-configuration sweep at 1x16384, then the compiled kernel tests.
# Usage on the GPU machine (repo root; ml_collections/fla wheels in .whl/): bash experiments/gpu/linear_kernels.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:. JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
timeout 120 python3 experiments/gpu/profile_linear.py 2>&1 | tee $OUT/linear_profile.log
timeout 200 python3 -m attnzoo.bench.linear --impls pallas --fla off --memory "" \
  --variants ${VARIANTS:-linear,scalar,vector} --out-dir $OUT/bench 2>&1 | grep -v '^{' | tee $OUT/linear_bench.log
timeout 150 python3 -m attnzoo.bench.linear --impls pallas --fla off --memory "" --variants "" \
  --shapes 1,16384,16,128 --out-dir $OUT/sweep --sweep "${SWEEP:-scalar+vector:64:32:32:64:4:2:4:2;scalar+vector:64:64:64:128:8:2:4:2;scalar+vector:64:64:64:64:4:3:4:3}" 2>&1 | grep -v '^{' | tail -12 | tee $OUT/linear_sweep.log
ATTNZOO_KERNEL_IMPL=pallas timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider \
  tests/pallas_kernels/test_linear_attention_kernel.py 2>&1 | tail -15 | tee $OUT/linear_tests.log
