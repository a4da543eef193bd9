"""Weight decay by parameter role (train.optim.decay_mask): for every registered mixer, which
parameters decay (leaf "kernel": projections and convolutions) and which do not (biases, norm
scales, decay rates, gates, bonuses, token-shift mixes, RWKV's LoRAs), as an explicit table."""

import jax
import jax.numpy as jnp
import pytest

from attnzoo.mixers import MIXERS, build_mixer
from attnzoo.models import DecoderLM
from attnzoo.train.optim import decay_mask
from tests.mixers.test_mixers import TEST_KWARGS

ATTENTION = ("k/kernel out/kernel q/kernel v/kernel", "k/bias out/bias q/bias v/bias")
# mixer: (decayed, not decayed), parameter paths at TEST_KWARGS.
EXPECTED = {
  "attention": ATTENTION,
  "sliding_window": (ATTENTION[0], "k/bias out/bias q/bias sink_logit v/bias"),  # sinks on
  "block_attention": ATTENTION,
  "gated_attention": ("gate_proj/kernel " + ATTENTION[0], "gate_proj/bias " + ATTENTION[1]),
  # Zoology's BaseConv: the conv taps and the projection decay, their biases not.
  "base_conv": ("conv/kernel projection/kernel", "conv/bias projection/bias"),
  "based": ("k/kernel out/kernel q/kernel v/kernel", ""),
  "linear_attention": ("k/kernel out/kernel q/kernel v/kernel", ""),
  "lsa": ("k/kernel out/kernel q/kernel v/kernel", ""),
  "retnet": ("g/kernel k/kernel out/kernel q/kernel v/kernel", ""),  # gammas are constants
  # TransNormerLLM: the LRPE frequencies are per-channel rates (the decays are constants).
  "lightning": ("k/kernel out/kernel q/kernel u/kernel v/kernel", "lrpe_theta"),
  # fla's GLA: its low-rank gate is two nn.Linear layers, decayed like every projection.
  "gla": (
    "g/kernel gate_down/kernel gate_up/kernel k/kernel out/kernel q/kernel v/kernel",
    "gate_up/bias norm/scale",
  ),
  # HGRN-2: the forget gate's lower bound is a decay rate.
  "hgrn2": ("f/kernel i/kernel out/kernel q/kernel", "bound_logit norm/scale"),
  # RWKV-LM (v6 configure_optimizers): only the 2-D weights outside time_* and the _w1/_w2
  # LoRAs decay; time_maa (mu), time_decay, time_faaaa (bonus) and the LoRAs do not.
  "rwkv6": (
    "g/kernel k/kernel out/kernel r/kernel v/kernel",
    "bonus decay decay_a decay_b group_norm/bias group_norm/scale mix_a mix_b mu mu_x",
  ),
  # fla's DeltaNet / Gated DeltaNet: A_log and dt_bias are marked _no_weight_decay.
  "deltanet": (
    "b/kernel g/kernel k/kernel k_conv/kernel out/kernel q/kernel q_conv/kernel "
    "v/kernel v_conv/kernel",
    "norm/scale",
  ),
  "gated_deltanet": (
    "a/kernel b/kernel g/kernel k/kernel k_conv/kernel out/kernel q/kernel "
    "q_conv/kernel v/kernel v_conv/kernel",
    "A_log dt_bias norm/scale",
  ),
  # LAWCAT: the Hedgehog feature map is a learned projection; the gate follows GLA.
  "lawcat": (
    "feature_map/kernel gate_down/kernel gate_up/kernel k/kernel k_conv/kernel "
    "out/kernel q/kernel q_conv/kernel v/kernel",
    "gate_up/bias",
  ),
  # mamba_ssm: A_log, D and dt_bias are marked _no_weight_decay; biases and norms are not
  # decayed.
  "mamba2": ("conv/kernel in_proj/kernel out_proj/kernel", "A_log D conv/bias dt_bias norm/scale"),
  # Mamba-1 (mamba_simple.py): the same three, plus x_proj and dt_proj weights decayed.
  "mamba": (
    "conv/kernel dt_proj/kernel in_proj/kernel out_proj/kernel x_proj/kernel",
    "A_log D conv/bias dt_bias",
  ),
  # state-spaces S4D/DSS: the SSM parameters (A, C/W, dt) and D are not decayed.
  "s4d": ("out/kernel", "D kernel/A_imag kernel/C kernel/log_A_real kernel/log_dt out/bias"),
  "dss": ("out/kernel", "D Lambda_im Lambda_re W log_dt out/bias"),
  # H3: the shift SSM is a convolution (its taps decay); the diagonal SSM's parameters do not.
  "h3": (
    "k/kernel out/kernel q/kernel shift_ssm/kernel v/kernel",
    "D D_k k/bias out/bias q/bias ssm/A_imag ssm/C ssm/log_A_real ssm/log_dt v/bias",
  ),
  # Hyena: the filter MLP's Linear layers decay like every projection (safari's wd-0 hint for
  # them is an `_optim` attribute Zoology ignores); positions, Sin frequencies, biases do not.
  "hyena": (
    "filter_1/mlp_0/kernel filter_1/mlp_1/kernel filter_1/mlp_2/kernel filter_1/mlp_out/kernel "
    "in_proj/kernel out_proj/kernel short_conv/kernel",
    "filter_1/freq filter_1/mlp_0/bias filter_1/mlp_1/bias filter_1/mlp_2/bias filter_1/z "
    "filter_bias_1 in_proj/bias out_proj/bias short_conv/bias",
  ),
  # AHN (Gated DeltaNet memory): A_log and dt_bias are not decayed, as in fla's GDN.
  "ahn": (
    "a/kernel b/kernel g/kernel k/kernel memory_out/kernel out/kernel q/kernel v/kernel",
    "A_log dt_bias k/bias norm/scale q/bias v/bias",
  ),
  # NSA: the compression MLPs' weights decay like projections; their biases and intra-block
  # position embeddings do not.
  "nsa": (
    "compress_k/fc1/kernel compress_k/fc2/kernel compress_v/fc1/kernel compress_v/fc2/kernel "
    "gate/kernel k/kernel out/kernel q/kernel v/kernel",
    "compress_k/fc1/bias compress_k/fc2/bias compress_k/pos_embedding compress_v/fc1/bias "
    "compress_v/fc2/bias compress_v/pos_embedding",
  ),
  # RWKV-LM v4: time_decay, time_first and the token-shift mixes are not decayed.
  "rwkv4": (
    "key/kernel output/kernel receptance/kernel value/kernel",
    "mu_k mu_r mu_v time_decay time_first",
  ),
  # RWKV-LM v7 (configure_optimizers): only the 2-D ".weight"s decay (receptance, key, value,
  # output); the LoRAs, lerps, decay/a biases, k_k, k_a, r_k and the GroupNorm do not.
  "rwkv7": (
    "k/kernel out/kernel r/kernel v/kernel",
    "a0 a1 a2 g1 g2 group_norm/bias group_norm/scale k_a k_k mu r_k w0 w1 w2",
  ),
  "fnet": ("", ""),  # no parameters
  # sMLP (gMLP's spatial projections): the Linear weights decay; the spatial experts, like
  # every per-position mixing table here, biases and the norm do not.
  "smlp": (
    "in_proj/kernel out_proj/kernel",
    "in_proj/bias norm/bias norm/scale out_proj/bias spatial_bias spatial_weight",
  ),
  # fairseq's LightConv: the conv weights and the Linear weights decay, biases not.
  "lightweight_conv": ("in_proj/kernel kernel out_proj/kernel", "in_proj/bias out_proj/bias"),
  "dynamic_conv": (
    "in_proj/kernel out_proj/kernel weight_linear/kernel",
    "in_proj/bias out_proj/bias",
  ),
  # FFTNet: the context MLP's Linear weights decay; the spectral filter and modReLU bias not.
  "fftnet": ("mlp_in/kernel mlp_out/kernel", "base_filter mlp_in/bias mlp_out/bias modrelu_bias"),
  # Aaren: the learned query is a vector like a bias, not a projection.
  "aaren": ("k/kernel out/kernel v/kernel", "query"),
  "shaped": ATTENTION,
  "sinkhorn": ATTENTION,
  # GAAM: the Gaussians' offsets and scaled variances are per-head statistics parameters.
  "gaussian_adaptive": ("", "c mean_offsets"),
  # MoH: the routers are bias-free Linear layers, decayed like every projection.
  "moh": (
    "k/kernel mix_router/kernel out/kernel q/kernel routed_router/kernel shared_router/kernel "
    "v/kernel",
    ATTENTION[1],
  ),
  # Routing: the k-means centroids are not weights.
  "routing": (ATTENTION[0], "centroids " + ATTENTION[1]),
  # LTE: the retention score CNN's kernels decay like the projections.
  "lte": (
    "k/kernel out/kernel q/kernel scorer/conv0/kernel scorer/conv1/kernel "
    "scorer/conv2/kernel v/kernel",
    "k/bias q/bias scorer/conv0/bias scorer/conv1/bias scorer/conv2/bias v/bias",
  ),
  # RAN: every Dense kernel decays; biases, LayerNorms and the learned initial cell do not.
  "ran": (
    "cell_glu/gate/kernel cell_glu/linear/kernel encode_glu/gate/kernel "
    "encode_glu/linear/kernel k/kernel o/kernel out/kernel q/kernel review_glu/gate/kernel "
    "review_glu/linear/kernel review_k/kernel review_o/kernel review_q/kernel review_v/kernel "
    "v/kernel",
    "cell_glu/gate/bias cell_glu/linear/bias cell_norm/bias cell_norm/scale "
    "encode_glu/gate/bias encode_glu/linear/bias encode_norm/bias encode_norm/scale "
    "initial_cell input_norm/bias input_norm/scale k/bias o/bias q/bias "
    "review_glu/gate/bias review_glu/linear/bias review_k/bias review_norm/bias "
    "review_norm/scale review_o/bias review_q/bias review_v/bias v/bias",
  ),
  # HAT: two attention modules, the segment-wise and the cross-segment one.
  "hat": tuple(
    " ".join(sorted(f"{half}/{p}" for half in ("cse", "swe") for p in ATTENTION[i].split()))
    for i in (0, 1)
  ),
}


def split_by_mask(params, decay_all=False):
  decayed, kept = [], []
  mask = decay_mask(params, decay_all)
  for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
    (decayed if decays else kept).append("/".join(key.key for key in path))
  return " ".join(sorted(decayed)), " ".join(sorted(kept))


def mixer_params(name):
  causal = MIXERS[name].has_causal_form
  mixer = build_mixer(name, d_model=16, causal=causal, **TEST_KWARGS.get(name, {}))
  variables = jax.eval_shape(lambda: mixer.init(jax.random.key(0), jnp.zeros((1, 5, 16))))
  return variables.get("params", {})


def test_every_mixer_has_an_entry():
  assert sorted(EXPECTED) == sorted(MIXERS)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decayed_parameters(name):
  assert split_by_mask(mixer_params(name)) == EXPECTED[name]
  decayed, kept = split_by_mask(mixer_params(name), decay_all=True)
  assert kept == "" and sorted(decayed.split()) == sorted(" ".join(EXPECTED[name]).split())


def test_model_decays_embeddings_not_norms():
  model = DecoderLM(
    vocab_size=11,
    d_model=16,
    num_layers=1,
    mixers=("gla",),
    mixer_kwargs={"num_heads": 2},
    state_mixer="mlp",
    position_embedding="learned",
  )
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32)))
  decayed, kept = split_by_mask(params["params"])
  assert "embed/embedding" in decayed and "positions_embed/embedding" in decayed
  assert not any(path.endswith(("scale", "bias")) for path in decayed.split())
  assert all(
    path.endswith(("scale", "bias"))
    for path in kept.split()
    if not path.startswith("blocks_0/mixer/")
  )
