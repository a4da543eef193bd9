# One call on an H200 host (2 GPUs; on 1 GPU the two lanes run one after the other): the
# attention and linear benchmarks and the compiled kernel tests.
#   OUT=$OUT bash experiments/gpu/h200_closing_run.sh   (repo root; wheels in .whl/)
# Lane A: attention benchmark (Triton and Hopper forwards side by side, cuDNN, JAX's Pallas
# mha), then the flash kernel tests (Triton and Hopper). Lane B: linear benchmark of the
# variants in LIN (pallas and the pure-jnp form, the peak-memory table; fla only if FLA=auto),
# then the linear-attention kernel tests. Time limits (s): ATT_LIMIT, FLASH_TEST_LIMIT,
# LIN_LIMIT, LIN_TEST_LIMIT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/att $OUT/lin
LIN=${LIN:-linear,scalar,vector,rwkv6,normalized}
nvidia-smi -L
NG=$(nvidia-smi -L | wc -l)
lane_a() {
  timeout ${ATT_LIMIT:-330} python3 -m attnzoo bench attention --impls pallas,cudnn,mha \
    --hopper both --out-dir $OUT/att > $OUT/att.log 2>&1
  ATTNZOO_KERNEL_IMPL=pallas timeout ${FLASH_TEST_LIMIT:-200} python3 -m pytest -q \
    -p no:cacheprovider tests/pallas_kernels/test_flash_attention.py \
    tests/pallas_kernels/test_flash_attention_hopper.py > $OUT/flash_tests.log 2>&1
}
lane_b() {
  timeout ${LIN_LIMIT:-300} python3 -m attnzoo.bench.linear --variants $LIN --fla ${FLA:-off} \
    --out-dir $OUT/lin > $OUT/lin.log 2>&1
  ATTNZOO_KERNEL_IMPL=pallas timeout ${LIN_TEST_LIMIT:-240} python3 -m pytest -q \
    -p no:cacheprovider tests/pallas_kernels/test_linear_attention_kernel.py \
    > $OUT/linear_tests.log 2>&1
}
if [ "$NG" -gt 1 ]; then
  (export CUDA_VISIBLE_DEVICES=0; lane_a) & (export CUDA_VISIBLE_DEVICES=1; lane_b) & wait
else
  lane_a; lane_b
fi
for f in att lin; do grep -v '^{' $OUT/$f.log | grep -E "^\||fail|Error" | tail -40; done
for f in flash_tests linear_tests; do tail -4 $OUT/$f.log; done
