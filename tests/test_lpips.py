"""LPIPS against the `lpips` package on the same random VGG16 weights and its released linear heads
(torch.save -> convert_lpips -> load_lpips -> distance), the converter's errors, `vqkd convert
lpips`, and the perceptual term of the GAN stages (train/perceptual.py): the in-the-box distance
against a NumPy recomputation from the network's stage maps."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.evaluation import lpips as lpips_lib
from vqkd_jax.train.perceptual import (in_the_box_perceptual, make_perceptual,
                                       perceptual_config)


def _images(n, size, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _tiny_state_dicts():
  """Zero tensors with torchvision's vgg16 / the package's vgg.pth names and shapes."""
  vgg_shapes, lin_shapes = lpips_lib.torch_shapes()
  vgg = {k: np.zeros(s, np.float32) for k, s in vgg_shapes.items()}
  vgg["classifier.6.bias"] = np.zeros((1000,), np.float32)   # ignored by the converter
  lin = {k: np.full(s, 0.01, np.float32) for k, s in lin_shapes.items()}
  return vgg, lin


def test_lpips_matches_the_lpips_package(tmp_path):
  torch = pytest.importorskip("torch")
  lpips_pkg = pytest.importorskip("lpips")
  torch.manual_seed(0)
  ref = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  # The package's random VGG16 under torchvision's `features.N.*` names (its slices keep them),
  # plus a classifier entry, as in torchvision's vgg16 state dict.
  vgg = {}
  for l in range(1, 6):
    for name, module in getattr(ref.net, f"slice{l}").named_children():
      if isinstance(module, torch.nn.Conv2d):
        vgg[f"features.{name}.weight"] = module.weight.detach().clone()
        vgg[f"features.{name}.bias"] = module.bias.detach().clone()
  assert len(vgg) == 26
  vgg["classifier.6.bias"] = torch.zeros(1000)
  torch.save(vgg, tmp_path / "vgg16.pth")
  lin_pth = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")
  out = lpips_lib.convert_lpips(tmp_path / "vgg16.pth", lin_pth, tmp_path / "lpips.msgpack")
  model, variables = lpips_lib.load_lpips(out, jnp.float32)

  x, y = _images(4, 64, 0), _images(4, 64, 1)
  y[0] = x[0]                                   # an identical pair: distance 0
  y[1] = np.clip(x[1] + 0.05 * _images(1, 64, 2)[0], -1, 1)   # a near pair
  got = np.asarray(jax.jit(model.apply)(variables, x, y))
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)),
               torch.from_numpy(y.transpose(0, 3, 1, 2))).numpy().reshape(-1)
  assert got.shape == (4,) and got.dtype == np.float32
  assert abs(want[0]) < 1e-7 and np.all(want[1:] > 0) and want[1] < want[2]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_converter_names_missing_unexpected_and_misshaped_keys():
  vgg, lin = _tiny_state_dicts()
  params = lpips_lib.convert_lpips_state_dicts(vgg, lin)
  lpips_lib.check_lpips_params(params)
  assert params["vgg"]["conv2"]["kernel"].shape == (3, 3, 64, 64) and params["lin4"].shape == (512,)
  del vgg["features.0.bias"]
  vgg["features.30.weight"] = np.zeros((1,), np.float32)
  lin["lin2.model.1.weight"] = np.zeros((1, 7, 1, 1), np.float32)
  lin["lin5.model.1.weight"] = np.zeros((1, 8, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    lpips_lib.convert_lpips_state_dicts(vgg, lin)
  msg = str(e.value)
  assert "vgg16 missing (1): features.0.bias" in msg
  assert "vgg16 unexpected (1): features.30.weight" in msg
  assert "lin unexpected (1): lin5.model.1.weight" in msg
  assert "lin wrong shape (1): lin2.model.1.weight: (1, 7, 1, 1) (expected (1, 256, 1, 1))" in msg
  assert "classifier" not in msg


def test_convert_command_end_to_end_and_file_errors(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from vqkd_jax import cli

  vgg, lin = _tiny_state_dicts()
  vgg["features.28.bias"] = np.arange(512, dtype=np.float32)
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, tmp_path / "vgg.pth")
  torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, tmp_path / "lin.pth")
  for name in ("lpips.msgpack", "lpips.npz"):
    out = tmp_path / name
    assert cli.main(["convert", "lpips", str(tmp_path / "vgg.pth"), str(out), "--lin",
                     str(tmp_path / "lin.pth")]) == 0
    _, variables = lpips_lib.load_lpips(out)
    np.testing.assert_array_equal(variables["params"]["vgg"]["conv28"]["bias"], np.arange(512))
    np.testing.assert_array_equal(variables["params"]["lin0"], np.full(64, 0.01, np.float32))
  capsys.readouterr()
  assert cli.main(["convert", "lpips", str(tmp_path / "vgg.pth"), str(out)]) == 2
  err = capsys.readouterr().err
  assert "--lin" in err and "weights/v0.1/vgg.pth" in err
  # The linear heads given where the VGG belongs: one line naming the keys.
  assert cli.main(["convert", "lpips", str(tmp_path / "lin.pth"), str(out), "--lin",
                   str(tmp_path / "lin.pth")]) == 2
  err = capsys.readouterr().err
  assert "vgg16 missing (26)" in err and "vgg16 unexpected (5)" in err

  with pytest.raises(FileNotFoundError, match="vqkd convert lpips"):
    lpips_lib.load_lpips(tmp_path / "absent.msgpack")
  (tmp_path / "bad.msgpack").write_bytes(b"\xc1garbage")
  with pytest.raises(ValueError, match="cannot read LPIPS weights|must be a dict"):
    lpips_lib.load_lpips(tmp_path / "bad.msgpack")
  params = lpips_lib.random_lpips_params()
  del params["lin3"]
  params["vgg"]["conv0"]["kernel"] = np.zeros((3, 3, 1, 64), np.float32)
  from flax import serialization
  (tmp_path / "short.msgpack").write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(ValueError, match=r"missing \(1\): lin3; wrong shape \(1\): vgg/conv0/kernel"):
    lpips_lib.load_lpips(tmp_path / "short.msgpack")


def test_lpips_perceptual_dropout_and_bfloat16(tmp_path):
  path = lpips_lib.save_lpips_params(lpips_lib.random_lpips_params(1), tmp_path / "w.msgpack")
  x, y = jnp.asarray(_images(2, 16, 3)), jnp.asarray(_images(2, 16, 4))
  p32 = make_perceptual(perceptual_config(kind="lpips", weights=path, dropout=0.5))
  distance = jax.jit(p32.distance, static_argnames="train")
  d = np.asarray(distance(p32.variables, x, y))
  assert d.shape == (2,) and np.all(d > 0)
  # Dropout only in training, with an rng; a different but same-scale distance.
  d_train = np.asarray(distance(p32.variables, x, y, rng=jax.random.PRNGKey(0), train=True))
  assert not np.allclose(d_train, d) and np.all(np.abs(d_train / d - 1) < 0.5)
  with pytest.raises(ValueError, match="needs an rng"):
    p32.distance(p32.variables, x, y, train=True)
  pbf = make_perceptual(perceptual_config(kind="lpips", weights=path), "bfloat16")
  dbf = np.asarray(jax.jit(pbf.distance)(pbf.variables, x, y))
  assert dbf.dtype == np.float32
  np.testing.assert_allclose(dbf, d, rtol=0.05)


def _random_variables(model, x, seed=0):
  """Random NumPy variables in the model's layout (jitting Flax's init costs ~6 s on 2 CPU cores):
  kernels N(0, 1 / fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if "kernel" in name:
      return z / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1 + 0.1 * z if "scale" in name else 0.1 * z

  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_in_the_box_distance_matches_numpy_on_stage_maps():
  from vqkd_jax.evaluation.evaluator_net import EvaluatorNet

  model = EvaluatorNet(num_classes=4, width=8, stage_mults=(1, 2), blocks_per_stage=1)
  x, y = _images(3, 16, 5), _images(3, 16, 6)
  v = _random_variables(model, x)
  out = model.apply(v, x)
  assert [s.shape for s in out["stages"]] == [(3, 16, 16, 8), (3, 8, 8, 16)]
  assert set(out) == {"features", "logits", "stages"}
  perceptual = in_the_box_perceptual(model, v)
  distance = jax.jit(perceptual.distance)
  got = np.asarray(distance(perceptual.variables, x, y))

  want = np.zeros(3)      # second path: each image set through the network alone, NumPy float64
  for a, b in zip(out["stages"], model.apply(v, y)["stages"]):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
    b = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
    want += ((a - b) ** 2).mean(axis=(1, 2, 3))
  assert got.shape == (3,) and np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Zero up to rounding (XLA may contract n(a) - n(b) into an FMA: residues ~1e-17).
  assert np.all(np.abs(np.asarray(distance(v, x, x))) < 1e-12)
  np.testing.assert_array_equal(np.asarray(perceptual.distance(v, x, x)), 0.0)   # op by op
  np.testing.assert_allclose(np.asarray(distance(v, y, x)), got, rtol=1e-6)


def test_perceptual_config_errors(tmp_path):
  with pytest.raises(ValueError, match="needs perceptual.weights"):
    make_perceptual(perceptual_config(kind="lpips"))
  with pytest.raises(FileNotFoundError, match="vqkd convert lpips"):
    make_perceptual(perceptual_config(kind="lpips", weights=str(tmp_path / "absent.msgpack")))
  (tmp_path / "corrupt.msgpack").write_bytes(b"\xc1")
  with pytest.raises(ValueError, match="cannot read LPIPS weights"):
    make_perceptual(perceptual_config(kind="lpips", weights=str(tmp_path / "corrupt.msgpack")))
  with pytest.raises(ValueError, match="needs perceptual.workdir"):
    make_perceptual(perceptual_config(kind="in_the_box"))
  with pytest.raises(FileNotFoundError, match="configs/demo/perceptual.py"):
    make_perceptual(perceptual_config(kind="in_the_box", workdir=str(tmp_path / "nothing")))
  assert not (tmp_path / "nothing").exists()
  with pytest.raises(ValueError, match="unknown perceptual.kind 'vgg'"):
    make_perceptual(perceptual_config(kind="vgg"))
  with pytest.raises(KeyError, match="unknown perceptual fields"):
    perceptual_config(wieght=1.0)
  none = make_perceptual(perceptual_config(kind="none"))
  assert none.variables == {}
  d = none.distance({}, jnp.zeros((2, 8, 8, 3)), jnp.ones((2, 8, 8, 3)))
  assert d.dtype == jnp.float32 and np.asarray(d).tolist() == [0, 0]
