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


def test_dead_code_restart_matches_numpy_reference():
  # Every row lies near one of the first 4 codes: the other 12 never win an assignment. Their
  # usage EMA (decay 0.5, starting at N / K) falls 25 -> 12.5 -> 6.25 -> 3.125 (< 4 = restart_below)
  # at the third call, when they become rows of that batch and their EMA restarts at N / K.
  rng = np.random.default_rng(40)
  codes = np_normalize(data(41, n=K))
  n = 400
  x = [(codes[rng.integers(0, 4, n)] * 5.0 + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
       for _ in range(3)]
  cb = CosineCodebook(K, D, decay=DECAY, restart_below=4.0, restart_decay=0.5)
  state = {"codebook": {**state_with(codes, True)["codebook"],
                        "usage_ema": jnp.full((K,), -1.0, jnp.float32)}}
  want, usage = codes.astype(np.float64), np.full(K, n / K)
  for i, xi in enumerate(x):
    _, state = apply_train(cb, state, xi, jax.random.PRNGKey(i))
    want, q, counts = np_ema_step(want, xi.astype(np.float64))
    usage = 0.5 * usage + 0.5 * counts
    got = np.asarray(state["codebook"]["embedding"])
    dead = usage < 4.0
    assert dead.sum() == (12 if i == 2 else 0), (i, usage)
    np.testing.assert_allclose(got[~dead], want[~dead], atol=2e-6)
    if dead.any():
      x_n = np_normalize(xi.astype(np.float64))
      # Each restarted code is one of the batch's unit rows.
      np.testing.assert_allclose(np.max(got[dead] @ x_n.T, axis=1), 1.0, atol=1e-5)
      usage = np.where(dead, n / K, usage)
      want = np.where(dead[:, None], got, want)
    np.testing.assert_allclose(np.asarray(state["codebook"]["usage_ema"]), usage, rtol=1e-6)
  # Off (the default, upstream): no usage_ema state at all.
  assert "usage_ema" not in nn.unbox(CosineCodebook(K, D).init(
      {"params": jax.random.PRNGKey(0)}, jnp.asarray(x[0][:4])))["codebook"]


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


# ------------------------------------------------------------------------------ FSQ (upstream §3.3)


def np_fsq(x, levels, eps=1e-3):
  """Upstream's formula as written there: m = (L-1)(1-eps), o = (L-1) mod 2,
  z = (tanh(x + atanh(o/m)) m - o) / 2, round, / (L // 2); index = sum digit_i prod_{j<i} L_j."""
  L = np.asarray(levels, np.float64)
  m = (L - 1) * (1 - eps)
  o = np.mod(L - 1, 2)
  z = (np.tanh(x + np.arctanh(o / m)) * m - o) / 2
  r = np.round(z)
  half = np.floor(L / 2)
  digits = (r + half).astype(np.int64)
  basis = np.concatenate([[1], np.cumprod(L[:-1])]).astype(np.int64)
  return r / half, (digits * basis).sum(-1)


@pytest.mark.parametrize("levels", [(8, 8, 5, 5, 5), (8, 8, 8, 5, 5, 5)])
def test_fsq_matches_upstream_formula_and_round_trips(levels):
  x = np.random.RandomState(0).normal(0, 2.0, (64, 9, len(levels))).astype(np.float32)
  out = quantizers.FSQ(levels).apply({}, jnp.asarray(x))
  codes, idx = np_fsq(x.astype(np.float64), levels)
  np.testing.assert_allclose(np.asarray(out["quantized"]), codes, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["indices"]), idx)
  # Every one of the prod(levels) indices maps to a code and back exactly, and codes are distinct.
  k = int(np.prod(levels))
  all_codes = quantizers.fsq_indices_to_codes(jnp.arange(k), levels)
  np.testing.assert_array_equal(np.asarray(quantizers.fsq_codes_to_indices(all_codes, levels)),
                                np.arange(k))
  assert len(np.unique(np.asarray(all_codes), axis=0)) == k
  assert float(jnp.min(all_codes)) == -1.0 and float(jnp.max(all_codes)) <= 1.0
  assert float(out["usage_counts"].sum()) == 64 * 9


def test_fsq_straight_through_gradient_is_the_bounding_derivative():
  levels = (8, 5)
  x = jnp.asarray([[0.3, -0.7], [1.2, 0.1]])
  g = jax.grad(lambda x: jnp.sum(quantizers.FSQ(levels).apply({}, x)["quantized"]))(x)
  half = jnp.asarray([4.0, 2.0])
  g_ref = jax.grad(lambda x: jnp.sum(quantizers.fsq_bound(x, levels) / half))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)


# ------------------------------------------------------------------------------ Gradient-trained VQ


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_vector_quantizer_assignment_losses_and_ste(distance):
  rs = np.random.RandomState(1)
  x = rs.normal(size=(6, 5, D)).astype(np.float32)
  vq = quantizers.VectorQuantizer(K, D, distance=distance, beta=0.25)
  params = nn.unbox(vq.init(jax.random.PRNGKey(0), jnp.asarray(x)))
  e = np.asarray(params["params"]["embedding"]).astype(np.float64)
  assert np.all(np.abs(e) <= 1.0 / K)                      # U(-1/K, 1/K) init
  e = rs.normal(size=(K, D))                                 # a codebook with clear assignments
  params = {"params": {"embedding": jnp.asarray(e, jnp.float32)}}
  out = vq.apply(params, jnp.asarray(x))
  flat = x.reshape(-1, D).astype(np.float64)
  if distance == "l2":
    d = ((flat[:, None] - e[None]) ** 2).sum(-1)
  else:
    d = 1 - np_normalize(flat) @ np_normalize(e).T
  idx = d.argmin(1)
  np.testing.assert_array_equal(np.asarray(out["indices"]).ravel(), idx)
  z = e[idx]
  mse = ((z - flat) ** 2).mean()
  np.testing.assert_allclose(float(out["codebook_loss"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), 1.25 * mse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, D), z, rtol=1e-5, atol=1e-6)
  # Gradients: identity to x through the STE plus beta * 2 (x - z) / (N D) from the commitment;
  # the codebook gets 2 (z - x) / (N D) from the codebook loss only.
  def f(p, x):
    o = vq.apply(p, x)
    return jnp.sum(o["quantized"]) + o["loss"]
  gp, gx = jax.grad(f, argnums=(0, 1))(params, jnp.asarray(x))
  n = flat.size
  np.testing.assert_allclose(np.asarray(gx).reshape(-1, D), 1 + 0.25 * 2 * (flat - z) / n,
                             rtol=1e-4, atol=1e-6)
  ge = np.zeros_like(e)
  np.add.at(ge, idx, 2 * (z - flat) / n)
  np.testing.assert_allclose(np.asarray(gp["params"]["embedding"]), ge, rtol=1e-4, atol=1e-7)


def test_cvq_anchors_against_numpy_reference():
  """CVQ-VAE (upstream §3.4): p <- EMA(p, frequency); anchor_k = the batch feature nearest to code
  k; the step's codes are decay_k E_k + (1 - decay_k) anchor_k with
  decay_k = 1 - exp(-p_k K 10 / (1 - 0.99) - 1e-3); apply_anchors writes that into the parameter."""
  rs = np.random.RandomState(2)
  x = rs.normal(size=(40, D)).astype(np.float32)
  e = rs.normal(size=(K, D)).astype(np.float32)
  e[5:] += 20.0                                    # codes 5.. are far away: dead
  vq = quantizers.VectorQuantizer(K, D, distance="cosine", beta=0.0, anchors=True)
  v = nn.unbox(vq.init(jax.random.PRNGKey(0), jnp.asarray(x)))
  v = {"params": {"embedding": jnp.asarray(e)}, "codebook": v["codebook"]}
  out, state = vq.apply(v, jnp.asarray(x), train=True, mutable=["codebook"])
  d = 1 - np_normalize(x.astype(np.float64)) @ np_normalize(e.astype(np.float64)).T
  idx = d.argmin(1)
  p = 0.01 * np.bincount(idx, minlength=K) / len(x)
  decay = 1 - np.exp(-p * K * 10 / 0.01 - 1e-3)
  anchor = x[d.argmin(0)]
  mixed = decay[:, None] * e + (1 - decay[:, None]) * anchor
  np.testing.assert_allclose(np.asarray(state["codebook"]["usage_ema"]), p, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state["codebook"]["anchor"]), anchor, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["indices"]), idx)   # assignment before the update
  params, _ = quantizers.apply_anchors(v["params"], state)
  np.testing.assert_allclose(np.asarray(params["embedding"]), mixed, rtol=1e-4, atol=1e-5)
  dead = np.bincount(idx, minlength=K) == 0
  assert dead.any()
  np.testing.assert_allclose(np.asarray(params["embedding"])[dead], anchor[dead], atol=5e-2)  # E ~ 20 away
  # Before any training call the anchor weight is 0: apply_anchors changes nothing.
  unchanged, _ = quantizers.apply_anchors(v["params"], v)
  np.testing.assert_array_equal(np.asarray(unchanged["embedding"]), e)
