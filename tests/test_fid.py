"""FID/IS machinery: the Fréchet distance against pytorch-fid's calculate_frechet_distance, the
Inception Score against a direct NumPy/SciPy computation, the sharded extractor's padding and
masking against an unpadded run, and the reference-statistics writer against PIL done by hand."""

import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from PIL import Image

from vqkd_jax.evaluation import fid as fid_lib
from vqkd_jax.evaluation import inception as inc
from vqkd_jax.evaluation.frechet import FeatureStatistics, frechet_distance
from vqkd_jax.evaluation.metrics import inception_score

from torch_reference import pytorch_fid_module


# ----------------------------------------------------------------------------------- Fréchet


@pytest.fixture(scope="module")
def calculate_frechet_distance():
  torch = pytest.importorskip("torch")
  return pytorch_fid_module(torch, "fid_score").calculate_frechet_distance


def _features(rng, n, d, scale=1.0, shift=0.0):
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return (rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, d)) @ mix * scale + shift


@pytest.mark.parametrize("d", [64, 384])
def test_frechet_matches_pytorch_fid(calculate_frechet_distance, d):
  rng = np.random.default_rng(d)
  x, y = _features(rng, 3 * d, d), _features(rng, 4 * d, d, scale=1.2, shift=0.3)
  stats_x, stats_y = FeatureStatistics.from_features(x), FeatureStatistics.from_features(y)
  mu1, s1 = x.mean(0), np.cov(x, rowvar=False)   # pytorch-fid's own statistics
  mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
  ref = calculate_frechet_distance(mu1, s1, mu2, s2)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
  ours = frechet_distance(stats_x.mean(), stats_x.covariance(), stats_y.mean(),
                          stats_y.covariance())
  assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_frechet_2048_matches_pytorch_fid_and_is_fast(calculate_frechet_distance):
  rng = np.random.default_rng(7)
  d = 2048
  w1 = rng.standard_normal((d, 3000)) * rng.uniform(0.2, 1.5, (d, 1))
  w2 = rng.standard_normal((d, 3000)) * rng.uniform(0.2, 1.5, (d, 1))
  args = (rng.standard_normal(d) * 0.1, w1 @ w1.T / 3000, rng.standard_normal(d) * 0.1,
          w2 @ w2.T / 3000)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    ours = frechet_distance(*args)
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  ref = calculate_frechet_distance(*args)
  t_ref = time.perf_counter() - t
  print(f"\nFréchet d=2048: ours {min(times):.3f} s (best of 3), pytorch-fid {t_ref:.3f} s; "
        f"{ours:.9f} vs {ref:.9f}, rel {abs(ours - ref) / abs(ref):.1e}")
  assert ours == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- Inception Score


def reference_inception_score(logits, splits, shuffle_seed=None):
  """Direct: softmax with scipy, KL per row with scipy.stats.entropy(p(y|x), p(y)), exp of the mean
  per split (Salimans et al.), rows permuted with RandomState(seed).permutation first if asked."""
  from scipy.special import softmax
  from scipy.stats import entropy
  p = softmax(np.asarray(logits, np.float64), axis=1)
  if shuffle_seed is not None:
    p = p[np.random.RandomState(shuffle_seed).permutation(len(p))]
  n = len(p)
  scores = []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits]
    py = part.mean(0)
    scores.append(np.exp(np.mean([entropy(row, py) for row in part])))
  return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("shuffle", [False, True])
def test_inception_score_matches_reference(shuffle):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((1003, 1008)) * 3 + rng.standard_normal(1008)
  mean, std = inception_score(logits, splits=10, shuffle=shuffle)
  ref_mean, ref_std = reference_inception_score(logits, 10, 2020 if shuffle else None)
  assert mean == pytest.approx(ref_mean, rel=1e-10)
  assert std == pytest.approx(ref_std, rel=1e-8)


def test_inception_score_closed_forms():
  same = np.tile(np.random.default_rng(1).standard_normal(1008), (100, 1))
  assert inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-12)
  # k confident classes used equally often in each split: IS -> k.
  k = 8
  onehot = np.full((800, 1008), -1e4)
  onehot[np.arange(800), np.arange(800) % k] = 0.0
  mean, std = inception_score(onehot, splits=10, shuffle=False)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError):
    inception_score(np.zeros((5, 10)), splits=10)


# ------------------------------------------------------------------------ sharded extractor


@pytest.fixture(scope="module")
def params():
  return inc.random_inception_params(0)


def _images(seed, n, h=40, w=48):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def direct(params):
  """Unpadded reference: the network applied once to all 7 images."""
  images = _images(0, 7)
  out = jax.jit(inc.build_inception().apply)({"params": params}, images)
  return images, {k: np.asarray(v) for k, v in out.items()}


def test_extractor_pads_and_masks(params, direct):
  images, ref = direct
  extractor = fid_lib.InceptionExtractor(params, batch_size=4)   # 7 = 4 + 3 (+ 1 padding)
  out = extractor(images)
  assert out["pool"].shape == (7, 2048) and out["logits_unbiased"].shape == (7, 1008)
  np.testing.assert_allclose(out["pool"], ref["pool"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["logits_unbiased"], ref["logits_unbiased"], rtol=1e-5, atol=1e-5)

  # Batches of another size, a mask on the padded rows of a pipeline batch, and a masked real row.
  mask = np.array([True, True, False, True, True, True, True])
  batches = [{"image": images[:3], "mask": mask[:3]},
             {"image": np.concatenate([images[3:], np.zeros_like(images[:2])]),
              "mask": np.concatenate([mask[3:], [False, False]])}]
  stats, logits = fid_lib.inception_outputs(extractor, batches)
  expected = FeatureStatistics.from_features(ref["pool"][mask])
  assert stats.count == 6
  np.testing.assert_allclose(stats.mean(), expected.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.covariance(), expected.covariance(), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(logits, ref["logits_unbiased"][mask], rtol=1e-5, atol=1e-5)


def test_extractor_shards_over_devices(tmp_path, params):
  """4 simulated CPU devices, batch 6 -> 8 (a multiple of 4): the same outputs as one device."""
  np.savez(tmp_path / "images.npz", images=_images(0, 7))
  inc.save_inception_params(params, tmp_path / "params.npz")
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from vqkd_jax.evaluation import fid, inception
      assert jax.device_count() == 4
      params = inception.load_inception_params({str(tmp_path / "params.npz")!r})
      ex = fid.InceptionExtractor(params, batch_size=6)
      assert ex.batch_size == 8
      out = ex(np.load({str(tmp_path / "images.npz")!r})["images"])
      np.save({str(tmp_path / "pool.npy")!r}, out["pool"])
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  one_device = fid_lib.InceptionExtractor(params, batch_size=8)(_images(0, 7))["pool"]
  np.testing.assert_allclose(np.load(tmp_path / "pool.npy"), one_device, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ reference statistics


def _torchvision_resize_center_crop(image, size):
  """Resize(size, bicubic) + CenterCrop(size) with PIL, written out here."""
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return resized[top:top + size, left:left + size]


def test_reference_stats_writer(tmp_path, params):
  rng = np.random.default_rng(3)
  shapes = [(50, 70), (64, 40), (33, 33), (90, 45), (41, 80)]
  raw = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
  raw[2] = raw[2][..., 0]   # a greyscale image
  size = 32
  prepared = np.stack([_torchvision_resize_center_crop(
      np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im, size) for im in raw])
  extractor = fid_lib.InceptionExtractor(params, batch_size=2)
  out_path = str(tmp_path / "ref_stats.npz")
  stats = fid_lib.write_reference_stats(iter(raw), out_path, extractor, size=size)
  pool = extractor(prepared)["pool"]
  np.testing.assert_allclose(stats.mean(), pool.mean(0), rtol=1e-6, atol=1e-7)
  mu, sigma = fid_lib.load_reference_stats(out_path)
  np.testing.assert_allclose(sigma, np.cov(pool.astype(np.float64), rowvar=False), atol=1e-8)

  # Ready batches (as the data pipeline's eval iterator yields them) give the same statistics;
  # an .npz with mu/sigma (pytorch-fid --save-stats, OpenAI) loads too.
  again = fid_lib.write_reference_stats([{"image": prepared[:3], "mask": np.ones(3, bool)},
                                         prepared[3:]], str(tmp_path / "again.npz"), extractor,
                                        size=size)
  np.testing.assert_allclose(again.mean(), mu, rtol=1e-6, atol=1e-7)
  np.savez(tmp_path / "mu_sigma.npz", mu=mu, sigma=sigma)
  mu2, sigma2 = fid_lib.load_reference_stats(str(tmp_path / "mu_sigma.npz"))
  np.testing.assert_array_equal(mu2, mu)

  # FID against the reference (0, I): |mu|^2 + tr S + d - 2 tr sqrtm(S), where the non-zero
  # eigenvalues of S = Xc^T Xc / (n - 1) are the squared singular values of Xc / sqrt(n - 1).
  result = fid_lib.evaluate_fid_is(extractor, [prepared], (np.zeros(2048), np.eye(2048)),
                                   splits=5)
  centred = (pool - pool.mean(0)).astype(np.float64) / 2.0   # sqrt(n - 1) = 2
  singular = np.linalg.svd(centred, compute_uv=False)
  expected = (np.sum(pool.mean(0).astype(np.float64) ** 2) + np.sum(singular ** 2) + 2048
              - 2 * np.sum(singular))
  assert result["count"] == 5
  assert result["fid"] == pytest.approx(expected, rel=1e-6)
  logits = extractor(prepared)["logits_unbiased"]
  assert result["inception_score"] == pytest.approx(inception_score(logits, 5)[0], rel=1e-9)
