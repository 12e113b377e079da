"""nn/decode_attention: the one-step KV-cache attention kernel (Pallas; interpret mode off GPUs)
against a float64 closed form, and the einsum path of the AR model's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.nn import decode_attention, pallas_backend


def _closed_form(q, k, v, k_cache, v_cache, pos):
  """softmax(q . K[:pos + 1] / sqrt(hd)) V[:pos + 1] in float64, with k / v at `pos`."""
  keys = np.array(k_cache, np.float64)
  values = np.array(v_cache, np.float64)
  keys[:, :, pos], values[:, :, pos] = k, v
  hd = q.shape[-1]
  s = np.einsum("bhd,bhsd->bhs", np.asarray(q, np.float64) * hd ** -0.5, keys[:, :, :pos + 1])
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhs,bhsd->bhd", w, values[:, :, :pos + 1]), keys, values


# Lengths below, at and above one block, not powers of two; first, middle and last positions.
# Blocks of at most 64 positions (the small grids' launch, as here), 32 and 16 (the large grids'):
# several blocks, the last moved back.
@pytest.mark.parametrize("max_block", [64, 32, 16])
@pytest.mark.parametrize("length,pos", [(1, 0), (17, 0), (17, 16), (64, 63), (100, 64),
                                        (200, 130), (200, 199)])
def test_kernel_against_closed_form(monkeypatch, max_block, length, pos):
  monkeypatch.setattr(decode_attention, "LAUNCH_CONFIGS", ((0, max_block, 2),))
  rng = np.random.default_rng(length + pos)
  b, h, hd = 2, 3, 16
  q, k, v = (rng.normal(size=(b, h, hd)).astype(np.float32) for _ in range(3))
  k_cache, v_cache = (rng.normal(size=(b, h, length, hd)).astype(np.float32) for _ in range(2))
  y, new_k, new_v = decode_attention.append_and_attend(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_cache), jnp.asarray(v_cache),
      jnp.int32(pos))
  want, keys, values = _closed_form(q, k, v, k_cache, v_cache, pos)
  assert y.shape == (b, h, hd) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
  # The step's key / value written at pos; every other position of the caches as it was.
  np.testing.assert_array_equal(np.asarray(new_k), keys.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(new_v), values.astype(np.float32))


@pytest.mark.parametrize("programs,want", [(2048, (16, 2)), (1536, (16, 2)), (1024, (32, 2)),
                                           (768, (32, 2)), (767, (64, 4)), (6, (64, 4))])
def test_launch_config_by_grid_size(programs, want):
  assert decode_attention.launch_config(programs, 257) == want
  assert decode_attention.launch_config(programs, 20)[0] == min(want[0], 16)   # capped by length


def test_kernel_ignores_the_unfilled_cache():
  """Positions after `pos` (stale or garbage) get no weight: NaNs there do not reach the output."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32) for _ in range(3))
  k_cache, v_cache = (np.asarray(rng.normal(size=(1, 2, 70, 8)), np.float32) for _ in range(2))
  k_cache[:, :, 6:] = v_cache[:, :, 6:] = np.nan
  y, _, _ = decode_attention.append_and_attend(q, k, v, jnp.asarray(k_cache),
                                               jnp.asarray(v_cache), jnp.int32(5))
  want, _, _ = _closed_form(q, k, v, np.nan_to_num(k_cache), np.nan_to_num(v_cache), 5)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)


def test_bfloat16_kernel_close_to_the_einsum_path():
  """In bfloat16 the kernel keeps the softmax weights in float32 where the einsums round them:
  the two paths agree to bfloat16 rounding."""
  rng = np.random.default_rng(1)
  b, h, length, hd, pos = 2, 4, 40, 32, 37
  q, k, v = (jnp.asarray(rng.normal(size=(b, h, hd)), jnp.bfloat16) for _ in range(3))
  k_cache, v_cache = (jnp.asarray(rng.normal(size=(b, h, length, hd)), jnp.bfloat16)
                      for _ in range(2))
  y, new_k, _ = decode_attention.append_and_attend(q, k, v, k_cache, v_cache, jnp.int32(pos))
  assert y.dtype == jnp.bfloat16
  scores = jnp.einsum("bhd,bhsd->bhs", q * jnp.asarray(hd ** -0.5, q.dtype), new_k,
                      preferred_element_type=jnp.float32)
  scores = jnp.where(jnp.arange(length) <= pos, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, -1).astype(jnp.bfloat16)
  v_full = v_cache.at[:, :, pos].set(v)
  einsum = jnp.einsum("bhs,bhsd->bhd", weights, v_full)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(einsum, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_resolve_and_shape_errors():
  supported = pallas_backend.kernels_supported()
  assert decode_attention.resolve("xla", 64) == "xla"
  assert decode_attention.resolve("pallas", 64) == "pallas"
  assert decode_attention.resolve("auto", 64) == ("pallas" if supported else "xla")
  assert decode_attention.resolve("auto", 48) == "xla"      # Triton's blocks: powers of two
  with pytest.raises(ValueError, match="decode attention must be one of"):
    decode_attention.resolve("cudnn", 64)
  x = jnp.zeros((1, 2, 8))
  with pytest.raises(ValueError, match="caches must be"):
    decode_attention.append_and_attend(x, x, x, jnp.zeros((1, 2, 5, 4)), jnp.zeros((1, 2, 5, 4)),
                                       jnp.int32(0))
  with pytest.raises(ValueError, match="rotary"):
    decode_attention.append_and_attend(x, x, x, jnp.zeros((1, 2, 5, 8)), jnp.zeros((1, 2, 5, 8)),
                                       jnp.int32(0), rotary=(jnp.ones((1, 3)), jnp.ones((1, 3))))
  with pytest.raises(ValueError, match="qkv must be"):
    decode_attention.append_and_attend_qkv(jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 2, 5, 8)),
                                           jnp.zeros((1, 2, 5, 8)), jnp.int32(0))


class _Device:
  def __init__(self, compute_capability):
    self.compute_capability = compute_capability


def test_auto_settings_pick_the_kernels_only_where_triton_compiles(monkeypatch):
  """XLA compiles Triton (so Pallas) kernels for CUDA compute capability 8.0 and later only, and
  cuDNN's fused attention needs it too: on a T4 (7.5) or a V100 (7.0) the "auto" settings choose
  XLA's ops; on an A100 (8.0), an A10 (8.6) or an H100 (9.0) the kernels."""
  from vqkd_jax.nn import attention
  from vqkd_jax.proposal import sampling

  assert pallas_backend.gpu_compute_capability(_Device("8.6")) == (8, 6)
  assert pallas_backend.gpu_compute_capability(_Device("gfx90a")) is None   # ROCm
  assert pallas_backend.gpu_compute_capability(object()) is None
  monkeypatch.setattr(pallas_backend, "on_gpu", lambda: True)
  for cc, want in (("7.0", "xla"), ("7.5", "xla"), ("8.0", "pallas"), ("8.6", "pallas"),
                   ("9.0", "pallas"), ("gfx90a", "xla")):
    monkeypatch.setattr(jax, "devices", lambda *args, cc=cc: [_Device(cc)])
    assert decode_attention.resolve("auto", 64) == want, cc
    assert sampling.resolve_draw("auto") == want, cc
    assert attention.fused_attention_available(jnp.bfloat16, 64) == (want == "pallas"), cc
  monkeypatch.setattr(pallas_backend, "on_gpu", lambda: False)
  assert decode_attention.resolve("auto", 64) == "xla" and sampling.resolve_draw("auto") == "xla"


def _rotate64(x, cos, sin):
  """Rotary of x [..., hd] in float64, written from the definition: the head cut into 2P pieces,
  piece 2p (a) and 2p + 1 (b) turned by angle p: (a cos - b sin, b cos + a sin)."""
  x = np.asarray(x, np.float64)
  pieces = np.split(x, 2 * cos.shape[0], axis=-1)
  out = []
  for p in range(cos.shape[0]):
    a, b = pieces[2 * p], pieces[2 * p + 1]
    out += [a * cos[p] - b * sin[p], b * cos[p] + a * sin[p]]
  return np.concatenate(out, -1)


@pytest.mark.parametrize("pairs", [1, 2])
def test_rotary_in_the_kernel_against_closed_form(pairs):
  """With a rotary table the kernel turns q and k itself (1-D: P = 1, 2-D: P = 2), writes the
  turned key into the cache and attends with the turned query; from the stacked qkv too."""
  rng = np.random.default_rng(pairs)
  b, h, hd, length, pos = 2, 3, 16, 90, 70
  q, k, v = (rng.normal(size=(b, h, hd)).astype(np.float32) for _ in range(3))
  k_cache, v_cache = (rng.normal(size=(b, h, length, hd)).astype(np.float32) for _ in range(2))
  angles = rng.uniform(-np.pi, np.pi, (pairs, hd // (2 * pairs)))
  cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  want, keys, values = _closed_form(_rotate64(q, cos, sin), _rotate64(k, cos, sin), v,
                                    k_cache, v_cache, pos)
  table = (jnp.asarray(cos), jnp.asarray(sin))
  caches = jnp.asarray(k_cache), jnp.asarray(v_cache)
  separate = decode_attention.append_and_attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                *caches, jnp.int32(pos), rotary=table)
  stacked = decode_attention.append_and_attend_qkv(jnp.asarray(np.stack([q, k, v], 1)), *caches,
                                                   jnp.int32(pos), rotary=table)
  for y, new_k, new_v in (separate, stacked):
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_k), keys, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_v), values.astype(np.float32))
    # Only position `pos` of the key cache changed.
    np.testing.assert_array_equal(np.delete(np.asarray(new_k), pos, axis=2),
                                  np.delete(k_cache, pos, axis=2))


def test_folded_rms_norm_in_the_kernel_against_closed_form():
  """With rms=(x, eps) the stacked qkv (float32, a projection of the un-normalised rows x) is
  scaled by each row's rsqrt(mean(x^2) + eps) before the rotary, the cache write and the attention;
  rounded to `dtype` (bfloat16 here: the output and the written cache entries are bf16 values)."""
  rng = np.random.default_rng(5)
  b, h, hd, length, pos, eps = 3, 2, 16, 40, 21, 1e-5
  qkv = rng.normal(size=(b, 3, h, hd)).astype(np.float32) * 3
  x = (rng.normal(size=(b, 32)) * rng.uniform(0.5, 4, (b, 1))).astype(np.float32)
  r = 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1) + eps)
  scaled = qkv * r[:, None, None, None]
  k_cache, v_cache = (rng.normal(size=(b, h, length, hd)).astype(np.float32) for _ in range(2))
  angles = rng.uniform(-np.pi, np.pi, (2, hd // 4))
  cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
  want, keys, values = _closed_form(_rotate64(scaled[:, 0], cos, sin),
                                    _rotate64(scaled[:, 1], cos, sin), scaled[:, 2],
                                    k_cache, v_cache, pos)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    y, new_k, new_v = decode_attention.append_and_attend_qkv(
        jnp.asarray(qkv), jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype),
        jnp.int32(pos), rotary=(jnp.asarray(cos), jnp.asarray(sin)), rms=(jnp.asarray(x), eps),
        dtype=dtype)
    assert y.dtype == dtype and new_k.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(new_k, np.float32)[:, :, pos], keys[:, :, pos],
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(new_v, np.float32)[:, :, pos], values[:, :, pos],
                               rtol=tol, atol=tol)
  with pytest.raises(ValueError, match="rms rows"):
    decode_attention.append_and_attend_qkv(jnp.asarray(qkv), jnp.asarray(k_cache),
                                           jnp.asarray(v_cache), jnp.int32(pos),
                                           rms=(jnp.asarray(x[:2]), eps))
