# One call on a 4-GPU H200 host: the attention and linear benchmarks and the compiled kernel
# tests, one GPU each, in parallel (Triton compiles use the 64 host cores).
# bash experiments/gpu/h200_closing_run.sh  (repo root; ml_collections/fla wheels in .whl/)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/att $OUT/lin $OUT/linsweep
LIMIT=${LIMIT:-420}
nvidia-smi -L
(export CUDA_VISIBLE_DEVICES=0
 timeout $LIMIT python3 -m attnzoo bench attention --impls pallas,cudnn,mha --out-dir $OUT/att \
   > /tmp/att.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 timeout $((LIMIT - 60)) python3 -m attnzoo.bench.linear --impls pallas --fla off \
   --variants linear,scalar,vector,rwkv6,normalized,delta_rule --out-dir $OUT/lin > /tmp/lin.log 2>&1
 timeout 50 python3 -m attnzoo.bench.linear --impls pallas --fla off --memory "" --variants "" \
   --shapes 4,4096,16,128 --out-dir $OUT/linsweep --modes fwdbwd \
   --sweep "vector:num_warps=8;vector:block_v_out=128;vector:num_stages=3" > /tmp/linsweep.log 2>&1
 rm -f $OUT/linsweep/*.json) &
(export CUDA_VISIBLE_DEVICES=2 ATTNZOO_KERNEL_IMPL=pallas
 timeout $LIMIT python3 -m pytest -q -p no:cacheprovider tests/pallas_kernels/test_flash_attention.py \
   > $OUT/flash_tests.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3 ATTNZOO_KERNEL_IMPL=pallas
 timeout $((LIMIT / 2)) python3 -m pytest -q -p no:cacheprovider \
   tests/pallas_kernels/test_linear_attention_kernel.py > $OUT/kernel_tests.log 2>&1
 timeout $((LIMIT / 2 - 10)) python3 -m pytest -q -p no:cacheprovider \
   tests/pallas_kernels/test_delta_rule_kernel.py >> $OUT/kernel_tests.log 2>&1) &
wait
grep -v '^{' /tmp/att.log | tail -30; grep -v '^{' /tmp/lin.log | tail -45; tail -12 /tmp/linsweep.log
tail -5 $OUT/flash_tests.log; tail -12 $OUT/kernel_tests.log
