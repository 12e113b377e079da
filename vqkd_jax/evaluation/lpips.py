"""LPIPS v0.1 on VGG16 in Flax: the perceptual loss of VQGAN / FSQ and the pixel decoders (upstream
§3.1, §4) and the LPIPS validation metric.

  distance(x, y) = sum_l mean_{h,w} sum_c w_l[c] * (n(f_l(x)) - n(f_l(y)))[h, w, c]^2

x, y: images in [-1, 1], NHWC. The input is first scaled, (x - shift) / scale with shift
(-.030, -.088, -.188) and scale (.458, .448, .450) (the package's ScalingLayer). f_l: torchvision's
`vgg16().features` (13 conv3x3 + ReLU, a 2x2 max pool between the 5 blocks) tapped after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 (feature indices 3, 8, 15, 22, 29). n: unit normalisation over
channels, f / (||f||_2 + 1e-10). w_l: the 1x1 "lin" heads, no bias (non-negative in the released
weights). The result is one float32 distance per example, [B].

Dropout: upstream keeps the package's `nn.Dropout(p=0.5)` in front of each head active in
training (VGG frozen, but the loss is evaluated in train mode). `dropout` is that rate here, applied
only when `train=True` (needs a "dropout" rng); it defaults to 0, a deterministic loss with the
same expectation. Set 0.5 to follow upstream exactly.

Precision: `dtype` is the computation dtype of the VGG convolutions (bfloat16 on GPUs); the scaling,
the normalisation, the heads and the output stay float32. `precision` is the lax precision of the
convolutions (None: the backend's default, TF32 on NVIDIA GPUs in float32).

Weights: torchvision's vgg16 state dict (`vgg16-397923af.pth`: `features.N.{weight,bias}`, the
`classifier.*` entries ignored) and the lpips package's `lpips/weights/v0.1/vgg.pth`
(`lin{0..4}.model.1.weight`), converted once, without torch and without unpickling arbitrary
objects (io/torch_pth.py):

  vqkd convert lpips vgg16-397923af.pth lpips_vgg.msgpack --lin .../lpips/weights/v0.1/vgg.pth

then `load_lpips(path, dtype)` -> (LPIPS module, variables) on the JAX side (.msgpack or .npz).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqkd_jax.io.param_tree import flatten, shape_mismatches, unflatten

Dtype = Any

# torchvision vgg16().features: per block, (index of the conv in `features`, output channels). A
# ReLU follows each conv (index + 1); a 2x2/2 max pool follows each block (the last one unused).
VGG16_BLOCKS = (((0, 64), (2, 64)),
                ((5, 128), (7, 128)),
                ((10, 256), (12, 256), (14, 256)),
                ((17, 512), (19, 512), (21, 512)),
                ((24, 512), (26, 512), (28, 512)))
TAP_CHANNELS = tuple(block[-1][1] for block in VGG16_BLOCKS)   # relu1_2 .. relu5_3
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def unit_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / (||x||_2 + eps) over the channel (last) axis, as the package's normalize_tensor."""
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class VGG16Features(nn.Module):
  """Scaled images [B, H, W, 3] -> the 5 tap maps, [B, H / 2^l, W / 2^l, TAP_CHANNELS[l]] in `dtype`
  (l = 0..4; H, W >= 16). Convs are named by their torchvision index: conv0, conv2, ..., conv28."""
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = x.astype(self.dtype)
    taps = []
    for b, block in enumerate(VGG16_BLOCKS):
      if b:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for index, channels in block:
        x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, precision=self.precision, name=f"conv{index}",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.he_normal(), ("patch", "patch", "conv_in", "conv_out")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("conv_out",)))(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """(x, y) images in [-1, 1] [B, H, W, 3] (H, W >= 16) -> per-example distance float32 [B].

  Params: "vgg" (VGG16Features) and heads "lin0".."lin4" [C_l] (the 1x1 convs without bias).
  `dropout` (default 0; upstream 0.5) acts on the squared differences only when `train=True`, with
  the "dropout" rng."""
  dtype: Dtype = jnp.float32
  precision: Any = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    vgg = VGG16Features(self.dtype, self.precision, name="vgg")
    # x and y in separate calls, as the package (identical images: 0 up to rounding).
    taps_x = vgg((x.astype(jnp.float32) - shift) / scale)
    taps_y = vgg((y.astype(jnp.float32) - shift) / scale)
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for l, (fx, fy) in enumerate(zip(taps_x, taps_y)):
      channels = fx.shape[-1]
      d = jnp.square(unit_normalize(fx.astype(jnp.float32)) -
                     unit_normalize(fy.astype(jnp.float32)))
      if train and self.dropout:
        d = nn.Dropout(self.dropout, deterministic=False, name=f"dropout{l}")(d)
      w = self.param(f"lin{l}", nn.with_logical_partitioning(
          nn.initializers.constant(1.0 / channels), ("conv_out",)), (channels,))
      head = jnp.einsum("bhwc,c->bhw", d, w, precision=jax.lax.Precision.HIGHEST)
      total = total + jnp.mean(head, axis=(1, 2))
    return total


# ----------------------------------------------------------------------------------- weights


def _param_shapes() -> dict[str, tuple[int, ...]]:
  """{"vgg/conv0/kernel": (3, 3, 3, 64), ..., "lin0": (64,), ...}: the converted layout."""
  shapes, cin = {}, 3
  for block in VGG16_BLOCKS:
    for index, channels in block:
      shapes[f"vgg/conv{index}/kernel"] = (3, 3, cin, channels)
      shapes[f"vgg/conv{index}/bias"] = (channels,)
      cin = channels
  for l, channels in enumerate(TAP_CHANNELS):
    shapes[f"lin{l}"] = (channels,)
  return shapes


def torch_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
  """The expected keys and shapes of (torchvision's vgg16 state dict without `classifier.*`, the
  package's `vgg.pth`)."""
  vgg, cin = {}, 3
  for block in VGG16_BLOCKS:
    for index, channels in block:
      vgg[f"features.{index}.weight"] = (channels, cin, 3, 3)
      vgg[f"features.{index}.bias"] = (channels,)
      cin = channels
  lin = {f"lin{l}.model.1.weight": (1, c, 1, 1) for l, c in enumerate(TAP_CHANNELS)}
  return vgg, lin


def check_lpips_params(params: Mapping) -> None:
  """Raises one ValueError naming every missing, unexpected and wrongly shaped parameter."""
  if not isinstance(params, Mapping):
    raise ValueError(f"LPIPS params must be a dict, got {type(params).__name__}")
  got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  parts = shape_mismatches(got, _param_shapes())
  if parts:
    raise ValueError("LPIPS params do not fit: " + "; ".join(parts))


def convert_lpips_state_dicts(vgg_state: Mapping[str, np.ndarray],
                              lin_state: Mapping[str, np.ndarray]) -> dict:
  """torchvision vgg16 state dict + the package's `vgg.pth` -> LPIPS params (float32 NumPy).

  `classifier.*` of the vgg16 state dict is ignored; every other key and every shape is checked,
  and one ValueError names all missing, unexpected and wrongly shaped keys of both files."""
  want_vgg, want_lin = torch_shapes()
  vgg = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
  parts = [f"vgg16 {p}" for p in shape_mismatches({k: tuple(np.shape(v)) for k, v in vgg.items()},
                                             want_vgg)]
  parts += [f"lin {p}" for p in shape_mismatches({k: tuple(np.shape(v)) for k, v in lin_state.items()},
                                            want_lin)]
  if parts:
    raise ValueError("LPIPS weights do not fit: " + "; ".join(parts))
  flat = {}
  for block in VGG16_BLOCKS:
    for index, _ in block:
      w = np.asarray(vgg[f"features.{index}.weight"], np.float32)
      flat[f"vgg/conv{index}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))   # OIHW->HWIO
      flat[f"vgg/conv{index}/bias"] = np.asarray(vgg[f"features.{index}.bias"], np.float32)
  for l in range(len(TAP_CHANNELS)):
    flat[f"lin{l}"] = np.asarray(lin_state[f"lin{l}.model.1.weight"], np.float32).reshape(-1)
  return unflatten(flat)


def save_lpips_params(params: Mapping, path: str | os.PathLike) -> str:
  """Writes LPIPS params as .npz ("vgg/conv0/kernel" keys) or flax msgpack (any other name); no
  pickle. Returns the path written."""
  path = os.fspath(path)
  check_lpips_params(params)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  if path.endswith(".npz"):
    with open(path, "wb") as f:
      np.savez(f, **flat)
    return path
  from flax import serialization
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(unflatten(flat)))
  return path


def load_lpips_params(path: str | os.PathLike) -> dict:
  """Reads params written by save_lpips_params (.npz or msgpack), checking every key and shape.

  Raises FileNotFoundError (with the command that makes the file) or ValueError (unreadable file,
  or the keys and shapes that do not fit)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"LPIPS weights not found: {path} (convert them once with `vqkd convert lpips "
        "vgg16-397923af.pth OUT --lin <site-packages>/lpips/weights/v0.1/vgg.pth`)")
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        params = unflatten({k: f[k] for k in f.files})
    else:
      from flax import serialization
      with open(path, "rb") as f:
        params = serialization.msgpack_restore(f.read())
  except Exception as e:
    raise ValueError(f"cannot read LPIPS weights {path}: {type(e).__name__}: {e} (expected a file "
                     "written by `vqkd convert lpips`)") from e
  try:
    check_lpips_params(params)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return params


def convert_lpips(vgg_pth: str | os.PathLike, lin_pth: str | os.PathLike,
                  out_path: str | os.PathLike) -> str:
  """`vqkd convert lpips VGG.pth OUT --lin LIN.pth`: reads torchvision's vgg16 state dict and the
  package's `weights/v0.1/vgg.pth` without torch (no arbitrary unpickling), checks every key and
  shape, and writes OUT (.npz, else msgpack). Returns the path written."""
  from vqkd_jax.io.torch_pth import read_state_dict
  params = convert_lpips_state_dicts(read_state_dict(vgg_pth), read_state_dict(lin_pth))
  return save_lpips_params(params, out_path)


def load_lpips(path: str | os.PathLike, dtype: Dtype = jnp.float32, *, dropout: float = 0.0,
               precision: Any = None) -> tuple[LPIPS, dict]:
  """(LPIPS module, variables {"params": ...}) from a converted file: distances are
  `module.apply(variables, x, y)` -> [B]."""
  return (LPIPS(dtype=dtype, precision=precision, dropout=dropout),
          {"params": load_lpips_params(path)})


def random_lpips_params(seed: int = 0) -> dict:
  """Random params in the converted layout (benchmarks and tests; not a perceptual metric):
  He-normal convs, small biases, the released heads' scale (1 / C). NumPy float32, no compile."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in _param_shapes().items():
    if name.endswith("/kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      flat[name] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name.endswith("/bias"):
      flat[name] = rng.standard_normal(shape, np.float32) * np.float32(0.01)
    else:
      flat[name] = rng.uniform(0, 2.0 / shape[0], shape).astype(np.float32)
  return unflatten(flat)
