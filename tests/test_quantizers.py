"""The cosine codebook against NumPy references written here (upstream §3.5 semantics), the
straight-through estimator against its closed form, and cross-device statistics on 8 simulated
devices (pmap with axis_name, and jit over a sharded batch) against one device on the full batch."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax import quantizers
from vqkd_jax.quantizers import CosineCodebook

K, D, N = 16, 8, 400
DECAY = 0.99


# ------------------------------------------------------------------------------ NumPy references


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_assign(x_n, codes):
  return np.argmax(x_n @ codes.T, axis=1)


def np_centroids(x_n, q, codes):
  counts = np.bincount(q, minlength=len(codes))
  sums = np.zeros_like(codes)
  np.add.at(sums, q, x_n)
  return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], codes), counts


def np_ema_step(codes, x, decay=DECAY):
  """Upstream VQKDCallback.after_encode: assign with the current codes, per-code mean of the assigned
  unit vectors (unassigned codes keep theirs), normalise, EMA, normalise."""
  codes = np_normalize(codes)
  x_n = np_normalize(x)
  q = np_assign(x_n, codes)
  centroid, counts = np_centroids(x_n, q, codes)
  new = np_normalize(decay * codes + (1 - decay) * np_normalize(centroid))
  return new, q, counts


def np_kmeans(x, init_rows, iters):
  """Upstream lazy_init_weights for N >= K: start at the chosen rows, `iters` x (normalise, assign,
  mean of assigned or keep), final normalise."""
  x_n = np_normalize(x)
  codes = x_n[init_rows]
  for _ in range(iters):
    codes = np_normalize(codes)
    codes, _ = np_centroids(x_n, np_assign(x_n, codes), codes)
  return np_normalize(codes)


def data(seed, n=N, d=D):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def state_with(codes, initialized):
  return {"codebook": {"embedding": jnp.asarray(codes, jnp.float32),
                       "initialized": jnp.array(initialized)}}


def apply_train(cb, state, x, key=jax.random.PRNGKey(7)):
  return cb.apply(state, jnp.asarray(x), train=True, mutable=["codebook"], rngs={"codebook": key})


# ------------------------------------------------------------------------------ Tests


def test_l2_normalize_and_statistics_closed_forms():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(quantizers.l2_normalize(jnp.asarray(x)), [[0.6, 0.8], [0.0, 0.0]])
  counts = jnp.array([3.0, 1.0, 0.0, 0.0])
  assert float(quantizers.codebook_usage(counts)) == 0.5
  h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose(quantizers.code_entropy(counts), h, rtol=1e-6)
  np.testing.assert_allclose(quantizers.code_perplexity(counts), np.exp(h), rtol=1e-6)
  np.testing.assert_allclose(quantizers.code_perplexity(jnp.ones(64)), 64.0, rtol=1e-5)


def test_spherical_kmeans_matches_numpy_reference():
  x = data(0)
  key = jax.random.PRNGKey(3)
  # The documented choice: rows permutation(key, N)[:K] (distinct rows).
  rows = np.asarray(jax.random.permutation(key, N))[:K]
  assert len(set(rows.tolist())) == K
  got = np.asarray(quantizers.spherical_kmeans(jnp.asarray(x), K, 10, key))
  want = np_kmeans(x.astype(np.float64), rows, 10)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  # Zero iterations: exactly the normalised chosen rows.
  got0 = np.asarray(quantizers.spherical_kmeans(jnp.asarray(x), K, 0, key))
  np.testing.assert_allclose(got0, np_normalize(x[rows]), atol=1e-6)


def test_spherical_kmeans_fewer_vectors_than_codes_keeps_init():
  x = data(1, n=5)
  init = data(2, n=K)
  got = np.asarray(quantizers.spherical_kmeans(jnp.asarray(x), K, 10, jax.random.PRNGKey(0),
                                               init=jnp.asarray(init)))
  np.testing.assert_allclose(got[:5], np_normalize(x), atol=1e-6)
  np.testing.assert_allclose(got[5:], np_normalize(init[5:]), atol=1e-6)


def test_chunked_assignment_equals_one_go():
  x = jnp.asarray(np_normalize(data(4, n=1003)))
  codes = jnp.asarray(np_normalize(data(5, n=K)))
  np.testing.assert_array_equal(quantizers.cosine_assign(x, codes, chunk_size=128),
                                quantizers.cosine_assign(x, codes))
  np.testing.assert_array_equal(quantizers.cosine_assign(x, codes),
                                np_assign(np.asarray(x), np.asarray(codes)))


def test_ema_update_matches_numpy_reference():
  codes = np_normalize(data(10, n=K))
  x = data(11).reshape(4, 10, 10, D)  # Any leading shape.
  cb = CosineCodebook(K, D, decay=DECAY)
  out, new = apply_train(cb, state_with(codes, True), x)
  want, q, counts = np_ema_step(codes.astype(np.float64), x.reshape(-1, D).astype(np.float64))
  got = np.asarray(new["codebook"]["embedding"])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(got, codes, atol=1e-4)  # It did move.
  # Indices come from the codebook before the update; the lookup uses the updated one.
  np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), q)
  assert out["indices"].shape == (4, 10, 10) and out["indices"].dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, D), want[q], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["usage_counts"]), counts)
  x_n = np_normalize(x.reshape(-1, D).astype(np.float64))
  np.testing.assert_allclose(out["commitment_loss"], np.mean((want[q] - x_n) ** 2), rtol=1e-5)
  assert bool(new["codebook"]["initialized"])


def test_unassigned_codes_keep_their_vector():
  codes = np_normalize(data(12, n=K))
  x = np.repeat(codes[:1] * 3.0, 20, axis=0)  # Every row is (a multiple of) code 0.
  cb = CosineCodebook(K, D)
  _, new = apply_train(cb, state_with(codes, True), x)
  np.testing.assert_allclose(np.asarray(new["codebook"]["embedding"]), codes, atol=1e-6)


def test_first_training_call_runs_kmeans_then_ema_and_flips_initialized():
  # N == K distinct random directions: whatever K rows the "codebook" RNG picks (all of them, in
  # some order), k-means keeps every vector as its own centroid and the EMA step leaves them there.
  x = data(20, n=K)
  cb = CosineCodebook(K, D, decay=DECAY, kmeans_iters=10)
  variables = nn.unbox(cb.init({"params": jax.random.PRNGKey(0)}, jnp.asarray(x[:4])))
  assert not bool(variables["codebook"]["initialized"])
  np.testing.assert_allclose(np.linalg.norm(variables["codebook"]["embedding"], axis=1), 1.0,
                             atol=1e-6)
  out, new = apply_train(cb, variables, x)
  got = np.asarray(new["codebook"]["embedding"])
  x_n = np_normalize(x)
  order = np.argmax(got @ x_n.T, axis=1)
  assert sorted(order.tolist()) == list(range(K))  # A permutation of the batch's directions.
  np.testing.assert_allclose(got, x_n[order], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["quantized"]), x_n, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["usage_counts"]), np.ones(K))
  assert bool(new["codebook"]["initialized"])
  # The second call: EMA only (no k-means), against the NumPy reference.
  x2 = data(21)
  _, new2 = apply_train(cb, new, x2, jax.random.PRNGKey(43))
  want2, _, _ = np_ema_step(got.astype(np.float64), x2.astype(np.float64))
  np.testing.assert_allclose(np.asarray(new2["codebook"]["embedding"]), want2, atol=2e-6)


def test_first_training_call_with_fewer_vectors_than_codes():
  init = np_normalize(data(22, n=K))
  x = data(23, n=5)
  cb = CosineCodebook(K, D)
  _, new = apply_train(cb, state_with(init, False), x)
  # k-means init: the 5 vectors then the old codes; then one EMA step of that codebook.
  start = np.concatenate([np_normalize(x), init[5:]]).astype(np.float64)
  want, _, _ = np_ema_step(start, x.astype(np.float64))
  np.testing.assert_allclose(np.asarray(new["codebook"]["embedding"]), want, atol=2e-6)


def test_eval_call_leaves_codebook_untouched():
  codes = np_normalize(data(30, n=K))
  x = data(31)
  cb = CosineCodebook(K, D)
  for initialized in (False, True):
    state = state_with(codes, initialized)
    out, new = cb.apply(state, jnp.asarray(x), train=False, mutable=["codebook"])
    np.testing.assert_array_equal(np.asarray(new["codebook"]["embedding"]), codes)
    assert bool(new["codebook"]["initialized"]) == initialized
    q = np_assign(np_normalize(x), codes)
    np.testing.assert_array_equal(np.asarray(out["indices"]), q)
    np.testing.assert_array_equal(np.asarray(out["usage_counts"]), np.bincount(q, minlength=K))
    np.testing.assert_allclose(cb.apply(state, jnp.asarray(q), method="lookup"), codes[q],
                               atol=1e-6)


def test_straight_through_value_and_gradient():
  codes = np_normalize(data(40, n=K))
  x = data(41, n=32) * 2.5
  w = data(42, n=32)
  cb = CosineCodebook(K, D)
  state = state_with(codes, True)

  def quantized(x):
    return cb.apply(state, x, train=False)["quantized"]

  q = np_assign(np_normalize(x), codes)
  np.testing.assert_allclose(quantized(jnp.asarray(x)), codes[q], atol=1e-6)  # Value: the code.
  grad = np.asarray(jax.grad(lambda x: jnp.sum(jnp.asarray(w) * quantized(x)))(jnp.asarray(x)))
  # Identity through x_n = x / |x|: d(w . x_n)/dx = (w - x_n (x_n . w)) / |x|.
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  norm = np.linalg.norm(x64, axis=1, keepdims=True)
  x_n = x64 / norm
  want = (w64 - x_n * np.sum(x_n * w64, axis=1, keepdims=True)) / norm
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_commitment_loss_closed_form_and_gradient():
  codes = np_normalize(data(50, n=K))
  x = data(51, n=64) * 0.3
  cb = CosineCodebook(K, D)
  state = state_with(codes, True)
  loss_fn = lambda x: cb.apply(state, x, train=False)["commitment_loss"]
  x64 = x.astype(np.float64)
  norm = np.linalg.norm(x64, axis=1, keepdims=True)
  x_n = x64 / norm
  e = codes[np_assign(x_n, codes)]
  np.testing.assert_allclose(loss_fn(jnp.asarray(x)), np.mean((e - x_n) ** 2), rtol=1e-6)
  # Gradient reaches x through x_n only (the code is stop-gradient'ed).
  r = -2.0 * (e - x_n) / x.size
  want = (r - x_n * np.sum(x_n * r, axis=1, keepdims=True)) / norm
  np.testing.assert_allclose(jax.grad(loss_fn)(jnp.asarray(x)), want, atol=1e-7)


def test_codebook_variables_are_named_and_not_params():
  cb = CosineCodebook(K, D)
  variables = cb.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((3, D)))
  assert "params" not in variables
  spec = nn.get_partition_spec(variables)
  assert tuple(spec["codebook"]["embedding"]) == ("codebook", "code")


_PMAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from vqkd_jax.quantizers import CosineCodebook
    assert jax.device_count() == 8, jax.devices()
    K, D, B = 32, 8, 48                      # 8 x 48 = 384 vectors >= K: a real k-means init
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8 * B, D)).astype(np.float32) for _ in range(2)]
    keys = [jax.random.PRNGKey(5), jax.random.PRNGKey(6)]
    single = CosineCodebook(K, D)
    sharded = CosineCodebook(K, D, axis_name="batch")
    state0 = nn.unbox(single.init({"params": jax.random.PRNGKey(1)}, jnp.asarray(xs[0][:2])))

    def step(module, state, x, key):
      return module.apply(state, x, train=True, mutable=["codebook"], rngs={"codebook": key})

    # One device, the full batch.
    ref, state = [], state0
    for x, key in zip(xs, keys):
      out, state = jax.jit(lambda s, x, k: step(single, s, x, k))(state, x, key)
      ref.append((out, state))

    # pmap over 8 devices, axis_name set: statistics psum'd, k-means on the all_gather'ed batch.
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 8), t)
    pstep = jax.pmap(lambda s, x, k: step(sharded, s, x, k), axis_name="batch")
    state = rep(state0)
    for (out_ref, state_ref), x, key in zip(ref, xs, keys):
      out, state = pstep(state, x.reshape(8, B, D), rep(key))
      for dev in range(8):
        np.testing.assert_allclose(state["codebook"]["embedding"][dev],
                                   state_ref["codebook"]["embedding"], atol=2e-6)
        np.testing.assert_array_equal(out["usage_counts"][dev], out_ref["usage_counts"])
        assert bool(state["codebook"]["initialized"][dev])
      np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), out_ref["indices"])
      np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, D), out_ref["quantized"],
                                 atol=2e-6)
      np.testing.assert_allclose(np.mean(out["commitment_loss"]), out_ref["commitment_loss"],
                                 rtol=1e-5)

    # jit over a batch sharded on 8 devices, axis_name=None: the arrays are global already.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    state = state0
    for (out_ref, state_ref), x, key in zip(ref, xs, keys):
      out, state = jax.jit(lambda s, x, k: step(single, s, x, k))(
          state, jax.device_put(x, shard), key)
      np.testing.assert_allclose(state["codebook"]["embedding"], state_ref["codebook"]["embedding"],
                                 atol=2e-6)
      np.testing.assert_array_equal(out["usage_counts"], out_ref["usage_counts"])
      np.testing.assert_array_equal(out["indices"], out_ref["indices"])
    print("OK")
""")


def test_statistics_on_8_devices_equal_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _PMAP_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]
