"""Every Pallas kernel, and an AR sampler that runs them, lowers for CUDA through Pallas' Triton
backend, on a machine without a GPU: the Pallas -> Triton lowering (supported primitives, block
shapes, the kernels' GPU branch with its compiler parameters) runs in Python; only the PTX
compilation needs a GPU. Elsewhere the tests run the kernels in interpret mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vqkd_jax.nn import decode_attention, filtered_draw, rms_norm
from vqkd_jax.proposal import ar as ar_lib
from vqkd_jax.proposal import sampling

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def gpu_branch(monkeypatch):
  """The kernels take their compiled (non-interpret) branch, as on a GPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _cuda_hlo(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_each_kernel_lowers_to_triton(gpu_branch):
  b, h, s, hd, d, f = 128, 16, 257, 64, 1024, 2816     # Llama medium's decoding step with CFG
  rotary = (_spec((2, 16), jnp.float32), _spec((2, 16), jnp.float32))
  cache = _spec((b, h, s, hd))
  cases = {
      "attention, rotary": (
          lambda qkv, kc, vc, p, r: decode_attention.append_and_attend_qkv(qkv, kc, vc, p, r),
          _spec((b, 3, h, hd)), cache, cache, _spec((), jnp.int32), rotary),
      "attention, folded norm": (
          lambda qkv, kc, vc, p, r, x: decode_attention.append_and_attend_qkv(
              qkv, kc, vc, p, r, rms=(x, 1e-5), dtype=jnp.bfloat16),
          _spec((b, 3, h, hd), jnp.float32), cache, cache, _spec((), jnp.int32), rotary,
          _spec((b, d))),
      "attention, separate q / k / v": (
          lambda q, k, v, kc, vc, p: decode_attention.append_and_attend(q, k, v, kc, vc, p),
          _spec((b, h, hd)), _spec((b, h, hd)), _spec((b, h, hd)), cache, cache,
          _spec((), jnp.int32)),
      "rms_norm": (lambda x, w: rms_norm.rms_norm(x, w, 1e-5, jnp.bfloat16),
                   _spec((b, 1, d)), _spec((d,), jnp.float32)),
      "rms_scaled_swiglu": (lambda gu, x: rms_norm.rms_scaled_swiglu(gu, x, 1e-5, jnp.bfloat16),
                            _spec((b, 2, f), jnp.float32), _spec((b, d))),
      "filtered_draw": (lambda x, g: filtered_draw.filtered_draw(x, g, 600, 0.92),
                        _spec((64, 8192), jnp.float32), _spec((64, 8192), jnp.float32)),
      "filtered_draw, padded V, top-p only": (
          lambda x, g: filtered_draw.filtered_draw(x, g, 0, 0.9),
          _spec((64, 1000), jnp.float32), _spec((64, 1000), jnp.float32)),
  }
  for name, (fn, *args) in cases.items():
    assert _cuda_hlo(fn, *args).count(TRITON_CALL) == 1, name


def test_an_ar_sampler_with_every_kernel_lowers_for_cuda(gpu_branch):
  """A Llama with 2-D RoPE, its second norm folded and the filtered draw: one decoding loop
  holding the attention, RMSNorm, SwiGLU and draw kernels."""
  model = ar_lib.ARTransformer(vocab_size=64 + 11, seq_len=17, width=64, depth=2, num_heads=4,
                               flavour="llama", rope="2d", grid=(4, 4), dtype=jnp.bfloat16,
                               attention="xla", decode_step="pallas")
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 17), jnp.int32)))
  run = lambda params, labels, rng: sampling._sample_cached_impl(
      model, params, labels, rng, jnp.int32(0), num_image_tokens=16, num_classes=10,
      codebook_size=64, cache_segments=1, fuse=True, fold_norms=True, draw_path="pallas",
      batch_split=None, **sampling._static_args(1.75, 1.0, 20, 0.9, 64))
  hlo = _cuda_hlo(run, params, _spec((4,), jnp.int32), jax.random.PRNGKey(0))
  # per block: norm1's RMSNorm, the attention and the norm2 + SwiGLU kernel; then the final
  # RMSNorm and the draw
  assert hlo.count(TRITON_CALL) == 2 * 3 + 2, hlo.count(TRITON_CALL)
  assert "rms_scaled_swiglu" in hlo and "filtered_draw" in hlo and "decode_attention" in hlo
