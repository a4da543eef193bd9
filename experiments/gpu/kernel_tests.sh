set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 - <<'PY' 2>&1 | tee $OUT/cudnn_window.log
import jax, jax.numpy as jnp, numpy as np
from attnzoo.ops.softmax_attention import reference
k1,k2,k3 = jax.random.split(jax.random.key(0),3)
q = jax.random.normal(k1,(1,256,4,64),jnp.bfloat16); k = jax.random.normal(k2,(1,256,4,64),jnp.bfloat16); v = jax.random.normal(k3,(1,256,4,64),jnp.bfloat16)
f32 = lambda a: a.astype(jnp.float32)
for w in (15, 100):
  c = jax.nn.dot_product_attention(q,k,v,scale=0.125,is_causal=True,local_window_size=(w,0),implementation="cudnn")
  for left in (w-1, w, w+1):
    r = reference(f32(q),f32(k),f32(v),scale=0.125,causal=True,window=(left,0))
    print(f"cudnn local_window_size=({w},0) vs xla window=({left},0): rel err {float(jnp.linalg.norm(f32(c)-r)/jnp.linalg.norm(r)):.2e}")
PY
ATTNZOO_KERNEL_IMPL=pallas timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/pallas_kernels/test_flash_attention.py tests/ops/test_softmax_attention.py 2>&1 | tee $OUT/flash.log
ATTNZOO_KERNEL_IMPL=pallas timeout 100 python3 -m pytest -q -p no:cacheprovider tests/pallas_kernels/test_delta_rule_kernel.py 2>&1 | tee $OUT/delta.log
