# NSA on one H200 (about 5 minutes): the NSA kernels compiled (Triton) against their
# references, then `attnzoo bench sparse` (64k first: the speed bar).
#   OUT=$OUT bash experiments/gpu/nsa.sh   (repo root; wheels in .whl/)
# Time limits (s): NSA_TEST_LIMIT, NSA_BENCH_LIMIT. The results land in $OUT/sparse/
# (sparse_<device>.md/.json; copy them to experiments/results/kernels/).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/sparse
nvidia-smi -L
ATTNZOO_KERNEL_IMPL=pallas ATTNZOO_SLOW_TESTS=1 timeout ${NSA_TEST_LIMIT:-90} python3 -m pytest -q \
  -p no:cacheprovider tests/pallas_kernels/test_nsa_kernel.py 2>&1 | tee $OUT/nsa_tests.log
timeout ${NSA_BENCH_LIMIT:-210} python3 -m attnzoo bench sparse --out-dir $OUT/sparse --verbose \
  2>&1 | tee $OUT/sparse.log
