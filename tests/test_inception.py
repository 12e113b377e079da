"""The JAX FID Inception against pytorch-fid's FIDInceptionV3 on the same random weights, through
the whole path (torch.save -> our .pth reader -> convert_inception -> Flax), the resize against
F.interpolate and a NumPy TF1 reference, the converter's key/shape errors and params files."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vqkd_jax.evaluation import inception as inc
from vqkd_jax.io import read_state_dict

from torch_reference import pytorch_fid_module


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------ resize


def tf1_resize_reference(x, out_h, out_w):
  """tf.compat.v1.image.resize_bilinear(align_corners=False, half_pixel_centers=False), written
  per output pixel from TF's formula: src = dst * in / out, lower = floor(src),
  upper = min(ceil(src), in - 1), lerp = src - lower."""
  n, h, w, c = x.shape
  out = np.zeros((n, out_h, out_w, c), np.float64)
  sh, sw = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
  for i in range(out_h):
    yi = np.float32(i) * sh
    y0, y1, ly = int(np.floor(yi)), min(int(np.ceil(yi)), h - 1), float(yi - np.floor(yi))
    for j in range(out_w):
      xj = np.float32(j) * sw
      x0, x1, lx = int(np.floor(xj)), min(int(np.ceil(xj)), w - 1), float(xj - np.floor(xj))
      top = x[:, y0, x0] + (x[:, y0, x1] - x[:, y0, x0]) * lx
      bottom = x[:, y1, x0] + (x[:, y1, x1] - x[:, y1, x0]) * lx
      out[:, i, j] = top + (bottom - top) * ly
  return out


@pytest.mark.parametrize("h,w,out", [(7, 5, 11), (16, 12, 9), (10, 10, 10), (3, 8, 20)])
def test_tf1_resize_matches_reference(h, w, out):
  x = np.random.default_rng(0).integers(0, 256, (2, h, w, 3)).astype(np.float64)
  ours = np.asarray(inc.resize_bilinear(jnp.asarray(x, jnp.float32), out, "tf1"))
  np.testing.assert_allclose(ours, tf1_resize_reference(x, out, out), atol=2e-4)


def test_resize_taps_are_interpolation_weights():
  for conv in inc.PREPROCESS:
    for n in (1, 5, 64, 299, 512):
      lo, hi, lam = inc._bilinear_taps(n, 299, conv)
      assert ((0 <= lo) & (lo <= hi) & (hi <= lo + 1) & (hi < n)).all()
      assert ((0 <= lam) & (lam < 1)).all()
    lo, hi, lam = inc._bilinear_taps(299, 299, conv)
    np.testing.assert_array_equal(lo, np.arange(299))
    np.testing.assert_array_equal(lam, 0)


def test_preprocess_scaling():
  """Constant images stay constant under resizing: 0 and 255 map to -1 and 1 ("torch") or
  -1 and 127/128 ("tf1")."""
  x = np.stack([np.zeros((9, 13, 3), np.uint8), np.full((9, 13, 3), 255, np.uint8)])
  torch_style = np.asarray(inc.preprocess_images(jnp.asarray(x), "torch"))
  tf_style = np.asarray(inc.preprocess_images(jnp.asarray(x), "tf1"))
  assert torch_style.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(torch_style[0], -1, atol=1e-6)
  np.testing.assert_allclose(torch_style[1], 1, atol=1e-6)
  np.testing.assert_allclose(tf_style[1], 127 / 128, atol=1e-6)


# ------------------------------------------------------------------------- torch references


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.mark.parametrize("h,w", [(64, 80), (320, 300), (299, 299), (17, 600)])
def test_torch_resize_matches_f_interpolate(torch, h, w):
  import torch.nn.functional as F
  x = np.random.default_rng(1).integers(0, 256, (2, h, w, 3)).astype(np.float32)
  ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(inc.resize_bilinear(jnp.asarray(x), 299, "torch"))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)   # 255-range values: ~2 ulp


@pytest.fixture(scope="module")
def pytorch_fid(torch, tmp_path_factory):
  """pytorch-fid's InceptionV3 (block 3: 2048-d pool) around a FID Inception with random weights:
  He-normal convs, BatchNorm scale/shift/statistics near (1, 0, 0, 1) but random, fc torchvision's
  default; the weight download is blocked. Returns (wrapper, net, path of the torch.save'd state
  dict in the legacy format, as the 2019 pt_inception file may be).

  The weights matter: BatchNorms with random statistics far from the conv outputs' make a
  contracting network whose features do not depend on the image (1e-8 apart for two images);
  statistics calibrated on a batch make a chaotic one (float32 ~1e-4 off float64). This one is
  input-sensitive (features of two images 1e-2 apart) and torch float32 agrees with float64 to
  ~5e-7.
  """
  fid_inception = pytorch_fid_module(torch, "inception")
  torch.manual_seed(0)
  net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):   # He-normal: near-critical, neither dying nor chaotic
        m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2, generator=g)
        m.bias.normal_(0.0, 0.2, generator=g)
        m.running_mean.normal_(0.0, 0.2, generator=g)
        m.running_var.uniform_(0.8, 1.2, generator=g)
  net.eval()
  original = fid_inception.fid_inception_v3
  fid_inception.fid_inception_v3 = lambda: net
  try:
    wrapper = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  finally:
    fid_inception.fid_inception_v3 = original
  wrapper.eval()
  path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
  torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
  return wrapper, net, path


@pytest.fixture(scope="module")
def converted(pytorch_fid):
  return inc.convert_inception(read_state_dict(pytorch_fid[2]))


def reference_outputs(torch, pytorch_fid, images):
  wrapper, net, _ = pytorch_fid
  with torch.no_grad():
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255   # pytorch-fid's input range
    pool = wrapper(x)[0][:, :, 0, 0]
    return {"pool": pool.numpy(), "logits": net.fc(pool).numpy(),
            "logits_unbiased": (pool @ net.fc.weight.T).numpy()}


@pytest.mark.parametrize("h,w", [(64, 80), (320, 300)])
def test_matches_pytorch_fid_float32(torch, pytorch_fid, converted, h, w):
  images = np.random.default_rng(h).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  ref = reference_outputs(torch, pytorch_fid, images)
  model = inc.build_inception("torch", "exact")
  out = jax.jit(model.apply)({"params": converted}, images)
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert rel_err(ref["pool"][0], ref["pool"][1]) > 3e-3   # features depend on the image
  for k in ("pool", "logits", "logits_unbiased"):
    assert rel_err(out[k], ref[k]) < 1e-5, (k, rel_err(out[k], ref[k]))
  # The image-dependent part too (what FID measures).
  diff = np.asarray(out["pool"][0] - out["pool"][1])
  assert rel_err(diff, ref["pool"][0] - ref["pool"][1]) < 1e-3


@pytest.mark.parametrize("mode,dtype,bound", [("fast", jnp.float16, 2e-3),
                                               ("bf16", jnp.bfloat16, 2e-2)])
def test_reduced_precision_modes_are_close(torch, pytorch_fid, converted, mode, dtype, bound):
  """float16 ("fast") keeps 10 mantissa bits: within 2e-3 of pytorch-fid's float32, a bound that
  bfloat16's 7 bits miss (so the mode really computes in float16)."""
  images = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  ref = reference_outputs(torch, pytorch_fid, images)
  model = inc.build_inception("torch", mode)
  assert model.dtype == dtype
  out = jax.jit(model.apply)({"params": converted}, images)
  assert out["pool"].dtype == jnp.float32 and np.isfinite(out["pool"]).all()
  err = rel_err(out["pool"], ref["pool"])
  assert err < bound, err
  if mode == "bf16":
    assert err > 2e-3, err   # the bound that the float16 mode meets is a real one


def test_zip_and_legacy_files_convert_alike(torch, pytorch_fid, converted, tmp_path):
  path = tmp_path / "zip.pth"
  torch.save({"state_dict": pytorch_fid[1].state_dict()}, path)
  again = inc.convert_inception(read_state_dict(path))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(converted)):
    np.testing.assert_array_equal(a, b)


def test_convert_names_what_does_not_fit(pytorch_fid):
  sd = read_state_dict(pytorch_fid[2])
  del sd["Mixed_6c.branch7x7_2.bn.running_var"]
  sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    inc.convert_inception(sd)
  msg = str(e.value)
  assert "missing (1): Mixed_6c.branch7x7_2.bn.running_var" in msg
  assert "unexpected (1): AuxLogits.fc.weight" in msg
  assert "Mixed_7c.branch_pool.conv.weight: (192, 2048, 3, 3) (expected (192, 2048, 1, 1))" in msg


def test_convert_file_end_to_end(torch, pytorch_fid, converted, tmp_path):
  for name in ("inception.npz", "inception.msgpack"):
    written = inc.convert_inception_file(pytorch_fid[2], tmp_path / name)
    loaded = inc.load_inception_params(written)
    assert jax.tree.structure(loaded) == jax.tree.structure(converted)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(converted)):
      np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ params files


def test_params_files_roundtrip_and_check(tmp_path):
  params = inc.random_inception_params(3)
  for name in ("p.npz", "p.msgpack"):
    path = inc.save_inception_params(params, tmp_path / name)
    loaded = inc.load_inception_params(path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)
  broken = dict(params)
  broken["fc_bias"] = np.zeros(1000, np.float32)
  del broken["Mixed_5b"]
  with pytest.raises(ValueError, match=r"Mixed_5b/branch1x1/conv/kernel.*fc_bias: \(1000,\)"):
    inc.save_inception_params(broken, tmp_path / "bad.npz")
  np.savez(tmp_path / "bad2.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="unexpected"):
    inc.load_inception_params(tmp_path / "bad2.npz")


# ------------------------------------------------------------------------------------- speed


def _count_convs(mode: str) -> int:
  model = inc.build_inception("torch", mode)
  params = jax.eval_shape(inc.random_inception_params)
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(
      params, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8))
  count = 0

  def walk(j):
    nonlocal count
    for e in j.eqns:
      count += e.primitive.name == "conv_general_dilated"
      for v in e.params.values():
        if hasattr(v, "eqns"):
          walk(v)
        elif hasattr(v, "jaxpr"):
          walk(v.jaxpr)
  walk(jaxpr.jaxpr)
  return count


def test_pointwise_convs_of_a_block_run_as_one():
  """What makes the network faster than pytorch-fid's layer list (H100, exact: 2,778 -> 2,936
  images/s): the 1x1 convolutions that read a block's input run as one convolution. pytorch-fid
  has 94 convolutions; Mixed_5b..d and 6b..e merge 4 into 1 each, 7a 2, 7b 4 and 7c 3 (its pool
  branch max-pools): 67 in the exact mode. The other modes keep all 94 (float16's FID drift grew
  when merged: inception.pointwise_group)."""
  assert _count_convs("exact") == 94 - 3 * 3 - 4 * 3 - 1 - 3 - 2
  assert _count_convs("fast") == _count_convs("bf16") == _count_convs("tf32") == 94
