"""AR proposal network and its sampling loop: KV-cache decoding against full recomputation, causality,
top-k/top-p filtering against a NumPy port of transformers' warpers, classifier-free guidance in closed
form, the loss against NumPy cross-entropy, class dropout, batch-split invariance of samples, and
(with torch) both flavours against transformers' GPT2LMHeadModel / LlamaForCausalLM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.proposal import ar as ar_lib
from vqkd_jax.proposal import sampling

NUM_CLASSES, CODEBOOK, NUM_TOKENS = 5, 24, 9
VOCAB = NUM_CLASSES + 1 + CODEBOOK
FLAVOURS = ("gpt2", "llama")


def _model(flavour, **kw):
  return ar_lib.ARTransformer(vocab_size=VOCAB, seq_len=1 + NUM_TOKENS, width=32, depth=2,
                              num_heads=2, flavour=flavour, **kw)


def _random_params(model, seed=0, scale=0.3):
  """Random weights of the model's parameter shapes (norm scales around 1), so that every weight
  (Llama's zero-initialised head included) matters and the logits are far from uniform."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes["params"]))


@pytest.fixture(scope="module", params=FLAVOURS)
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

  decode = jax.jit(lambda tok, pos, cache: model.apply({"params": params}, tok, positions=pos,
                                                       cache=cache))
  # Prefill 3 tokens at once, then one at a time.
  cache = model.init_cache(3)
  logits, cache = decode(seq[:, :3], jnp.arange(3), cache)
  got = [logits]
  for i in range(3, seq.shape[1]):
    logits, cache = decode(seq[:, i:i + 1], jnp.array([i]), cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=2e-5, rtol=1e-5)


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
