"""The FID Inception-v3 (pytorch-fid's `FIDInceptionV3`, TF "inception-2015-12-05" weights) in Flax.

Architecture (torchvision Inception3 with pytorch-fid's patches): BasicConv = conv (no bias) +
BatchNorm(eps 1e-3) + ReLU, here with the BatchNorm folded into the conv (kernel * gamma /
sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps), folded in float64 by
`convert_inception`); the branch average pools of Mixed_5b..d, 6b..e and 7b are 3x3/1 with padding
1 and count_include_pad=False (TF's average pool); Mixed_7c (FIDInceptionE_2) pools with a 3x3/1
max pool instead. Features: the global average of Mixed_7c, 2048-d ("pool", what FID uses); the
1008-way fc on them ("logits"; "logits_unbiased" = without the fc bias, what the Inception Score
uses in improved-gan, torch-fidelity and OpenAI's evaluator).

Input: uint8 [B, H, W, 3] (any H, W), resized to 299x299 bilinearly (two taps per axis, width
then height, as the reference kernels; gathers, no matmul), then scaled to [-1, 1]. Two
conventions (`preprocess`):
  "torch": F.interpolate(mode="bilinear", align_corners=False, antialias=False), x / 127.5 - 1:
           pytorch-fid and upstream VQ-KD's FID (§6).
  "tf1":   tf.compat.v1.image.resize_bilinear(align_corners=False, half_pixel_centers=False) (the
           old asymmetric sampling of the TF graph), (x - 128) / 128: the TF FID code, OpenAI's
           evaluator and torch-fidelity (upstream's IS tool).

Precision (`precision_mode`): "exact" = float32 with Precision.HIGHEST on every conv and matmul
(pool features within ~5e-7 of pytorch-fid in float32, on CPU and on an H100); "fast" = float16
activations and weights (float32 resize, pooled features and fc; on an H100 4.2e-4 off a float64
forward, FID drift 0.0004 at FID 50.4, 6.5x exact's speed: the fast mode to use); "tf32" =
float32 with the backend's default precision (TF32 on NVIDIA GPUs: 4.3e-4 off, 4.3x; FID drift
0.003); "bf16" = bfloat16 activations and weights (3.6e-3 off, 6.1x, but FID drift 0.108: over
the 0.05 that FID comparisons tolerate). float16 keeps TF32's 10 mantissa bits at bfloat16's
speed; the network's activations (O(1)-O(100) after the folded BatchNorms) are far inside its
range. Relative errors are max |a - b| / max |b| on random weights.
Tried and rejected (H100, 5 Dec 2026): float32 emulated by three TF32 convolutions (3xTF32: x and
w split into a TF32 part and the rest, the lo x lo term dropped) runs at 3,977 images/s against
exact's 2,766, but its pool features are 4.5e-5 off a float64 forward (exact: 3.9e-7, TF32:
4.3e-4): per convolution 1e-6 to 1e-5, growing with the reduction length, since the tensor
cores' TF32 accumulation is not float32's. Not exact, and no better as a fast mode than "tf32".
Tried on 6 Dec: the three products of each 32-deep block summed into a float32 accumulator outside
the tensor cores (a Pallas GEMM on im2col patches): 2e-7 to 4e-7 off float64 per convolution
(cuDNN float32: 2.4e-7 to 1.3e-6), but Pallas' Triton TF32 GEMMs ran at 19-28 TFLOP/s of float32
work, no faster than cuDNN's float32 (README, "Where the time goes"). Tried on 6 Dec (evening):
3xTF32 on the first layers only, float32 after them: off float64 by 3.1e-6 (the stem), 8.9e-6
(+ Mixed_5), 1.1e-5 (+ Mixed_6a), and never faster than exact (2,263-2,445 against 2,770
images/s with NCHW convolutions; with NHWC, TF32's better layout, float32 loses more).

Weights: `convert_inception(read_state_dict("pt_inception-2015-12-05-6726825d.pth"))` (pytorch-fid's
key names; torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` uses the same names), or
`convert_inception_file(src, dst)` once, then `load_inception_params(dst)` (.npz or .msgpack).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.io.param_tree import flatten, shape_mismatches, unflatten

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3
PREPROCESS = ("torch", "tf1")
PRECISION_MODES = ("exact", "fast", "tf32", "bf16")

Dtype = Any


def precision_settings(mode: str) -> tuple[Dtype, Any]:
  """(compute dtype, lax precision) of a precision mode (PRECISION_MODES)."""
  if mode == "exact":
    return jnp.float32, jax.lax.Precision.HIGHEST
  if mode == "fast":
    return jnp.float16, jax.lax.Precision.DEFAULT
  if mode == "tf32":
    return jnp.float32, jax.lax.Precision.DEFAULT
  if mode == "bf16":
    return jnp.bfloat16, jax.lax.Precision.DEFAULT
  raise ValueError(f"unknown precision mode {mode!r}; choose from {PRECISION_MODES}")


# ------------------------------------------------------------------------------------ resize


def _bilinear_taps(in_size: int, out_size: int, convention: str):
  """Per output index: (lower index, upper index, weight of upper), computed in float32 as the
  reference kernels do: scale = float32(in) / out; PyTorch's CPU upsample_bilinear2d forms
  scale * (dst + 0.5) - 0.5 with one rounding (a fused multiply-add: emulated in float64, this
  matches F.interpolate to 1 ulp, the plain float32 expression only to ~1e-5 relative); TF1's
  ResizeBilinear forms dst * scale."""
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  if convention == "torch":
    src = (np.float64(scale) * np.float64(dst + f32(0.5)) - 0.5).astype(f32)
    src = np.maximum(src, f32(0))
  elif convention == "tf1":
    src = dst * scale
  else:
    raise ValueError(f"unknown resize convention {convention!r}; choose from {PREPROCESS}")
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  lam = (src - lo.astype(f32)).astype(f32)
  return lo, hi, lam


def _lerp_axis(x: jax.Array, axis: int, out_size: int, convention: str) -> jax.Array:
  """Bilinear interpolation along one axis: x[lo] * (1 - l) + x[hi] * l per output index (the
  reference kernels' two taps and float32 weights; a gather and an elementwise sum, no matmul)."""
  lo, hi, lam = _bilinear_taps(x.shape[axis], out_size, convention)
  shape = [1] * x.ndim
  shape[axis] = out_size
  lam = jnp.asarray(lam).reshape(shape)
  return (jnp.take(x, jnp.asarray(lo), axis=axis) * (jnp.float32(1) - lam) +
          jnp.take(x, jnp.asarray(hi), axis=axis) * lam)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE,
                    convention: str = "torch") -> jax.Array:
  """float [B, H, W, C] -> float32 [B, size, size, C], width then height (as the reference
  kernels: h-weights * (w-weights * pixels))."""
  x = images.astype(jnp.float32)
  if x.shape[2] != size:
    x = _lerp_axis(x, 2, size, convention)
  if x.shape[1] != size:
    x = _lerp_axis(x, 1, size, convention)
  return x


def preprocess_images(images: jax.Array, convention: str = "torch") -> jax.Array:
  """uint8 (or float in [0, 255]) [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1]."""
  x = resize_bilinear(images, INPUT_SIZE, convention)
  if convention == "torch":
    return x / 127.5 - 1.0
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------- model


class ConvWeights(nn.Module):
  """A BasicConv's parameters ({"kernel": [kh, kw, in, out], "bias": [out]}, the names and
  shapes of nn.Conv's), declared without applying them."""
  shape: Sequence[int]

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("patch", "patch", "conv_in", "conv_out")),
        tuple(self.shape))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.shape[-1],))
    return kernel, bias


def _conv(x, kernel, stride, padding, dtype, precision):
  """NHWC x HWIO convolution in `dtype` (nn.Conv's), padding ((top, bottom), (left, right))."""
  return jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


class BasicConv(nn.Module):
  """conv (BatchNorm folded into kernel and bias) + ReLU: [B, H, W, C] -> [B, H', W', features].

  kernel, stride and padding are (height, width) pairs (padding per side, as PyTorch's)."""
  features: int
  kernel: Sequence[int] = (1, 1)
  stride: int = 1
  padding: Sequence[int] = (0, 0)
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def weights(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) for an input of `in_features` channels (this layer's parameters)."""
    return ConvWeights((*self.kernel, in_features, self.features), name="conv")()

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.weights(x.shape[-1])
    ph, pw = self.padding
    y = _conv(x, kernel, self.stride, ((ph, ph), (pw, pw)), self.dtype, self.precision)
    return nn.relu(y + bias.astype(self.dtype))


def pointwise_group(x: jax.Array, convs: Sequence[BasicConv], pooled: BasicConv | None = None,
                    dtype: Dtype = jnp.float32, precision: Any = None) -> list[jax.Array]:
  """The 1x1 BasicConvs of an Inception block that read the same input x, then its pool branch
  `pooled` (1x1 conv of the 3x3 average pool of x) if given: [relu(conv_i(x)) ...]. The
  parameters are the BasicConvs' own (the same names and values).

  In the exact mode (float32, Precision.HIGHEST) they run as one convolution against the kernels
  concatenated along the output channels: one larger GEMM instead of several small ones (each
  output channel's sum is the same). The pool branch joins it: both maps are linear and the
  average of a constant is the constant (count_include_pad=False), so conv(avg_pool(x)) =
  avg_pool(conv(x)), and the pool runs on the branch's channels instead of x's. H100, exact mode,
  batch 256: 2,778 -> 2,936 images/s; pool features 4.5e-7 off the separate convolutions.
  The other precision modes run each as written. Merged (even with the pool branch as written),
  the float16 mode's FID drift against exact went from 0.0003 to 0.026 (H100, 2 x 5,000 images;
  features 4.6e-4 off float64 either way), for 20,700 against 18,100 images/s; "tf32" merged was
  not measured, so it keeps the drift measured without (0.003)."""
  if jnp.dtype(dtype) != jnp.float32 or precision != jax.lax.Precision.HIGHEST:
    return [conv(x) for conv in convs] + ([pooled(_avg_pool_same(x))] if pooled else [])
  group = [*convs, *([pooled] if pooled is not None else [])]
  weights = [conv.weights(x.shape[-1]) for conv in group]
  kernel = jnp.concatenate([k for k, _ in weights], axis=-1)
  y = _conv(x, kernel, 1, ((0, 0), (0, 0)), dtype, precision)
  parts = jnp.split(y, np.cumsum([k.shape[-1] for k, _ in weights])[:-1], axis=-1)
  if pooled is not None:
    parts[-1] = _avg_pool_same(parts[-1])
  return [nn.relu(part + bias.astype(dtype)) for part, (_, bias) in zip(parts, weights)]


def _avg_pool_same(x):
  """3x3 stride 1 average with padding 1, the padded zeros not counted (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/c/d): [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]."""
  pool_features: int
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.dtype, self.precision,
                                                           name=name)
    b1, b5, b3, bp = pointwise_group(
        x, [c(64, name="branch1x1"), c(48, name="branch5x5_1"), c(64, name="branch3x3dbl_1")],
        c(self.pool_features, name="branch_pool"), self.dtype, self.precision)
    b5 = c(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
    b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a): [B, 35, 35, 288] -> [B, 17, 17, 768]."""
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    b3 = BasicConv(384, (3, 3), 2, name="branch3x3", **kw)(x)
    bd = BasicConv(64, name="branch3x3dbl_1", **kw)(x)
    bd = BasicConv(96, (3, 3), 1, (1, 1), name="branch3x3dbl_2", **kw)(bd)
    bd = BasicConv(96, (3, 3), 2, name="branch3x3dbl_3", **kw)(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp.astype(b3.dtype)], -1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..e): [B, 17, 17, 768] -> [B, 17, 17, 768]; 1x7 / 7x1 factorised."""
  channels_7x7: int
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1, b7, bd, bp = pointwise_group(
        x, [BasicConv(192, name="branch1x1", **kw), BasicConv(c7, name="branch7x7_1", **kw),
            BasicConv(c7, name="branch7x7dbl_1", **kw)],
        BasicConv(192, name="branch_pool", **kw), **kw)
    b7 = BasicConv(c7, row[0], 1, row[1], name="branch7x7_2", **kw)(b7)
    b7 = BasicConv(192, col[0], 1, col[1], name="branch7x7_3", **kw)(b7)
    bd = BasicConv(c7, col[0], 1, col[1], name="branch7x7dbl_2", **kw)(bd)
    bd = BasicConv(c7, row[0], 1, row[1], name="branch7x7dbl_3", **kw)(bd)
    bd = BasicConv(c7, col[0], 1, col[1], name="branch7x7dbl_4", **kw)(bd)
    bd = BasicConv(192, row[0], 1, row[1], name="branch7x7dbl_5", **kw)(bd)
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a): [B, 17, 17, 768] -> [B, 8, 8, 1280]."""
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    b3, b7 = pointwise_group(x, [BasicConv(192, name="branch3x3_1", **kw),
                                 BasicConv(192, name="branch7x7x3_1", **kw)], **kw)
    b3 = BasicConv(320, (3, 3), 2, name="branch3x3_2", **kw)(b3)
    b7 = BasicConv(192, (1, 7), 1, (0, 3), name="branch7x7x3_2", **kw)(b7)
    b7 = BasicConv(192, (7, 1), 1, (3, 0), name="branch7x7x3_3", **kw)(b7)
    b7 = BasicConv(192, (3, 3), 2, name="branch7x7x3_4", **kw)(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp.astype(b3.dtype)], -1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, average pool) / FIDInceptionE_2 (Mixed_7c, `max_pool=True`):
  [B, 8, 8, C] -> [B, 8, 8, 2048]."""
  max_pool: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
    convs = [BasicConv(320, name="branch1x1", **kw), BasicConv(384, name="branch3x3_1", **kw),
             BasicConv(448, name="branch3x3dbl_1", **kw)]
    pool_conv = BasicConv(192, name="branch_pool", **kw)
    if self.max_pool:   # pytorch-fid's patch: the TF graph max-pools in its last block
      b1, b3, bd = pointwise_group(x, convs, **kw)
      bp = pool_conv(nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))))
    else:
      b1, b3, bd, bp = pointwise_group(x, convs, pool_conv, **kw)
    b3 = jnp.concatenate([BasicConv(384, row[0], 1, row[1], name="branch3x3_2a", **kw)(b3),
                          BasicConv(384, col[0], 1, col[1], name="branch3x3_2b", **kw)(b3)], -1)
    bd = BasicConv(384, (3, 3), 1, (1, 1), name="branch3x3dbl_2", **kw)(bd)
    bd = jnp.concatenate([BasicConv(384, row[0], 1, row[1], name="branch3x3dbl_3a", **kw)(bd),
                          BasicConv(384, col[0], 1, col[1], name="branch3x3dbl_3b", **kw)(bd)], -1)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """uint8 images [B, H, W, 3] -> {"pool": float32 [B, 2048], "logits": float32 [B, 1008],
  "logits_unbiased": float32 [B, 1008]} (see the module docstring for the conventions)."""
  preprocess: str = "torch"
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict:
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = preprocess_images(images, self.preprocess).astype(self.dtype)
    x = BasicConv(32, (3, 3), 2, name="Conv2d_1a_3x3", **kw)(x)             # 149
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)                # 147
    x = BasicConv(64, (3, 3), 1, (1, 1), name="Conv2d_2b_3x3", **kw)(x)
    x = nn.max_pool(x, (3, 3), (2, 2))                                      # 73
    x = BasicConv(80, name="Conv2d_3b_1x1", **kw)(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)               # 71
    x = nn.max_pool(x, (3, 3), (2, 2))                                      # 35
    x = InceptionA(32, name="Mixed_5b", **kw)(x)
    x = InceptionA(64, name="Mixed_5c", **kw)(x)
    x = InceptionA(64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)                                # 17
    x = InceptionC(128, name="Mixed_6b", **kw)(x)
    x = InceptionC(160, name="Mixed_6c", **kw)(x)
    x = InceptionC(160, name="Mixed_6d", **kw)(x)
    x = InceptionC(192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)                                # 8
    x = InceptionE(False, name="Mixed_7b", **kw)(x)
    x = InceptionE(True, name="Mixed_7c", **kw)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    kernel = self.param("fc_kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "vocab")), (FEATURE_DIM, NUM_CLASSES))
    bias = self.param("fc_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (NUM_CLASSES,))
    unbiased = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool, "logits": unbiased + bias, "logits_unbiased": unbiased}


def build_inception(preprocess: str = "torch", precision_mode: str = "exact") -> FIDInceptionV3:
  if preprocess not in PREPROCESS:
    raise ValueError(f"unknown preprocess {preprocess!r}; choose from {PREPROCESS}")
  dtype, precision = precision_settings(precision_mode)
  return FIDInceptionV3(preprocess=preprocess, dtype=dtype, precision=precision)


def random_inception_params(seed: int = 0) -> dict:
  """Random parameters in the converted layout (for benchmarks and tests): He-normal conv kernels
  (activations stay O(1) through the ReLUs, like a network with its BatchNorms folded), small
  random biases, a 1/sqrt(2048) fc. NumPy float32, no compilation."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in _param_shapes().items():
    if name.endswith("/conv/kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      flat[name] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name == "fc_kernel":
      flat[name] = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(FEATURE_DIM))
    else:
      flat[name] = rng.standard_normal(shape, np.float32) * np.float32(0.1)
  return unflatten(flat)


# ----------------------------------------------------------------------------------- weights


@lru_cache(maxsize=1)
def _param_shapes() -> dict[str, tuple[int, ...]]:
  """{"Mixed_5b/branch1x1/conv/kernel": shape, ...} of FIDInceptionV3, from the model itself."""
  tree = jax.eval_shape(lambda: nn.unbox(FIDInceptionV3().init(
      jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)))["params"])
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _conv_layers() -> list[tuple[tuple[str, ...], tuple[int, int, int, int]]]:
  """(param path without "conv", HWIO kernel shape) of every BasicConv."""
  return [(tuple(k.split("/")[:-2]), shape) for k, shape in _param_shapes().items()
          if k.endswith("/conv/kernel")]


def convert_inception(state_dict: Mapping[str, np.ndarray], bn_eps: float = BN_EPS) -> dict:
  """pytorch-fid / torch-fidelity FID-Inception state dict -> FIDInceptionV3 params (float32).

  Keys per BasicConv `<path>`: `<path>.conv.weight` [O, I, kh, kw], `<path>.bn.{weight, bias,
  running_mean, running_var}` (`<path>.bn.num_batches_tracked` ignored); plus `fc.weight`
  [1008, 2048] and `fc.bias` [1008]. BatchNorm is folded into the conv in float64. Raises one
  ValueError naming every missing, unexpected and wrongly shaped key.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  expected: dict[str, tuple[int, ...]] = {}
  layers = _conv_layers()
  for path, (kh, kw, cin, cout) in layers:
    p = ".".join(path)
    expected[f"{p}.conv.weight"] = (cout, cin, kh, kw)
    for n in ("weight", "bias", "running_mean", "running_var"):
      expected[f"{p}.bn.{n}"] = (cout,)
  expected["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
  expected["fc.bias"] = (NUM_CLASSES,)
  ignored = {k for k in sd if k.endswith(".bn.num_batches_tracked")}
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected) - ignored)
  wrong = sorted(f"{k}: {tuple(sd[k].shape)} (expected {expected[k]})"
                 for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
  if missing or unexpected or wrong:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
      if items:
        parts.append(f"{title} ({len(items)}): " + ", ".join(items[:12])
                     + (" ..." if len(items) > 12 else ""))
    raise ValueError("FID Inception state dict does not fit: " + "; ".join(parts))

  params: dict = {}
  for path, _ in layers:
    p = ".".join(path)
    w = sd[f"{p}.conv.weight"].astype(np.float64)
    gamma, beta = sd[f"{p}.bn.weight"].astype(np.float64), sd[f"{p}.bn.bias"].astype(np.float64)
    mean, var = (sd[f"{p}.bn.running_mean"].astype(np.float64),
                 sd[f"{p}.bn.running_var"].astype(np.float64))
    scale = gamma / np.sqrt(var + bn_eps)
    node = params
    for k in path:
      node = node.setdefault(k, {})
    node["conv"] = {"kernel": (w.transpose(2, 3, 1, 0) * scale).astype(np.float32),
                    "bias": (beta - mean * scale).astype(np.float32)}
  params["fc_kernel"] = sd["fc.weight"].astype(np.float32).T.copy()
  params["fc_bias"] = sd["fc.bias"].astype(np.float32)
  return params


def check_inception_params(params: Mapping) -> None:
  """Raises one ValueError naming missing, unexpected and wrongly shaped parameters."""
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  parts = shape_mismatches(got, _param_shapes())
  if parts:
    raise ValueError("Inception params do not fit: " + "; ".join(parts))


def save_inception_params(params: Mapping, path: str | os.PathLike) -> str:
  """Writes converted params as .npz ("a/b/kernel" keys) or .msgpack (flax serialization); no
  pickle. Returns the path written."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  check_inception_params(params)
  if path.endswith(".msgpack"):
    from flax import serialization
    with open(path, "wb") as f:
      f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(params))))
    return path
  if not path.endswith(".npz"):
    path += ".npz"
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flatten(params).items()})
  return path


def load_inception_params(path: str | os.PathLike) -> dict:
  """Reads params written by save_inception_params (.npz or .msgpack), checking every key and
  shape."""
  path = os.fspath(path)
  if path.endswith(".msgpack"):
    from flax import serialization
    with open(path, "rb") as f:
      params = serialization.msgpack_restore(f.read())
  else:
    with np.load(path, allow_pickle=False) as f:
      params = unflatten({k: f[k] for k in f.files})
  check_inception_params(params)
  return params


def convert_inception_file(src_pth: str | os.PathLike, dst: str | os.PathLike) -> str:
  """`vqkd convert inception SRC.pth DST`: reads pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's copy) without torch, converts and writes DST (.npz or .msgpack). Returns the
  path written."""
  from vqkd_jax.io.torch_pth import read_state_dict
  return save_inception_params(convert_inception(read_state_dict(src_pth)), dst)
