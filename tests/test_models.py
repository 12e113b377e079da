"""Model blocks against NumPy / torch references with the same weights, shapes of every module at
demo size (and, abstractly, at ImageNet size), dtypes, and logical axis names on every parameter."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from vqkd_jax.evaluation.evaluator_net import EvaluatorNet
from vqkd_jax.nn import conv as conv_lib
from vqkd_jax.nn.vit import ViTBlock, ViTEncoder, dense, interpolate_pos_embed
from vqkd_jax.teachers.vit import SupervisedViT
from vqkd_jax.tokenizers.pixel_decoder import PixelDecoder
from vqkd_jax.tokenizers.vqkd import VQKDTokenizer, cosine_distillation_loss

VOCAB = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "codebook", "code", "norm",
         "patch", None}

DEMO_VQKD = dict(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, conv_stem=True,
                 num_codes=64, code_dim=16, decoder_width=64, decoder_depth=1, decoder_heads=4,
                 teacher_dim=48)


def images(b=2, size=32, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, 3), minval=-1, maxval=1)


def randomize(params, seed=0, scale=0.2):
  """Every parameter replaced by random values (biases and norm scales included)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=l.shape) * scale, l.dtype)
                                   for l in leaves])


# ------------------------------------------------------------------------------ NumPy references


def np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_vit_block(x, p, num_heads):
  """Pre-LN block written with plain matrices: [B, L, D] -> [B, L, D]."""
  b, l, d = x.shape
  hd = d // num_heads
  h = np_layer_norm(x, p["norm1"])
  a = p["attn"]
  proj = lambda n: (h @ a[n]["kernel"].reshape(d, d) + a[n]["bias"].reshape(d)).reshape(
      b, l, num_heads, hd).transpose(0, 2, 1, 3)
  q, k, v = proj("query"), proj("key"), proj("value")
  attn = np_softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
  y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, l, d)
  x = x + y @ a["out"]["kernel"].reshape(d, d) + a["out"]["bias"]
  h = np_layer_norm(x, p["norm2"])
  m = p["mlp"]
  h = np_gelu(h @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"]
  return x + h


# ------------------------------------------------------------------------------ ViT


def test_vit_block_matches_numpy_reference():
  x = np.random.default_rng(1).normal(size=(2, 9, 32)).astype(np.float32)
  block = ViTBlock(num_heads=4)
  params = randomize(nn.unbox(block.init(jax.random.PRNGKey(0), x))["params"])
  got = block.apply({"params": params}, jnp.asarray(x))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(got, np_vit_block(x.astype(np.float64), p64, 4), atol=2e-5)


class _FlaxBlock(nn.Module):
  """ViTBlock written with flax's own layers (nn.LayerNorm, a DenseGeneral per projection,
  jax.nn.gelu under autodiff): the second code path for ViTBlock's hand-written gradients
  (nn/layer_norm.py, nn/activations.py) and its one-matmul q / k / v (attention.qkv_projection)."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    from vqkd_jax.nn import attention as attn_lib  # noqa: PLC0415

    d, heads = x.shape[-1], self.num_heads
    hd = d // heads
    h = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)

    class Attn(nn.Module):
      @nn.compact
      def __call__(self, h):
        proj = lambda n: nn.DenseGeneral((heads, hd), name=n,
                                         kernel_init=nn.initializers.truncated_normal(0.02))
        y = attn_lib.dot_product_attention(proj("query")(h), proj("key")(h), proj("value")(h),
                                           None, jnp.float32, "xla")
        return attn_lib.output_projection(d, True, jnp.float32)(y)

    x = x + Attn(name="attn")(h)
    h = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)

    class Mlp(nn.Module):
      @nn.compact
      def __call__(self, h):
        h = jax.nn.gelu(dense(4 * d, ("embed", "mlp"), "fc1")(h), approximate=False)
        return dense(d, ("mlp", "embed"), "fc2")(h)

    return x + Mlp(name="mlp")(h)


def test_vit_block_gradients_and_init_equal_flax_layers():
  """The same initial parameters (so checkpoints keep their layout and values), outputs and
  gradients (parameters and input) as the block built from flax's layers."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 32)), jnp.float32)
  block, ref = ViTBlock(num_heads=4, layer_index=None), _FlaxBlock(num_heads=4)
  params = nn.unbox(block.init(jax.random.PRNGKey(0), x))["params"]
  ref_params = nn.unbox(ref.init(jax.random.PRNGKey(0), x))["params"]
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  params = randomize(params, seed=3)
  cot = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
  grads = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x) * cot),
                             argnums=(0, 1))(params, x)
  got, want = grads(block), grads(ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("use_bias,dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_head_projection_equals_dense_general(use_bias, dtype):
  """attention.head_projection (cross-attention's q / k / v): flax's DenseGeneral((heads, hd))
  parameters, initial values and outputs, in float32 and in bfloat16."""
  from vqkd_jax.nn import attention as attn_lib  # noqa: PLC0415

  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, 24)), jnp.float32)
  ours = attn_lib.head_projection(3, 8, use_bias, dtype, "query")
  ref = nn.DenseGeneral((3, 8), use_bias=use_bias, dtype=dtype,
                        kernel_init=nn.initializers.truncated_normal(0.02))
  params = nn.unbox(ours.init(jax.random.PRNGKey(6), x))["params"]
  jax.tree.map(np.testing.assert_array_equal, params,
               nn.unbox(ref.init(jax.random.PRNGKey(6), x))["params"])
  params = randomize(params, seed=7)
  got, want = ours.apply({"params": params}, x), ref.apply({"params": params}, x)
  assert got.dtype == want.dtype == dtype and got.shape == (2, 7, 3, 8)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_vit_block_depth_scaled_init():
  # Kernels are truncated normals (+-2 sigma) of "stddev" s, whose actual std is 0.8796 s; block i's
  # attention output and fc2 start at s = 0.02 / sqrt(2 (i + 1)) (BEiT), the other kernels at 0.02.
  trunc = 0.8796256610342398
  x = jnp.zeros((1, 2, 256))
  for i in (0, 3):
    p = nn.unbox(ViTBlock(num_heads=4, layer_index=i).init(jax.random.PRNGKey(i), x))["params"]
    want = 0.02 / math.sqrt(2 * (i + 1)) * trunc
    for kernel in (p["attn"]["out"]["kernel"], p["mlp"]["fc2"]["kernel"]):
      assert np.std(np.asarray(kernel)) == pytest.approx(want, rel=0.03)
    for kernel in (p["attn"]["query"]["kernel"], p["mlp"]["fc1"]["kernel"]):
      assert np.std(np.asarray(kernel)) == pytest.approx(0.02 * trunc, rel=0.03)
  p = nn.unbox(ViTBlock(num_heads=4).init(jax.random.PRNGKey(0), x))["params"]
  assert np.std(np.asarray(p["mlp"]["fc2"]["kernel"])) == pytest.approx(0.02 * trunc, rel=0.03)


def test_vit_encoder_patch_embedding_and_positions_match_numpy():
  # depth 0, no CLS: tokens = patchify(x) @ W + b + pos.
  enc = ViTEncoder(patch_size=4, width=16, depth=0, num_heads=2, cls_token=False)
  x = np.asarray(images(2, 16))
  params = randomize(nn.unbox(enc.init(jax.random.PRNGKey(0), x))["params"])
  got = enc.apply({"params": params}, jnp.asarray(x))
  patches = x.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  w = np.asarray(params["patch_embed"]["proj"]["kernel"]).reshape(48, 16)
  want = patches @ w + np.asarray(params["patch_embed"]["proj"]["bias"]) + np.asarray(
      params["pos_embed"])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_frozen_teachers_run_attention_at_the_true_length(monkeypatch):
  """Frozen teachers (the random ViT of the benchmarks, the Hugging Face ports) call the attention
  with differentiable=False (cuDNN at the true length: no pads); a trained ViT with True."""
  import ml_collections

  from vqkd_jax.nn import attention
  from vqkd_jax.teachers import hf_vit
  from vqkd_jax.teachers.load import random_vit_teacher

  seen = []
  original = attention.dot_product_attention

  def recording(*args, **kwargs):
    seen.append(args[6] if len(args) > 6 else kwargs.get("differentiable", True))
    return original(*args, **kwargs)

  monkeypatch.setattr(attention, "dot_product_attention", recording)
  images = jnp.zeros((1, 16, 16, 3))

  def flags(model_apply):
    seen.clear()
    model_apply()
    return list(seen)

  student = ViTEncoder(patch_size=4, width=16, depth=2, num_heads=2)
  v = student.init(jax.random.PRNGKey(0), images)
  assert flags(lambda: student.apply(v, images)) == [True, True]
  teacher = random_vit_teacher(ml_collections.ConfigDict(dict(
      patch_size=4, width=16, depth=2, num_heads=2, image_size=16, out_dim=0)))
  assert flags(lambda: teacher.apply_tokens(teacher.variables, images)) == [False, False]
  port = hf_vit.VisionTransformer(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, grid=4)
  v = port.init(jax.random.PRNGKey(0), images)
  assert flags(lambda: port.apply(v, images)) == [False, False]


def test_vit_encoder_cls_first_and_other_resolutions():
  enc = ViTEncoder(patch_size=4, width=32, depth=1, num_heads=4, conv_stem=True, image_size=32)
  v = jax.jit(lambda x: enc.init(jax.random.PRNGKey(0), x))(images())
  assert nn.unbox(v)["params"]["pos_embed"].shape == (1, 65, 32)
  assert jax.jit(enc.apply)(v, images()).shape == (2, 65, 32)
  assert jax.eval_shape(enc.apply, v, images(2, 48)).shape == (2, 145, 32)  # 8x8 -> 12x12 grid.
  plain = ViTEncoder(patch_size=4, width=32, depth=1, num_heads=4, cls_token=False)
  pv = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), images()))
  assert jax.eval_shape(plain.apply, pv, images()).shape == (2, 64, 32)


def test_interpolate_pos_embed_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  for (gh, gw), (nh, nw), offset in [((14, 14), (16, 16), None), ((14, 14), (16, 16), 0.1),
                                     ((8, 8), (5, 5), None), ((4, 6), (7, 3), None),
                                     ((7, 7), (7, 7), None)]:
    pos = rng.normal(size=(1, gh * gw, 8)).astype(np.float32)
    grid = torch.from_numpy(pos.reshape(gh, gw, 8).transpose(2, 0, 1)[None])
    if offset is None:
      ref = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    else:  # Upstream VQ-KD / DINO: scale factor (n + 0.1) / g.
      ref = F.interpolate(grid, scale_factor=((nh + offset) / gh, (nw + offset) / gw),
                          mode="bicubic", align_corners=False)
    ref = ref[0].numpy().transpose(1, 2, 0).reshape(1, nh * nw, 8)
    got = interpolate_pos_embed(jnp.asarray(pos), (nh, nw), (gh, gw), scale_offset=offset)
    np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{gh}x{gw} -> {nh}x{nw}")


# ------------------------------------------------------------------------------ Conv blocks vs torch


def _torch_conv(torch, x, p, stride=1, padding=1):
  w = torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1).copy())
  return torch.nn.functional.conv2d(x, w, torch.from_numpy(np.array(p["bias"])), stride, padding)


def _torch_gn(torch, x, p):
  return torch.nn.functional.group_norm(x, conv_lib.num_groups(x.shape[1]),
                                        torch.from_numpy(np.array(p["scale"])),
                                        torch.from_numpy(np.array(p["bias"])), eps=1e-6)


def _nchw(torch, x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_conv_blocks_match_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype(np.float32)
  init = lambda m: randomize(nn.unbox(m.init(jax.random.PRNGKey(0), x))["params"], scale=0.3)
  xt = _nchw(torch, x)

  res = conv_lib.ResBlock(24)
  p = init(res)
  h = _torch_conv(torch, F.silu(_torch_gn(torch, xt, p["norm1"])), p["conv1"])
  h = _torch_conv(torch, F.silu(_torch_gn(torch, h, p["norm2"])), p["conv2"])
  want = _torch_conv(torch, xt, p["shortcut"], padding=0) + h
  np.testing.assert_allclose(res.apply({"params": p}, x), _nhwc(want), atol=1e-4)

  attn = conv_lib.AttnBlock2d()
  p = init(attn)
  y = _torch_gn(torch, xt, p["norm"])
  q, k, v = (_torch_conv(torch, y, p[n], padding=0).flatten(2).transpose(1, 2) for n in "qkv")
  o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), -1) @ v
  o = o.transpose(1, 2).reshape(2, 16, 8, 8)
  want = xt + _torch_conv(torch, o, p["proj"], padding=0)
  np.testing.assert_allclose(attn.apply({"params": p}, x), _nhwc(want), atol=1e-4)

  up = conv_lib.Upsample()
  p = init(up)
  want = _torch_conv(torch, F.interpolate(xt, scale_factor=2.0, mode="nearest"), p["conv"])
  np.testing.assert_allclose(up.apply({"params": p}, x), _nhwc(want), atol=1e-4)

  down = conv_lib.Downsample()
  p = init(down)
  want = _torch_conv(torch, F.pad(xt, (0, 1, 0, 1)), p["conv"], stride=2, padding=0)
  np.testing.assert_allclose(down.apply({"params": p}, x), _nhwc(want), atol=1e-4)


def test_group_count_for_small_widths():
  assert [conv_lib.num_groups(c) for c in (512, 128, 64, 48, 24, 16, 3)] == [32, 32, 32, 16, 8, 16,
                                                                             1]


# ------------------------------------------------------------------------------ VQ-KD tokenizer


def test_vqkd_tokenizer_shapes_encode_lookup_and_training_call():
  m = VQKDTokenizer(**DEMO_VQKD)
  x = images(4)
  v = jax.jit(lambda x: m.init({"params": jax.random.PRNGKey(0)}, x))(x)

  @jax.jit
  def run(v, x):
    out = m.apply(v, x)
    idx = m.apply(v, x, method="encode")
    codes = m.apply(v, idx, method="lookup")
    out_t, state = m.apply(v, x, train=True, mutable=["codebook"],
                           rngs={"codebook": jax.random.PRNGKey(1)})
    _, same = m.apply(v, x, train=False, mutable=["codebook"])
    return out, idx, codes, state, same

  out, idx, codes, state, same = run(v, x)
  assert out["features_pred"].shape == (4, 64, 48) and out["features_pred"].dtype == jnp.float32
  assert out["indices"].shape == (4, 8, 8) and out["indices"].dtype == jnp.int32
  assert out["quantized"].shape == (4, 8, 8, 16)
  assert out["usage_counts"].shape == (64,) and float(out["usage_counts"].sum()) == 4 * 64
  assert out["commitment_loss"].shape == ()
  np.testing.assert_array_equal(idx, out["indices"])
  assert codes.shape == (4, 8, 8, 16)
  np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(codes, out["quantized"], atol=1e-5)  # The STE value is the code.

  # A training call updates the codebook and flips `initialized`; eval calls never do.
  assert bool(state["codebook"]["codebook"]["initialized"])
  before = nn.unbox(v)["codebook"]["codebook"]["embedding"]
  assert not np.allclose(nn.unbox(state)["codebook"]["codebook"]["embedding"], before)
  np.testing.assert_array_equal(nn.unbox(same)["codebook"]["codebook"]["embedding"], before)

  # Another resolution: positions of encoder and feature decoder interpolated.
  out40 = jax.eval_shape(m.apply, v, images(2, 40))
  assert out40["features_pred"].shape == (2, 100, 48) and out40["indices"].shape == (2, 10, 10)


def test_vqkd_gradients_reach_encoder_through_the_codebook():
  m = VQKDTokenizer(**DEMO_VQKD)
  x = images(2)
  v = nn.unbox(jax.jit(lambda x: m.init({"params": jax.random.PRNGKey(0)}, x))(x))
  target = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 48))

  def loss(params):
    out = m.apply({"params": params, "codebook": v["codebook"]}, x)
    return cosine_distillation_loss(out["features_pred"], target) + out["commitment_loss"]

  grads = jax.jit(jax.grad(loss))(v["params"])
  for name in ("encoder", "encode_task_layer", "decoder_embed", "decode_task_layer"):
    assert float(optax_norm(grads[name])) > 0, name


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def test_cosine_distillation_loss_closed_form():
  rng = np.random.default_rng(0)
  p, t = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  cos = np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
  np.testing.assert_allclose(cosine_distillation_loss(jnp.asarray(p), jnp.asarray(t)),
                             np.mean(1 - cos), rtol=1e-5)
  assert float(cosine_distillation_loss(jnp.asarray(p), 3 * jnp.asarray(p))) == pytest.approx(
      0.0, abs=1e-6)


# ------------------------------------------------------------------------------ Other modules


@pytest.mark.slow   # 33 s in the suite (three jit compiles for shapes)
def test_pixel_decoder_teacher_and_evaluator_shapes():
  def run(module, x):
    return jax.jit(lambda x: module.apply(module.init(jax.random.PRNGKey(0), x), x))(x)

  pd = PixelDecoder(code_dim=16, width=16, channel_mults=(2, 1, 1), num_res_blocks=1)
  y = run(pd, jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16)))
  assert y.shape == (2, 32, 32, 3) and y.dtype == jnp.float32 and np.all(np.isfinite(y))

  t = SupervisedViT(image_size=32, patch_size=4, width=32, depth=1, num_heads=4, num_classes=12)
  out = run(t, images())
  assert out["tokens"].shape == (2, 64, 32)
  assert out["logits"].shape == (2, 12)
  assert out["patch_logits"].shape == (2, 64, 13)

  e = EvaluatorNet(num_classes=12, width=16)
  out = run(e, images())
  assert out["features"].shape == (2, 64) and out["logits"].shape == (2, 12)


def test_imagenet_size_shapes_abstractly():
  # ViT-B/16 VQ-KD at 224 (upstream), used at 256 by the pixel decoder; shapes only (eval_shape).
  m = VQKDTokenizer(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                    num_codes=8192, code_dim=32, decoder_width=768, decoder_depth=1,
                    decoder_heads=12, teacher_dim=512)
  v = jax.eval_shape(lambda: m.init({"params": jax.random.PRNGKey(0)},
                                    jnp.zeros((1, 224, 224, 3))))
  v = nn.unbox(v)
  assert v["params"]["encoder"]["pos_embed"].shape == (1, 197, 768)
  assert v["codebook"]["codebook"]["embedding"].shape == (8192, 32)
  n_enc = sum(a.size for a in jax.tree.leaves(v["params"]["encoder"]))
  assert 85e6 < n_enc < 87e6  # ViT-B/16 without its head.
  out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 256, 256, 3))), v)
  assert out["indices"].shape == (2, 16, 16) and out["features_pred"].shape == (2, 256, 512)
  pd = PixelDecoder(code_dim=32, width=128)  # Upstream: (4, 2, 2, 1, 1), 3 blocks, 16 -> 256.
  z = jnp.zeros((1, 16, 16, 32))
  pv = jax.eval_shape(lambda: pd.init(jax.random.PRNGKey(0), z))
  assert jax.eval_shape(pd.apply, pv, z).shape == (1, 256, 256, 3)


def _modules():
  x = images()
  return [
      ("vqkd", VQKDTokenizer(**DEMO_VQKD), x),
      ("vqkd_plain", VQKDTokenizer(**dict(DEMO_VQKD, conv_stem=False)), x),
      ("pixel_decoder", PixelDecoder(code_dim=16, width=16, channel_mults=(2, 1),
                                     num_res_blocks=1), jnp.zeros((2, 8, 8, 16))),
      ("teacher", SupervisedViT(image_size=32, patch_size=4, width=32, depth=1, num_heads=4,
                                num_classes=12), x),
      ("evaluator", EvaluatorNet(num_classes=12, width=16), x),
  ]


@pytest.mark.parametrize("name,module,x", _modules(), ids=lambda a: a if isinstance(a, str) else "")
def test_every_parameter_has_logical_axis_names(name, module, x):
  variables = jax.eval_shape(lambda: module.init({"params": jax.random.PRNGKey(0)}, x))
  specs = nn.get_partition_spec(variables)
  flat_vars = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]
  for path, leaf in flat_vars:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{name}{where} has no logical axis names"
    names = leaf.names
    assert len(names) == leaf.value.ndim, where
    assert set(names) <= VOCAB, (where, names)
    if leaf.value.ndim >= 2 and "pos" not in where and "cls" not in where:
      assert any(n is not None for n in names), (where, names)
  assert jax.tree.leaves(specs["params"], is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec))


@pytest.mark.parametrize("name,module,x", _modules()[::2], ids=lambda a: a if isinstance(a, str) else "")
def test_bfloat16_compute_keeps_float32_params(name, module, x):
  m = module.clone(dtype=jnp.bfloat16)
  v = jax.eval_shape(lambda: nn.unbox(m.init({"params": jax.random.PRNGKey(0)}, x)))
  assert {a.dtype for a in jax.tree.leaves(v["params"])} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(m.apply, v, x)
  leaves = jax.tree.leaves(out)
  assert all(jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
             for a in leaves)


def test_patch_conv_equals_strided_convolution():
  """The patchify-matmul form of the ViT patch embedding against lax's strided convolution."""
  from vqkd_jax.nn.vit import PatchConv

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 34, 32, 3))       # 34: a remainder row pair
  m = PatchConv(8, 4)
  v = nn.unbox(m.init(jax.random.PRNGKey(1), x))
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape), v)
  ref = jax.lax.conv_general_dilated(x, v["params"]["kernel"], (4, 4), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest") + v["params"]["bias"]
  np.testing.assert_allclose(np.asarray(m.apply(v, x)), np.asarray(ref), rtol=1e-5, atol=1e-5)

