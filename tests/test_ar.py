"""AR proposal network and its sampling loop: KV-cache decoding against full recomputation, causality,
top-k/top-p filtering against a NumPy port of transformers' warpers, classifier-free guidance in closed
form, the loss against NumPy cross-entropy, class dropout, batch-split invariance of samples, and
(with torch) both flavours against transformers' GPT2LMHeadModel / LlamaForCausalLM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_workdir import random_like  # tests/ is on sys.path (conftest)

from vqkd_jax.proposal import ar as ar_lib
from vqkd_jax.proposal import sampling

NUM_CLASSES, CODEBOOK, NUM_TOKENS = 5, 24, 9
GRID = (3, 3)
VOCAB = NUM_CLASSES + 1 + CODEBOOK
FLAVOURS = ("gpt2", "llama")
VARIANTS = FLAVOURS + ("llama_rope2d",)   # model variants of the shared fixture


def _model(flavour, **kw):
  if flavour == "llama_rope2d":
    flavour, kw = "llama", dict(kw, rope="2d", grid=GRID)
  return ar_lib.ARTransformer(vocab_size=VOCAB, seq_len=1 + NUM_TOKENS, width=32, depth=2,
                              num_heads=2, flavour=flavour, **kw)


def _random_params(model, seed=0, scale=0.3):
  """Random weights of the model's parameter shapes (norm scales around 1), so that every weight
  (Llama's zero-initialised head included) matters and the logits are far from uniform."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  return random_like(shapes["params"], seed, scale)


@pytest.fixture(scope="module", params=VARIANTS)
def model_and_params(request):
  model = _model(request.param)
  return model, _random_params(model)


def _tokens(rng, b, n=NUM_TOKENS):
  labels = rng.integers(0, NUM_CLASSES, b)
  return np.asarray(ar_lib.make_sequence(labels, rng.integers(0, CODEBOOK, (b, n)), NUM_CLASSES, 0.0))


# ------------------------------------------------------------------------------ references (NumPy)

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_top_k_top_p(logits, top_k, top_p):
  """transformers' TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1, filter -inf)."""
  logits = np.array(logits, np.float32)
  v = logits.shape[-1]
  if top_k:
    k = min(max(top_k, 1), v)
    kth = -np.sort(-logits, axis=-1)[:, k - 1:k]
    logits[logits < kth] = -np.inf
  if top_p is not None and top_p < 1.0:
    order = np.argsort(logits, axis=-1, kind="stable")
    s = np.take_along_axis(logits, order, -1)
    e = np.exp(s - s.max(-1, keepdims=True))
    cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
    remove_sorted = cum <= 1 - top_p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    logits[remove] = -np.inf
  return logits


# ------------------------------------------------------------------------------ model

def test_decode_logits_equal_full_forward(model_and_params):
  model, params = model_and_params
  seq = jnp.asarray(_tokens(np.random.default_rng(0), 3, NUM_TOKENS))     # [3, 10]
  full = model.apply({"params": params}, seq)
  assert full.shape == (3, 1 + NUM_TOKENS, VOCAB) and full.dtype == jnp.float32

  # Prefill 3 tokens at once, then one at a time: with the einsums, and with the one-token steps
  # through nn/decode_attention's kernel (Pallas interpret mode here).
  for attention in ("xla", "pallas"):
    m = model.clone(decode_step=attention)
    decode = jax.jit(lambda tok, pos, cache: m.apply({"params": params}, tok, positions=pos,
                                                     cache=cache))
    cache = m.init_cache(3)
    logits, cache = decode(seq[:, :3], jnp.arange(3), cache)
    got = [logits]
    for i in range(3, seq.shape[1]):
      logits, cache = decode(seq[:, i:i + 1], jnp.array([i]), cache)
      got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=2e-5, rtol=1e-5,
                               err_msg=attention)
    if attention == "pallas":   # a step's kernels: the attention, and Llama's RMSNorms
      step = str(jax.make_jaxpr(decode)(seq[:, :1], jnp.array([3]), cache))
      assert "decode_attention" in step
      assert ("rms_norm" in step) == (model.flavour == "llama"), model.flavour


def test_fused_decoding_kernels_give_the_same_logits(model_and_params):
  """fuse_for_decoding: q / k / v (and Llama's gate / up) as one kernel each, in their own
  collection, the originals left out; decoding logits as with the model's own kernels, and the
  model's parameter tree untouched."""
  model, params = model_and_params
  before = jax.tree.map(np.asarray, params)
  variables = ar_lib.fuse_for_decoding({"params": params})
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
  fused = variables[ar_lib.DECODE]["block0"]
  assert fused["attn"]["qkv"].shape == (32, 3, 2, 16)
  assert ("qkv_bias" in fused["attn"]) == (model.flavour == "gpt2")
  assert ("gate_up" in fused) == (model.flavour == "llama")
  assert "query" not in variables["params"]["block0"]["attn"]
  # The output head zero-padded to a multiple of 128 columns (the sampler slices the logits back).
  head = variables[ar_lib.DECODE]["head"]
  assert head.shape == (32, -(-VOCAB // ar_lib.HEAD_MULTIPLE) * ar_lib.HEAD_MULTIPLE)
  assert not np.asarray(head[:, VOCAB:]).any() and "head" not in variables["params"]
  seq = jnp.asarray(_tokens(np.random.default_rng(2), 3, NUM_TOKENS))

  def decoded(m, v):    # prefill 4 tokens, then one token per step
    decode = jax.jit(lambda v, tok, pos, cache: m.apply(v, tok, positions=pos, cache=cache))
    cache = m.init_cache(3)
    logits, cache = decode(v, seq[:, :4], jnp.arange(4), cache)
    got = [logits]
    for i in range(4, seq.shape[1]):
      logits, cache = decode(v, seq[:, i:i + 1], jnp.array([i]), cache)
      got.append(logits)
    return np.concatenate(got, 1), str(jax.make_jaxpr(decode)(v, seq[:, :1], jnp.array([4]),
                                                               cache))

  plain, _ = decoded(model, {"params": params})
  np.testing.assert_allclose(decoded(model, variables)[0], plain, atol=1e-6, rtol=1e-6)
  # Llama's RMSNorm scales folded into qkv_rms / gate_up_rms: the prefill (and XLA's steps) normalise
  # without scale before the GEMMs; the Pallas steps scale the GEMMs' rows inside the attention and
  # SwiGLU kernels, and run no RMSNorm kernel in a block (only the final norm's).
  folded = ar_lib.fuse_for_decoding({"params": params}, fold_norms=True)
  if model.flavour == "llama":
    block = folded[ar_lib.DECODE]["block0"]
    assert set(block) == {"attn", "gate_up_rms"} and set(block["attn"]) == {"qkv_rms"}
    assert "norm1" not in folded["params"]["block0"] and "norm2" not in folded["params"]["block0"]
    np.testing.assert_allclose(block["gate_up_rms"][:, 1],
                               params["block0"]["norm2"]["scale"][:, None] *
                               params["block0"]["up"]["kernel"], rtol=1e-6)
    for step in ("xla", "pallas"):
      got, jaxpr = decoded(model.clone(decode_step=step), folded)
      np.testing.assert_allclose(got, plain, atol=2e-5, rtol=1e-5, err_msg=step)
      if step == "pallas":
        assert jaxpr.count("name=rms_norm") == 1 and jaxpr.count("name=rms_scaled_swiglu") == 2
    # One norm folded, the other kept as the RMSNorm kernel.
    for folds, norm_kernels, swiglu_kernels in ((("norm1",), 3, 0), (("norm2",), 3, 2)):
      half = ar_lib.fuse_for_decoding({"params": params}, fold_norms=folds)
      block = half[ar_lib.DECODE]["block0"]
      assert ("qkv_rms" in block["attn"]) == ("norm1" in folds)
      assert ("gate_up_rms" in block) == ("norm2" in folds)
      assert set(half["params"]["block0"]) & {"norm1", "norm2"} == {"norm1", "norm2"} - set(folds)
      got, jaxpr = decoded(model.clone(decode_step="pallas"), half)
      np.testing.assert_allclose(got, plain, atol=2e-5, rtol=1e-5, err_msg=str(folds))
      assert jaxpr.count("name=rms_norm") == norm_kernels, folds
      assert jaxpr.count("name=rms_scaled_swiglu") == swiglu_kernels, folds
    with pytest.raises(ValueError, match="fold_norms names norm1 / norm2"):
      ar_lib.fuse_for_decoding({"params": params}, fold_norms=("norm_2",))
  else:    # GPT-2's LayerNorms stay
    jax.tree.map(np.testing.assert_array_equal, folded, variables)
  # A tied head: the padded DECODE head is the embedding transposed; the same logits.
  tied = _model(model.flavour, tie_embeddings=True)
  tied_params = _random_params(tied)
  tied_vars = ar_lib.fuse_for_decoding({"params": tied_params})
  np.testing.assert_array_equal(tied_vars[ar_lib.DECODE]["head"][:, :VOCAB],
                                tied_params["token_embed"]["embedding"].T)
  np.testing.assert_allclose(tied.apply(tied_vars, seq), tied.apply({"params": tied_params}, seq),
                             atol=1e-6, rtol=1e-6)


def test_causal(model_and_params):
  model, params = model_and_params
  seq = _tokens(np.random.default_rng(1), 2)
  changed = seq.copy()
  j = 5
  changed[:, j] = NUM_CLASSES + 1 + (changed[:, j] - NUM_CLASSES) % CODEBOOK
  fwd = jax.jit(lambda s: model.apply({"params": params}, s))
  a, b = np.asarray(fwd(seq)), np.asarray(fwd(changed))
  np.testing.assert_allclose(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
  assert np.abs(a[:, j:] - b[:, j:]).max(axis=-1).min() > 1e-4


def test_params_logical_axes_and_llama_width():
  allowed = {"vocab", "embed", "mlp", "heads", "kv", "norm", None}
  for flavour in FLAVOURS:
    for tie in (False, True):
      model = _model(flavour, tie_embeddings=tie)
      boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
      leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
      assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
      assert all(set(x.names) <= allowed and len(x.names) == x.value.ndim for x in leaves)
      assert ("head" in boxed["params"]) == (not tie)
  assert ar_lib.ARTransformer(9193, 257, 1024, 24, 16, flavour="llama").mlp_hidden() == 2816
  assert ar_lib.ARTransformer(9193, 257, 1024, 24, 16, flavour="gpt2").mlp_hidden() == 4096
  assert ar_lib.ARTransformer(9, 5, 64, 1, 2, flavour="llama", mlp_dim=96).mlp_hidden() == 96
  # Llama's head starts at zero: uniform predictions at init.
  model = _model("llama")
  v = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  assert not np.any(np.asarray(v["params"]["head"]["kernel"].value))


def test_rotary_against_complex_rotation():
  """Half-split RoPE = multiplying (x_i, x_{i+D/2}) as x_i + j x_{i+D/2} by exp(j pos theta^(-2i/D))."""
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([0, 1, 2, 7, 300])
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(
      1j * pos[:, None, None] * 10000.0 ** (-np.arange(4) / 4))[None]
  np.testing.assert_allclose(ar_lib.rotary(jnp.asarray(x), jnp.asarray(pos)),
                             np.concatenate([z.real, z.imag], -1), atol=1e-4)


def test_llama_depends_on_relative_positions_only():
  model = _model("llama")
  params = _random_params(model)
  seq = jnp.asarray(_tokens(np.random.default_rng(3), 2))
  fwd = jax.jit(lambda s, pos: model.apply({"params": params}, s, positions=pos))
  base = fwd(seq, jnp.arange(seq.shape[1]))
  np.testing.assert_allclose(fwd(seq, jnp.arange(seq.shape[1]) + 5), base, atol=1e-4)
  assert np.abs(fwd(seq, 2 * jnp.arange(seq.shape[1])) - base).max() > 1e-2


def _np_rotate_half_split(x, pos, theta=10000.0):
  """1-D RoPE of x [..., D] at pos (broadcast over x's leading axes) as a complex rotation of the
  pairs (x_i, x_{i+D/2}) by pos theta^(-2i/D)."""
  d = x.shape[-1]
  z = (x[..., :d // 2] + 1j * x[..., d // 2:]) * np.exp(
      1j * np.asarray(pos, np.float64)[..., None] * theta ** (-np.arange(d // 2) * 2.0 / d))
  return np.concatenate([z.real, z.imag], -1)


def test_rotary_2d_closed_form():
  """First half of the head dim rotated by the row, second by the column, each half-split RoPE of
  dimension D/2 (LlamaGen's frequencies theta^(-2i/(D/2)), i < D/4); sequence positions map to the
  grid after the leading tokens, which sit at (0, 0)."""
  rows, cols = ar_lib.grid_positions(jnp.array([0, 1, 2, 4, 5, 12]), (3, 4), num_prefix=1)
  np.testing.assert_array_equal(rows, [0, 0, 0, 0, 1, 2])
  np.testing.assert_array_equal(cols, [0, 0, 1, 3, 0, 3])
  rows, cols = ar_lib.grid_positions(jnp.arange(6), (2, 2), num_prefix=3)
  np.testing.assert_array_equal(np.stack([rows, cols], 1), [[0, 0]] * 4 + [[0, 1], [1, 0]])

  x = np.random.default_rng(0).normal(size=(2, 4, 3, 8)).astype(np.float32)
  r, c = np.array([0, 1, 5, 15]), np.array([0, 3, 2, 15])
  want = np.concatenate([_np_rotate_half_split(x[..., :4], r[:, None]),
                         _np_rotate_half_split(x[..., 4:], c[:, None])], -1)
  got = ar_lib.rotary_2d(jnp.asarray(x), jnp.asarray(r), jnp.asarray(c))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Written out for one pair: dims (0, 2) turn by the row at frequency 1, (1, 3) by the row at
  # 1e4^(-1/2), (4, 6) and (5, 7) likewise by the column.
  e = np.eye(8, dtype=np.float32)[None, None, None]                     # [1, 1, 1, 8, 8] basis
  out = np.asarray(ar_lib.rotary_2d(jnp.asarray(e[0, 0, 0])[None, None], jnp.array([2]),
                                    jnp.array([3])))[0, 0]              # rows: rotated e_i
  np.testing.assert_allclose(out[0, [0, 2]], [np.cos(2), np.sin(2)], atol=1e-6)
  np.testing.assert_allclose(out[1, [1, 3]], [np.cos(2e-2), np.sin(2e-2)], atol=1e-6)
  np.testing.assert_allclose(out[4, [4, 6]], [np.cos(3), np.sin(3)], atol=1e-6)
  np.testing.assert_allclose(out[5, [5, 7]], [np.cos(3e-2), np.sin(3e-2)], atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    ar_lib.rotary_2d(jnp.zeros((1, 1, 1, 6)), jnp.zeros(1), jnp.zeros(1))


def test_rotary_2d_scores_depend_on_grid_offsets_only():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(qpos, kpos):
    rq = ar_lib.rotary_2d(q, jnp.array([qpos[0]]), jnp.array([qpos[1]]))
    rk = ar_lib.rotary_2d(k, jnp.array([kpos[0]]), jnp.array([kpos[1]]))
    return float(jnp.sum(rq * rk))

  for offset in [(0, 0), (1, 2), (-3, 1), (5, -4)]:
    got = [score((r + offset[0], c + offset[1]), (r, c)) for r, c in [(0, 0), (4, 1), (7, 9)]]
    np.testing.assert_allclose(got, got[0], rtol=1e-5, atol=1e-5)
  # Rows and columns are told apart, and so are different offsets.
  base = score((1, 2), (0, 0))
  assert abs(score((2, 1), (0, 0)) - base) > 1e-3 and abs(score((1, 3), (0, 0)) - base) > 1e-3


def test_rope_2d_model_options():
  seq = jnp.asarray(_tokens(np.random.default_rng(5), 2))
  one_d = _model("llama")
  params = _random_params(one_d)
  two_d = _model("llama_rope2d")
  a = np.asarray(one_d.apply({"params": params}, seq))
  b = np.asarray(two_d.apply({"params": params}, seq))      # same parameters, other positions
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)    # position 0 is unrotated in both
  for bad, match in [(dict(rope="2d"), "grid"), (dict(rope="3d"), "unknown rope"),
                     (dict(rope="2d", grid=(4, 4)), "does not fit")]:
    with pytest.raises(ValueError, match=match):
      _model("llama", **bad).apply({"params": params}, seq)
  with pytest.raises(ValueError, match="learned positions"):
    _model("gpt2", rope="2d", grid=GRID).init(jax.random.PRNGKey(0), seq)


def test_rope_2d_prefix_sampling_cached_equals_full_recompute():
  """The T2I path: P prefix embeddings at (0, 0), then the image grid; the prefix fed into the
  cache at once, one token per step after it."""
  p = 3
  model = ar_lib.ARTransformer(vocab_size=CODEBOOK, seq_len=p + NUM_TOKENS, width=32, depth=2,
                               num_heads=2, flavour="llama", rope="2d", grid=GRID)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                        nn.meta.unbox(shapes["params"]))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x, params)
  prefix = jnp.asarray(rng.normal(size=(3, p, 32)), jnp.float32)
  kw = dict(num_image_tokens=NUM_TOKENS, codebook_size=CODEBOOK, rng=jax.random.PRNGKey(0),
            uncond_prefix=jnp.asarray(rng.normal(size=(p, 32)), jnp.float32), cfg_scale=1.75,
            temperature=1.3, top_k=12, top_p=0.8)
  full = np.asarray(sampling.sample_from_prefix_full_recompute(model, params, prefix, **kw))
  for kernels in ("separate", "fused_cublas"):
    cached = np.asarray(sampling.sample_from_prefix(model, params, prefix, decode_kernels=kernels,
                                                    **kw))
    np.testing.assert_array_equal(cached, full, err_msg=kernels)
  assert len(np.unique(cached)) > 5
  # With nn/decode_attention's kernel: caches of P + N - 1 = 11 positions, not a power of two; the
  # prefix's forward through the fused (and norm-folded) kernels, the steps through the Pallas ones.
  for kernels, draw in (("separate", "xla"), ("folded", "pallas")):
    np.testing.assert_array_equal(sampling.sample_from_prefix(
        model.clone(decode_step="pallas"), params, prefix, decode_kernels=kernels, draw=draw,
        **kw), full, err_msg=f"{kernels} {draw}")
  with pytest.raises(ValueError, match="draw"):
    sampling.sample_from_prefix(model, params, prefix, draw="sort", **kw)


def test_remat_gives_the_same_gradients():
  model = _model("gpt2")
  params = _random_params(model)
  seq = jnp.asarray(_tokens(np.random.default_rng(4), 2))
  grad = lambda m: jax.jit(jax.grad(
      lambda p: ar_lib.next_token_loss(m.apply({"params": p}, seq, True), seq)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad(model),
               grad(model.clone(remat=True)))
  with pytest.raises(ValueError, match="implementation"):
    model.clone(attention="flash").apply({"params": params}, seq)


def test_bfloat16_logits_are_float32_and_close():
  model = _model("llama")
  params = _random_params(model, scale=0.1)
  seq = jnp.asarray(_tokens(np.random.default_rng(2), 2))
  full32 = jax.jit(model.apply)({"params": params}, seq)
  out = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, seq)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, full32, atol=0.15 * float(jnp.abs(full32).max()))


# ------------------------------------------------------------------------------ sequence and loss

def test_sequence_layout_and_class_dropout():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, NUM_CLASSES, 20000)
  codes = rng.integers(0, CODEBOOK, (20000, 4))
  seq = np.asarray(ar_lib.make_sequence(labels, codes, NUM_CLASSES, 0.1, jax.random.PRNGKey(0)))
  assert seq.dtype == np.int32 and seq.shape == (20000, 5)
  np.testing.assert_array_equal(seq[:, 1:], codes + NUM_CLASSES + 1)
  dropped = seq[:, 0] != labels
  assert abs(dropped.mean() - 0.1) < 0.01
  assert np.all(seq[dropped, 0] == NUM_CLASSES) and ar_lib.null_class_id(NUM_CLASSES) == NUM_CLASSES
  kept = np.asarray(ar_lib.make_sequence(labels, codes, NUM_CLASSES, 0.0))
  np.testing.assert_array_equal(kept[:, 0], labels)
  assert ar_lib.image_token_offset(NUM_CLASSES) == 6 and ar_lib.vocab_size(1000, 8192) == 9193
  with pytest.raises(ValueError):
    ar_lib.class_token_ids(labels, NUM_CLASSES, 0.1)


def test_next_token_loss_and_perplexity():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
  seq = rng.integers(0, 11, (3, 6))
  logp = np_log_softmax(logits[:, :-1])
  nll = -np.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(ar_lib.next_token_loss(jnp.asarray(logits), jnp.asarray(seq)),
                             nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(ar_lib.perplexity(jnp.asarray(logits), jnp.asarray(seq)),
                             np.exp(nll.mean()), rtol=1e-5)
  mask = np.array([True, False, True])
  np.testing.assert_allclose(ar_lib.perplexity(jnp.asarray(logits), jnp.asarray(seq), mask),
                             np.exp(nll[mask].mean()), rtol=1e-5)


# ------------------------------------------------------------------------------ filters and CFG

def test_top_k_top_p_against_numpy_reference():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(16, 300)) * rng.uniform(0.3, 4, (16, 1))).astype(np.float32)
  for top_k, top_p in [(0, 1.0), (None, None), (10, 1.0), (0, 0.9), (50, 0.92), (600, 0.5),
                       (1, 0.9), (0, 1e-3), (7, 0.999)]:
    got = np.asarray(sampling.top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
    want = np_top_k_top_p(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"{top_k} {top_p}")
    np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(want)])
  # The sampler's sizes (k 600 of a large vocabulary, where the nucleus is found within the top k).
  wide = (rng.normal(size=(8, 4096)) * rng.uniform(0.5, 6, (8, 1))).astype(np.float32)
  for top_k, top_p in [(600, 0.92), (600, 0.3), (3000, 0.99), (2, 0.01)]:
    got = np.asarray(sampling.top_k_top_p_filter(jnp.asarray(wide), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(np_top_k_top_p(wide, top_k, top_p)),
                                  err_msg=f"{top_k} {top_p}")
  # Hand-worked: probabilities .5 .3 .15 .05; ties at the k-th value are kept.
  x = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
  keep = lambda k, p: ~np.isinf(np.asarray(sampling.top_k_top_p_filter(jnp.asarray(x), k, p)))[0]
  np.testing.assert_array_equal(keep(0, 0.7), [False, True, False, True])
  np.testing.assert_array_equal(keep(0, 0.9), [True, True, False, True])
  np.testing.assert_array_equal(keep(0, 0.2), [False, True, False, False])
  np.testing.assert_array_equal(keep(3, 0.99), [True, True, False, True])
  ties = jnp.array([[3.0, 1.0, 3.0, 3.0]])
  np.testing.assert_array_equal(np.isinf(sampling.top_k_filter(ties, 2))[0], [0, 1, 0, 0])


@pytest.mark.torch
def test_top_k_top_p_against_transformers():
  torch = pytest.importorskip("torch")
  warpers = pytest.importorskip("transformers.generation.logits_process")
  logits = np.random.default_rng(1).normal(size=(8, 200)).astype(np.float32) * 2
  for top_k, top_p in [(20, 0.92), (0, 0.5), (100, 0.99)]:
    t = torch.from_numpy(logits.copy())
    if top_k:
      t = warpers.TopKLogitsWarper(top_k)(None, t)
    t = warpers.TopPLogitsWarper(top_p)(None, t).numpy()
    got = np.asarray(sampling.top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(t))


def test_cfg_closed_form():
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 3, 7)).astype(np.float32)
  np.testing.assert_allclose(sampling.cfg_combine(cond, uncond, 1.75), 1.75 * cond - 0.75 * uncond,
                             rtol=1e-5, atol=1e-6)
  both = jnp.asarray(np.concatenate([cond, uncond]))
  np.testing.assert_allclose(sampling.guided_logits(both, 3, 1.75), uncond + 1.75 * (cond - uncond),
                             rtol=1e-6)
  np.testing.assert_array_equal(sampling.guided_logits(both, 3, None), both)
  np.testing.assert_array_equal(sampling.guided_logits(both, 3, 1.0), both)


def _greedy_reference(model, params, labels, cfg_scale):
  """Greedy decoding written out: full forwards of the conditional and the unconditional (null
  class) sequences, combined as (1 - s) uncond + s cond in NumPy, argmax over the image slice."""
  b = len(labels)
  lo = NUM_CLASSES + 1
  cond = np.zeros((b, NUM_TOKENS), np.int32)
  cond[:, 0] = labels
  uncond = cond.copy()
  uncond[:, 0] = NUM_CLASSES
  fwd = jax.jit(lambda s: model.apply({"params": params}, s))
  out = []
  for i in range(NUM_TOKENS):
    c = np.asarray(fwd(cond), np.float64)[:, i, lo:]
    u = np.asarray(fwd(uncond), np.float64)[:, i, lo:]
    tok = np.argmax(c if cfg_scale is None else (1 - cfg_scale) * u + cfg_scale * c, -1)
    out.append(tok)
    if i + 1 < NUM_TOKENS:
      cond[:, i + 1] = uncond[:, i + 1] = tok + lo
  return np.stack(out, 1)


def test_cfg_sampling_matches_written_out_guidance(model_and_params):
  model, params = model_and_params
  labels = np.array([0, 3, 4])
  kw = dict(SAMPLE_KW, rng=jax.random.PRNGKey(0))
  want = _greedy_reference(model, params, labels, 1.75)
  np.testing.assert_array_equal(sampling.sample(model, params, labels, **{**kw, "temperature": 0}),
                                want)
  # The filters bind: with top_k=1 every draw is the argmax.
  np.testing.assert_array_equal(sampling.sample(model, params, labels, **{**kw, "top_k": 1}), want)
  got = sampling.sample(model, params, labels, **{**kw, "temperature": 0, "cfg_scale": 1.0})
  np.testing.assert_array_equal(got, _greedy_reference(model, params, labels, None))


# ------------------------------------------------------------------------------ sampling

SAMPLE_KW = dict(num_image_tokens=NUM_TOKENS, num_classes=NUM_CLASSES, codebook_size=CODEBOOK,
                 cfg_scale=1.75, temperature=1.3, top_k=12, top_p=0.8)


def test_cached_sampling_equals_full_recompute(model_and_params):
  model, params = model_and_params
  labels = jnp.array([0, 1, 2, 4, 4, 3])
  rng = jax.random.PRNGKey(0)
  cached = np.asarray(sampling.sample(model, params, labels, rng=rng, **SAMPLE_KW))
  full = np.asarray(sampling.sample_full_recompute(model, params, labels, rng=rng, **SAMPLE_KW))
  assert cached.shape == (6, NUM_TOKENS) and cached.dtype == np.int32
  assert cached.min() >= 0 and cached.max() < CODEBOOK
  np.testing.assert_array_equal(cached, full)
  # Decoding in 4 loops, each attending only to the cache filled by its end: the same tokens.
  assert [sampling.default_cache_segments(n) for n in (9, 64, 128, 256, 1024)] == [1, 1, 2, 4, 4]
  np.testing.assert_array_equal(
      sampling.sample(model, params, labels, rng=rng, cache_segments=4, **SAMPLE_KW), full)
  # Fused decoding kernels ("fused_cublas": "fused" through cuBLAS GEMMs on GPUs; on CPUs the same
  # computation, so "fused" alone here).
  np.testing.assert_array_equal(sampling.sample(model, params, labels, rng=rng,
                                                decode_kernels="fused", **SAMPLE_KW), full)
  # The attention of each step as nn/decode_attention's kernel (one decoding loop by default);
  # Llama's second norm folded into gate / up; the token drawn by nn/filtered_draw's kernel.
  pallas = model.clone(decode_step="pallas")
  assert sampling.default_cache_segments(256, "pallas") == 1
  for kernels, draw in (("separate", "xla"), ("fused_cublas", "pallas"), ("folded", "pallas")):
    np.testing.assert_array_equal(sampling.sample(pallas, params, labels, rng=rng, draw=draw,
                                                  decode_kernels=kernels, **SAMPLE_KW), full,
                                  err_msg=f"{kernels} {draw}")
  with pytest.raises(ValueError, match="decode_kernels"):
    sampling.sample(model, params, labels, rng=rng, decode_kernels="fast", **SAMPLE_KW)
  with pytest.raises(ValueError, match="draw"):
    sampling.sample(model, params, labels, rng=rng, draw="sort", **SAMPLE_KW)
  other = np.asarray(sampling.sample(model, params, labels, rng=jax.random.PRNGKey(7), **SAMPLE_KW))
  assert (other != cached).mean() > 0.3
  assert (cached[3] != cached[4]).any()   # same label, different example index: different streams


def test_samples_do_not_depend_on_batch_split(model_and_params):
  model, params = model_and_params
  labels = np.array([0, 1, 2, 3, 4, 0])
  rng = jax.random.PRNGKey(3)
  whole = np.asarray(sampling.sample(model, params, labels, rng=rng, **SAMPLE_KW))
  first = np.asarray(sampling.sample(model, params, labels[:3], rng=rng, **SAMPLE_KW))
  second = np.asarray(sampling.sample(model, params, labels[3:], rng=rng, example_offset=3,
                                      **SAMPLE_KW))
  np.testing.assert_array_equal(np.concatenate([first, second]), whole)


def test_sampling_without_cfg_or_filters_follows_the_model():
  """A GPT-2 whose output is constant (final LayerNorm scale 0, bias e_0; head row 0 gives code 7 a
  logit of 4, all others 0): with cfg off and no filters, P(7) = e^4 / (e^4 + K - 1)."""
  model = _model("gpt2")
  params = _random_params(model)
  lo = NUM_CLASSES + 1
  params["norm_out"]["scale"] = jnp.zeros(model.width)
  params["norm_out"]["bias"] = jnp.zeros(model.width).at[0].set(1.0)
  params["head"]["kernel"] = jnp.zeros((model.width, VOCAB)).at[0, lo + 7].set(4.0)
  out = np.asarray(sampling.sample(model, params, np.zeros(64, np.int32),
                                   num_image_tokens=NUM_TOKENS, num_classes=NUM_CLASSES,
                                   codebook_size=CODEBOOK, rng=jax.random.PRNGKey(0),
                                   cfg_scale=None, top_k=None, top_p=None))
  p7 = np.exp(4) / (np.exp(4) + CODEBOOK - 1)
  assert abs((out == 7).mean() - p7) < 0.06
  assert len(np.unique(out[out != 7])) > 10   # the other codes are drawn too, roughly uniformly


# ------------------------------------------------------------------------------ transformers

def _torch_model(flavour, model, params):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  d, hd, h = model.width, model.width // model.num_heads, model.num_heads
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  sd = {}
  if flavour == "gpt2":
    cfg = transformers.GPT2Config(
        vocab_size=model.vocab_size, n_positions=model.seq_len, n_embd=d, n_layer=model.depth,
        n_head=h, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        activation_function="gelu_new", tie_word_embeddings=True)
    ref = transformers.GPT2LMHeadModel(cfg)
    sd["transformer.wte.weight"] = t(params["token_embed"]["embedding"])
    sd["transformer.wpe.weight"] = t(params["pos_embed"])
    for i in range(model.depth):
      p, k = params[f"block{i}"], f"transformer.h.{i}."
      a = p["attn"]
      sd[k + "attn.c_attn.weight"] = t(np.concatenate(
          [np.reshape(a[n]["kernel"], (d, d)) for n in ("query", "key", "value")], 1))
      sd[k + "attn.c_attn.bias"] = t(np.concatenate(
          [np.reshape(a[n]["bias"], (d,)) for n in ("query", "key", "value")]))
      sd[k + "attn.c_proj.weight"] = t(np.reshape(a["out"]["kernel"], (d, d)))
      sd[k + "attn.c_proj.bias"] = t(a["out"]["bias"])
      for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
        sd[k + theirs + ".weight"], sd[k + theirs + ".bias"] = t(p[ours]["scale"]), t(p[ours]["bias"])
      for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
        sd[k + f"mlp.{theirs}.weight"] = t(p[ours]["kernel"])
        sd[k + f"mlp.{theirs}.bias"] = t(p[ours]["bias"])
    sd["transformer.ln_f.weight"] = t(params["norm_out"]["scale"])
    sd["transformer.ln_f.bias"] = t(params["norm_out"]["bias"])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
  else:
    cfg = transformers.LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=d, intermediate_size=model.mlp_hidden(),
        num_hidden_layers=model.depth, num_attention_heads=h, num_key_value_heads=h,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(cfg)
    sd["model.embed_tokens.weight"] = t(params["token_embed"]["embedding"])
    for i in range(model.depth):
      p, k = params[f"block{i}"], f"model.layers.{i}."
      a = p["attn"]
      for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        sd[k + f"self_attn.{theirs}.weight"] = t(np.reshape(a[ours]["kernel"], (d, d)).T)
      sd[k + "self_attn.o_proj.weight"] = t(np.reshape(a["out"]["kernel"], (d, d)).T)
      for n in ("gate", "up", "down"):
        sd[k + f"mlp.{n}_proj.weight"] = t(np.asarray(p[n]["kernel"]).T)
      sd[k + "input_layernorm.weight"] = t(p["norm1"]["scale"])
      sd[k + "post_attention_layernorm.weight"] = t(p["norm2"]["scale"])
    sd["model.norm.weight"] = t(params["norm_out"]["scale"])
    sd["lm_head.weight"] = t(np.asarray(params["head"]["kernel"]).T)
  missing = set(ref.state_dict()) - set(sd)
  assert not {m for m in missing if not m.endswith((".attn.bias", ".masked_bias", "inv_freq"))}
  ref.load_state_dict(sd, strict=False)
  return ref.eval()


@pytest.mark.torch
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_against_transformers(flavour):
  torch = pytest.importorskip("torch")
  model = _model(flavour, tie_embeddings=flavour == "gpt2")
  params = _random_params(model, scale=0.1)
  ref = _torch_model(flavour, model, params)
  seq = _tokens(np.random.default_rng(0), 2)
  with torch.no_grad():
    want = ref(torch.from_numpy(seq.astype(np.int64))).logits.numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(seq)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ GPT-2 checkpoints

def _gpt2_arrays(vocab, positions, width, depth, heads, prefix="transformer.", seed=0):
  """A GPT-2 state dict of random arrays in the Hugging Face layout (Conv1D weights [in, out]);
  without the prefix, with the causal-mask buffers (as the hub's gpt2-medium file)."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
  d = width
  w = {prefix + "wte.weight": r(vocab, d), prefix + "wpe.weight": r(positions, d),
       prefix + "ln_f.weight": 1 + r(d), prefix + "ln_f.bias": r(d)}
  for i in range(depth):
    k = f"{prefix}h.{i}."
    w.update({k + "ln_1.weight": 1 + r(d), k + "ln_1.bias": r(d), k + "ln_2.weight": 1 + r(d),
              k + "ln_2.bias": r(d), k + "attn.c_attn.weight": r(d, 3 * d),
              k + "attn.c_attn.bias": r(3 * d), k + "attn.c_proj.weight": r(d, d),
              k + "attn.c_proj.bias": r(d), k + "mlp.c_fc.weight": r(d, 4 * d),
              k + "mlp.c_fc.bias": r(4 * d), k + "mlp.c_proj.weight": r(4 * d, d),
              k + "mlp.c_proj.bias": r(d)})
    if not prefix:
      w[k + "attn.bias"] = np.tril(np.ones((1, 1, positions, positions), np.float32))
  return w


def _write_gpt2_folder(path, weights, **config):
  import json

  from safetensors.numpy import save_file
  path.mkdir(parents=True, exist_ok=True)
  cfg = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5,
             n_inner=None, scale_attn_weights=True, **config)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(weights, str(path / "model.safetensors"))
  return str(path)


def _gpt2_folder(path, vocab, positions=16, width=32, depth=2, heads=2, prefix="transformer.",
                 edit=None):
  weights = _gpt2_arrays(vocab, positions, width, depth, heads, prefix)
  if edit:
    edit(weights)
  return _write_gpt2_folder(path, weights, vocab_size=vocab, n_positions=positions, n_embd=width,
                            n_layer=depth, n_head=heads), weights


def _loaded(folder, model, init=None):
  """(params loaded from folder, the initial params they replace)."""
  from vqkd_jax.proposal.gpt2_checkpoint import gpt2_initializer
  if init is None:
    init = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 2), jnp.int32))["params"])
    init = jax.tree.map(np.asarray, init)
  return gpt2_initializer(folder, model)(init), init


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_checkpoint_resized_to_the_vocabulary(tmp_path, tie):
  """First V rows of wte (and of the head, untied), the model's own initial rows past the
  checkpoint's vocabulary, first seq_len positions; the mask buffers of a prefix-less file (the
  hub's layout) are ignored."""
  model = _model("gpt2", tie_embeddings=tie)                          # V = 30, seq_len 10
  init = None
  for vocab, prefix in [(40, "transformer."), (20, ""), (20, "transformer.")]:
    folder, w = _gpt2_folder(tmp_path / f"{vocab}{prefix}", vocab, prefix=prefix)
    params, init = _loaded(folder, model, init)
    wte, emb = w[prefix + "wte.weight"], params["token_embed"]["embedding"]
    n = min(vocab, VOCAB)
    np.testing.assert_array_equal(emb[:n], wte[:n])
    np.testing.assert_array_equal(emb[n:], init["token_embed"]["embedding"][n:])
    np.testing.assert_array_equal(params["pos_embed"], w[prefix + "wpe.weight"][:1 + NUM_TOKENS])
    q = params["block1"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q.reshape(32, 32), w[prefix + "h.1.attn.c_attn.weight"][:, :32])
    np.testing.assert_array_equal(params["block1"]["attn"]["value"]["bias"].reshape(-1),
                                  w[prefix + "h.1.attn.c_attn.bias"][64:])
    np.testing.assert_array_equal(params["block0"]["fc2"]["kernel"],
                                  w[prefix + "h.0.mlp.c_proj.weight"])
    if not tie:
      head = params["head"]["kernel"]
      np.testing.assert_array_equal(head[:, :n], wte[:n].T)
      np.testing.assert_array_equal(head[:, n:], init["head"]["kernel"][:, n:])
    assert jax.tree.structure(params) == jax.tree.structure(init)


def test_gpt2_checkpoint_errors_name_what_does_not_fit(tmp_path):
  from vqkd_jax.proposal.gpt2_checkpoint import gpt2_initializer
  from vqkd_jax.teachers.hf_checkpoint import CheckpointMismatchError
  model = _model("gpt2", tie_embeddings=True)

  def edit(w):
    del w["transformer.h.1.mlp.c_fc.bias"]
    w["transformer.h.0.ln_1.weight"] = np.ones(31, np.float32)
    w["transformer.h.0.attn.extra"] = np.ones(3, np.float32)

  folder, _ = _gpt2_folder(tmp_path / "bad", VOCAB, edit=edit)
  with pytest.raises(CheckpointMismatchError) as e:
    _loaded(folder, model)
  msg = str(e.value)
  assert "1 missing" in msg and "transformer.h.1.mlp.c_fc.bias" in msg
  assert "1 unexpected" in msg and "transformer.h.0.attn.extra" in msg
  assert "1 wrong shape" in msg and "transformer.h.0.ln_1.weight: shape (31,)" in msg
  # The architecture is checked against config.json first, every difference named.
  folder, _ = _gpt2_folder(tmp_path / "deep", VOCAB, depth=3, heads=4)
  with pytest.raises(ValueError, match=r"n_layer \(depth\): checkpoint 3, model 2") as e:
    gpt2_initializer(folder, model)
  assert "n_head (num_heads): checkpoint 4, model 2" in str(e.value)
  folder, _ = _gpt2_folder(tmp_path / "short", VOCAB, positions=8)
  with pytest.raises(ValueError, match="n_positions: checkpoint 8 < the model's seq_len 10"):
    gpt2_initializer(folder, model)
  with pytest.raises(ValueError, match="gpt2 flavour"):
    gpt2_initializer(folder, _model("llama"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gpt2_initializer(str(tmp_path / "nowhere"), model)


@pytest.mark.torch
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_checkpoint_logits_equal_transformers(tmp_path, tie):
  """A tiny random GPT2LMHeadModel saved with save_pretrained (safetensors), loaded without torch:
  our logits equal transformers' for the same ids (our vocabulary = the checkpoint's), relative
  error <= 1e-4 in float32, over every position and the image-token slice alike."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
  ref = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    for p in ref.parameters():        # every weight off its initial value (biases, LayerNorms)
      p.add_(0.1 * torch.randn_like(p))
  ref.eval().save_pretrained(tmp_path / "gpt2")
  model = _model("gpt2", tie_embeddings=tie)
  params, _ = _loaded(str(tmp_path / "gpt2"), model)
  seq = _tokens(np.random.default_rng(0), 3)
  with torch.no_grad():
    want = ref(torch.from_numpy(seq.astype(np.int64))).logits.numpy()
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(seq)))
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  lo = ar_lib.image_token_offset(NUM_CLASSES)
  assert rel(got, want) <= 1e-4
  assert rel(got[:, :-1, lo:], want[:, :-1, lo:]) <= 1e-4
  # Dropout as HF's in train mode is still there (embeddings, residuals, attention).
  train = model.clone(dropout=0.1).apply({"params": params}, jnp.asarray(seq), train=True,
                                         rngs={"dropout": jax.random.PRNGKey(0)})
  assert rel(np.asarray(train), want) > 1e-3


# ------------------------------------------------------------------------------ ImageNet config

def test_imagenet_ar_config_sizes_and_recipe():
  from vqkd_jax.config import load_config
  from vqkd_jax.train import ar as ar_stage

  counts = {}
  for variant in ("gpt2", "llama"):
    c = load_config(f"configs/imagenet/ar.py:variant={variant}")
    assert (c.batch_size, c.total_steps, c.precision) == (96, 260_000, "bfloat16")
    assert (c.data.image_size, c.data.augmentation, c.class_dropout) == (256, "weak", 0.1)
    o = c.optimizer
    assert (o.name, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.schedule, o.end_lr, o.decay) == (
        "adamw", 1e-4, 0.9, 0.98, 1e-6, 0.2, "cosine", 0.0, "all")
    s = c.sampling
    assert (s.cfg_scale, s.temperature, s.top_k, s.top_p) == (1.75, 1.0, 600, 0.92)
    model = ar_stage.build_model(c.model, num_classes=1000, codebook_size=8192,
                                 num_image_tokens=256, precision=c.precision)
    assert (model.vocab_size, model.seq_len, model.width, model.depth, model.num_heads) == (
        9193, 257, 1024, 24, 16)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    counts[variant] = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
  d, v, layers = 1024, 9193, 24
  # GPT-2 medium: tied head, 257 learned positions, biases and LayerNorms.
  assert counts["gpt2"] == v * d + 257 * d + layers * (12 * d * d + 13 * d) + 2 * d
  # Llama medium (HF LlamaConfig(24, 16, 1024, 2816)): untied head, no biases, RMSNorm.
  assert counts["llama"] == 2 * v * d + layers * (4 * d * d + 3 * d * 2816 + 2 * d) + d
  c = load_config("configs/imagenet/ar.py:variant=llama")
  assert (c.model.mlp_dim, c.model.rope_theta, c.model.dropout, c.model.tie_embeddings) == (
      2816, 1e4, 0.0, False)
  assert load_config("configs/imagenet/ar.py:variant=llama,rope=2d").model.rope == "2d"
  assert load_config("configs/imagenet/ar.py").model.tie_embeddings   # gpt2 by default


@pytest.mark.parametrize("variant", [pytest.param("gpt2", marks=pytest.mark.slow),  # 26 s
                                     "llama,rope=2d"])
def test_imagenet_ar_bench_train_and_sample_runlocal(variant, capsys):
  """`vqkd bench train` on random codes (no tokenizer) and `vqkd bench sample` with random
  weights, at the runlocal size."""
  from vqkd_jax import cli
  spec = f"configs/imagenet/ar.py:variant={variant},runlocal"
  assert cli.main(["bench", "train", "--config", spec, "--steps", "1"]) == 0
  assert "| ar " in capsys.readouterr().out
  # Two layouts of the weights (float32 here) with XLA's step: the second row of each guidance
  # setting draws the tokens of the first (a spread head: with the zero-initialised one any path
  # would). The config's other layouts, the Pallas step and draw (the GPU defaults; in interpret
  # mode they would cost most of this test's time): test_cached_sampling_*,
  # test_fused_decoding_kernels_*.
  assert cli.main(["bench", "sample", "--config", spec, "--steps", "1",
                   "--config.bench.decode_kernels=('separate','fused_cublas')",
                   "--config.bench.decode_step=('xla',)", "--config.bench.draw=('xla',)"]) == 0
  rows = [[c.strip() for c in r.split("|")] for r in capsys.readouterr().out.splitlines()
          if "| ar sampling " in r]
  assert [r[-2] for r in rows] == ["ref", "1.000", "ref", "1.000"], rows


def test_bench_sampling_draws_the_zero_initialised_llama_head():
  """The Llama head starts at zero (every logit equal: the draw would be trivial); the sampling
  bench draws it from N(0, 0.02^2) and leaves every other variable, and a non-zero head, alone."""
  from vqkd_jax.api import _spread_head

  rng = np.random.default_rng(0)
  variables = {"params": {"head": {"kernel": jnp.zeros((256, 512), jnp.bfloat16)},
                          "block_0": {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}},
               "decode": {"x": jnp.ones(3)}}
  spread = _spread_head(variables)
  kernel = np.asarray(spread["params"]["head"]["kernel"], np.float32)
  assert spread["params"]["head"]["kernel"].dtype == jnp.bfloat16
  assert abs(kernel.std() - 0.02) < 0.001 and abs(kernel.mean()) < 0.001
  np.testing.assert_array_equal(spread["params"]["block_0"]["w"], variables["params"]["block_0"]["w"])
  np.testing.assert_array_equal(spread["decode"]["x"], variables["decode"]["x"])
  assert _spread_head(spread)["params"]["head"]["kernel"] is spread["params"]["head"]["kernel"]
  gpt2 = {"params": {"token_embed": {"embedding": jnp.ones((4, 2))}}}    # tied: no head
  assert _spread_head(gpt2) is gpt2


def test_ar_stage_starts_from_the_gpt2_checkpoint(tmp_path):
  """config.init_from: the training state's initial parameters are the checkpoint's (first 9193
  of 10000 embedding rows, first 17 positions); other flavours refuse it; no tokenizer and no
  synthetic bench group: an error that says what to set."""
  from vqkd_jax.config import ConfigError, load_config
  from vqkd_jax.train.loop import setup

  c = load_config("configs/imagenet/ar.py:variant=gpt2,runlocal")
  folder, w = _gpt2_folder(tmp_path / "gpt2", 10_000, positions=32, width=64, depth=2, heads=4)
  with c.unlocked():
    c.init_from = folder
  params = setup(c).state.params
  np.testing.assert_array_equal(params["token_embed"]["embedding"],
                                w["transformer.wte.weight"][:9193])
  np.testing.assert_array_equal(params["pos_embed"], w["transformer.wpe.weight"][:17])
  np.testing.assert_array_equal(params["block1"]["fc1"]["bias"], w["transformer.h.1.mlp.c_fc.bias"])
  c = load_config("configs/imagenet/ar.py:variant=llama,runlocal")
  with c.unlocked():
    c.init_from = folder
  with pytest.raises(ConfigError, match="GPT-2"):
    setup(c)
  c = load_config("configs/imagenet/ar.py:variant=gpt2")
  with pytest.raises(ConfigError, match="tokenizer_workdir"):
    setup(c)


def test_validation_perplexity_of_the_first_images(tmp_path):
  """train.ar.validation_perplexity(limit=k), the demo report's PPL on part of the split: exp of
  the mean image-token NLL over the validation split's first k images, against a NumPy
  log-softmax of the model's logits on those images; without a limit, over every image."""
  from vqkd_jax.config import load_config
  from vqkd_jax.train import ar as ar_stage
  from vqkd_jax.train.evaluate import map_split

  config = load_config("configs/demo/ar.py:runlocal")
  with config.unlocked():
    config.data.data_dir = str(tmp_path)
  c = config.data.num_classes
  model = ar_lib.ARTransformer(vocab_size=c + 1 + CODEBOOK, seq_len=1 + NUM_TOKENS, width=32,
                               depth=2, num_heads=2, flavour="gpt2")
  variables = {"params": _random_params(model)}
  # Tokens that depend on the image: the red channel at a 3 x 3 lattice of pixels, binned.
  tokens_fn = lambda x: (x[:, ::11, ::11, 0].astype(jnp.int32).reshape(x.shape[0], -1)
                         * CODEBOOK // 256)

  def reference(limit):
    batch = map_split(config, lambda b: {"label": b["label"], "image": b["image"]}, limit=limit)
    seq = np.asarray(ar_lib.make_sequence(batch["label"], tokens_fn(jnp.asarray(batch["image"])),
                                          c, 0.0))
    logits = np.asarray(model.apply(variables, jnp.asarray(seq), train=False), np.float64)
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, seq[:, 1:, None], axis=-1)
    return len(seq), float(np.exp(nll.mean()))

  n_all, want_all = reference(None)
  n_part, want_part = reference(40)
  assert n_part == 40 < n_all
  got_part = ar_stage.validation_perplexity(config, model, variables, tokens_fn, c, limit=40)
  got_all = ar_stage.validation_perplexity(config, model, variables, tokens_fn, c)
  np.testing.assert_allclose(got_part, want_part, rtol=1e-5)
  np.testing.assert_allclose(got_all, want_all, rtol=1e-5)
  assert abs(got_part - got_all) > 1e-4 * got_all   # the limit changes which images count
