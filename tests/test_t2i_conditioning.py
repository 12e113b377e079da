"""Text-to-image conditioning beyond the AR prefix: cross-attention (the module against a NumPy
masked attention and against truncating the padding away; the AR's KV-cached sampling, which
computes the caption's keys / values once, against full recomputation; padded caption tokens
changing nothing; guidance against a written-out greedy reference), the masked-token (NAR) T2I
network (its whole greedy decoder against a written-out reference for both conditionings), 2-D RoPE
in a T2I Llama, and the stage's losses going down on a fixed batch for each network."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_t2i import written_out_greedy_guidance  # tests/ is on sys.path
from tiny_workdir import random_clip_workdir, random_like, train_tiny_cluster_tokenizer

from vqkd_jax.nn.cross_attention import CrossAttention
from vqkd_jax.proposal import nar as nar_lib
from vqkd_jax.proposal import sampling
from vqkd_jax.proposal import t2i as t2i_lib
from vqkd_jax.proposal.ar import ARTransformer
from vqkd_jax.proposal.nar import NARTransformer

CODEBOOK, NUM_TOKENS, TEXT_LEN, TEXT_DIM = 24, 9, 5, 7


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _captions(seed, b):
  """Random text states [b, L, Dt] and masks with lengths 2 .. L (so some rows are padded)."""
  rng = np.random.default_rng(seed)
  states = rng.normal(size=(b, TEXT_LEN, TEXT_DIM)).astype(np.float32)
  lengths = np.concatenate([[2, TEXT_LEN], rng.integers(2, TEXT_LEN + 1, b - 2)])
  return jnp.asarray(states), jnp.asarray(np.arange(TEXT_LEN)[None] < lengths[:, None])


def _model(proposal, conditioning, flavour="gpt2", **kw):
  cross = conditioning == "cross_attention"
  seq_len = (1 if cross else TEXT_LEN) + NUM_TOKENS
  if proposal == "ar":
    transformer = ARTransformer(vocab_size=CODEBOOK, seq_len=seq_len, width=32, depth=2,
                                num_heads=2, flavour=flavour, cross_attention=cross, **kw)
    model = t2i_lib.TextConditionedAR(transformer, TEXT_LEN, conditioning)
  else:
    transformer = NARTransformer(num_classes=0, codebook_size=CODEBOOK, seq_len=seq_len, width=32,
                                 depth=2, num_heads=2, cross_attention=cross)
    model = t2i_lib.TextConditionedNAR(transformer, TEXT_LEN, conditioning)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, TEXT_LEN, TEXT_DIM)),
                          jnp.ones((1, TEXT_LEN), bool), jnp.zeros((1, NUM_TOKENS), jnp.int32))
  return model, {"params": random_like(shapes["params"], seed=3)}


# ------------------------------------------------------------------------------ the module

def test_cross_attention_against_numpy_and_truncated_padding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 16)).astype(np.float32)
  context = rng.normal(size=(3, 6, 16)).astype(np.float32)
  lengths = np.array([6, 2, 4])
  mask = np.arange(6)[None] < lengths[:, None]
  layer = CrossAttention(num_heads=2)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, context, mask)
  params = random_like(shapes["params"], seed=1)
  out, (k, v) = jax.jit(layer.apply)({"params": params}, x, context, mask)
  # NumPy: per head softmax(q k^T / sqrt(d)) over the real context tokens only.
  p = {n: {a: np.asarray(b, np.float64) for a, b in params[n].items()} for n in params}
  q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
  kk = np.einsum("bld,dhk->blhk", context, p["key"]["kernel"]) + p["key"]["bias"]
  vv = np.einsum("bld,dhk->blhk", context, p["value"]["kernel"]) + p["value"]["bias"]
  scores = np.einsum("bthk,blhk->bhtl", q, kk) / np.sqrt(8)
  scores = np.where(mask[:, None, None], scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhtl,blhk->bthk", w, vv)
  want = np.einsum("bthk,hkd->btd", y, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(k, kk, atol=1e-5)
  # The mask is the padding removed: row 1 with its first 2 context tokens only, no mask.
  short, _ = layer.apply({"params": params}, x[1:2], context[1:2, :2])
  np.testing.assert_allclose(short, out[1:2], atol=1e-5)
  # Cached keys / values give the same output as the context.
  again, _ = layer.apply({"params": params}, x, None, mask, (k, v))
  np.testing.assert_allclose(again, out, atol=1e-6)


# ------------------------------------------------------------------------------ AR cross-attention

SAMPLE_KW = dict(num_image_tokens=NUM_TOKENS, codebook_size=CODEBOOK, cfg_scale=1.75,
                 temperature=1.3, top_k=12, top_p=0.8)


@pytest.fixture(scope="module", params=[pytest.param("gpt2", marks=pytest.mark.slow),  # 28 s
                                        "llama"])
def cross_ar(request):
  return _model("ar", "cross_attention", request.param)


def test_cross_attention_padding_dropout_and_causality(cross_ar):
  model, variables = cross_ar
  states, mask = _captions(0, 4)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, CODEBOOK, (4, NUM_TOKENS)))
  fwd = jax.jit(lambda s, m, t, d=None: model.apply(variables, s, m, t, d))
  logits = np.asarray(fwd(states, mask, tokens))
  assert logits.shape == (4, NUM_TOKENS, CODEBOOK) and logits.dtype == np.float32
  # Padded caption tokens carry nothing (the key padding mask); real ones do, everywhere.
  noise = jnp.where(mask[..., None], 0.0, 5.0)
  np.testing.assert_allclose(fwd(states + noise, mask, tokens), logits, atol=1e-5)
  changed = np.asarray(fwd(states + 5.0 - noise, mask, tokens))
  assert np.abs(changed - logits).max(-1).min() > 1e-4       # image token 0 sees the text too
  # A dropped caption is the null context: its logits ignore the text and its mask.
  drop = jnp.array([True, False, True, False])
  a = np.asarray(fwd(states, mask, tokens, drop))
  b = np.asarray(fwd(-states, ~mask | jnp.eye(4, TEXT_LEN, dtype=bool), tokens, drop))
  np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], atol=1e-6)
  np.testing.assert_allclose(a[[1, 3]], logits[[1, 3]], atol=1e-6)
  # Image token i is predicted from tokens < i only.
  j = 4
  c = np.asarray(fwd(states, mask, tokens.at[:, j].set((tokens[:, j] + 1) % CODEBOOK)))
  np.testing.assert_allclose(c[:, :j + 1], logits[:, :j + 1], atol=1e-6)
  assert np.abs(c[:, j + 1:] - logits[:, j + 1:]).max() > 1e-4


def test_cross_attention_cached_sampling_equals_full_recompute(cross_ar):
  """The cache holds the caption's keys / values from the first call on; full recomputation
  projects the context again at every step."""
  model, variables = cross_ar
  states, mask = _captions(2, 5)
  inputs = model.apply(variables, states, mask, method="sampling_inputs")
  assert inputs["prefix"].shape == (5, 1, 32) and inputs["context"].shape == (5, TEXT_LEN, 32)
  params = variables["params"]["transformer"]
  kw = dict(SAMPLE_KW, rng=jax.random.PRNGKey(0), **inputs)
  cached = np.asarray(sampling.sample_from_prefix(model.transformer, params, **kw))
  full = np.asarray(sampling.sample_from_prefix_full_recompute(model.transformer, params, **kw))
  assert cached.shape == (5, NUM_TOKENS) and cached.min() >= 0 and cached.max() < CODEBOOK
  np.testing.assert_array_equal(cached, full)
  # Decoding in 3 loops over a growing cache (the context's keys / values carried along).
  np.testing.assert_array_equal(
      sampling.sample_from_prefix(model.transformer, params, cache_segments=3, **kw), full)
  # The self-attention of each step as nn/decode_attention's kernel (Pallas interpret mode here);
  # then with Llama's norm1 / norm2 folded (norm_cross stays a norm) and the filtered draw.
  pallas = model.transformer.clone(decode_step="pallas")
  np.testing.assert_array_equal(sampling.sample_from_prefix(pallas, params, **kw), full)
  np.testing.assert_array_equal(sampling.sample_from_prefix(
      pallas, params, decode_kernels="folded", draw="pallas", **kw), full)
  other = sampling.sample_from_prefix(model.transformer, params,
                                      **dict(kw, rng=jax.random.PRNGKey(7)))
  assert (np.asarray(other) != cached).mean() > 0.3
  with pytest.raises(ValueError, match="uncond_context"):
    sampling.sample_from_prefix(model.transformer, params, **dict(kw, uncond_context=None))


def test_cross_attention_greedy_sampling_matches_written_out_guidance(cross_ar):
  model, variables = cross_ar
  states, mask = _captions(3, 3)
  tokens = written_out_greedy_guidance(model, variables, states, mask, NUM_TOKENS)
  inputs = model.apply(variables, states, mask, method="sampling_inputs")
  got = sampling.sample_from_prefix(model.transformer, variables["params"]["transformer"],
                                    rng=jax.random.PRNGKey(0), **inputs,
                                    **dict(SAMPLE_KW, temperature=0.0))
  np.testing.assert_array_equal(got, tokens)


def test_rope_2d_text_to_image_cached_equals_full_recompute():
  """A T2I Llama with 2-D RoPE over a 3x3 grid (prefix of 5 text positions at (0, 0)): cached
  sampling equals full recomputation, and the grid matters (a 1-D RoPE model of the same weights
  gives other logits)."""
  model, variables = _model("ar", "prefix", "llama", rope="2d", grid=(3, 3))
  states, mask = _captions(4, 4)
  params = variables["params"]["transformer"]
  inputs = model.apply(variables, states, mask, method="sampling_inputs")
  kw = dict(SAMPLE_KW, rng=jax.random.PRNGKey(1), **inputs)
  np.testing.assert_array_equal(
      sampling.sample_from_prefix(model.transformer, params, **kw),
      sampling.sample_from_prefix_full_recompute(model.transformer, params, **kw))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CODEBOOK, (4, NUM_TOKENS)))
  one_d = model.clone(transformer=model.transformer.clone(rope="1d", grid=None))
  assert np.abs(np.asarray(model.apply(variables, states, mask, tokens))
                - np.asarray(one_d.apply(variables, states, mask, tokens))).max() > 1e-3


# ------------------------------------------------------------------------------ NAR

def _greedy_nar_reference(model, variables, states, mask, steps, cfg_scale):
  """Greedy parallel decoding written out in NumPy: separate caption and null-caption forwards
  of the masked ids, (1 - s) uncond + s cond in float64, argmax, confidence log p(argmax), the
  floor(N cos(pi/2 (t+1)/T)) least confident re-masked."""
  b, n = states.shape[0], NUM_TOKENS
  fwd = jax.jit(lambda ids, d: model.apply(variables, states, mask, ids, jnp.full((b,), d)))
  codes, known = np.zeros((b, n), np.int64), np.zeros((b, n), bool)
  schedule = nar_lib.mask_schedule(n, steps)
  for t in range(steps):
    ids = np.where(known, codes + 1, CODEBOOK + 1)
    g = np.asarray(fwd(ids, False), np.float64)
    if cfg_scale is not None:
      g = (1 - cfg_scale) * np.asarray(fwd(ids, True), np.float64) + cfg_scale * g
    drawn = np.where(known, codes, g.argmax(-1))
    logp = np.take_along_axis(np_log_softmax(g), drawn[..., None], -1)[..., 0]
    conf = np.where(known, np.inf, logp)
    remask = np.zeros((b, n), bool)
    np.put_along_axis(remask, np.argsort(conf, -1, kind="stable")[:, :schedule[t]], True, -1)
    codes, known = drawn, ~remask
  return codes


@pytest.mark.parametrize("conditioning", ["prefix", "cross_attention"])
def test_nar_text_to_image_greedy_decoding_matches_written_out_reference(conditioning):
  model, variables = _model("nar", conditioning)
  states, mask = _captions(5, 4)
  ids = nar_lib.masked_image_ids(np.random.default_rng(0).integers(0, CODEBOOK, (4, NUM_TOKENS)),
                                 np.random.default_rng(1).random((4, NUM_TOKENS)) < 0.5, 0,
                                 CODEBOOK)
  fwd = jax.jit(lambda s, d=None: model.apply(variables, s, mask, ids, d))
  logits = np.asarray(fwd(states))
  assert logits.shape == (4, NUM_TOKENS, CODEBOOK)
  # Padded caption tokens change nothing, real ones change every position (bidirectional).
  noise = jnp.where(mask[..., None], 0.0, 5.0)
  np.testing.assert_allclose(fwd(states + noise), logits, atol=1e-5)
  assert np.abs(np.asarray(fwd(states + 5.0 - noise)) - logits).max(-1).min() > 1e-4
  drop = jnp.ones(4, bool)
  np.testing.assert_allclose(fwd(states, drop), fwd(-states, drop), atol=1e-6)

  inputs = model.apply(variables, states, mask, method="sampling_inputs")
  params = variables["params"]["transformer"]
  for cfg_scale, steps in ((2.5, 6), (None, 4)):
    got = nar_lib.sample_from_prefix(model.transformer, params, **inputs,
                                     rng=jax.random.PRNGKey(0), steps=steps, cfg_scale=cfg_scale,
                                     temperature=0.0, choice_temperature=0.0)
    want = _greedy_nar_reference(model, variables, states, mask, steps, cfg_scale)
    np.testing.assert_array_equal(got, want, err_msg=f"cfg {cfg_scale}")
  # Drawn: each sample depends on the seed and its index only.
  kw = dict(rng=jax.random.PRNGKey(3), steps=4, cfg_scale=1.75)
  whole = np.asarray(nar_lib.sample_from_prefix(model.transformer, params, **inputs, **kw))
  part = {k: (v[2:] if k in ("prefix", "context", "context_mask") and v is not None else v)
          for k, v in inputs.items()}
  np.testing.assert_array_equal(
      nar_lib.sample_from_prefix(model.transformer, params, **part, example_offset=2, **kw),
      whole[2:])


# ------------------------------------------------------------------------------ stage

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i_conditioning")
  random_clip_workdir(str(root / "clip"))
  train_tiny_cluster_tokenizer(root / "tokenizer", patch_size=8, width=16, batch=64)
  return {"clip": str(root / "clip"), "tokenizer": str(root / "tokenizer"), "root": root}


def _config(workdirs, arg):
  from vqkd_jax.config import load_config

  c = load_config(f"configs/demo/t2i.py:runlocal,{arg}")
  with c.unlocked():
    c.tokenizer_workdir = workdirs["tokenizer"]
    c.text_encoder.workdir = workdirs["clip"]
    c.data.synthetic = True
    c.batch_size = 16
    c.total_steps = c.checkpoint_every = c.eval_every = 3
    c.model.width, c.model.depth = 32, 1
    c.sampling.num_samples = 4
    c.caption_dropout = 0.0
  return c


@pytest.mark.parametrize("arg", [
    pytest.param("proposal=ar", marks=pytest.mark.slow),   # the stage's default: test_t2i trains it
    pytest.param("conditioning=cross_attention,variant=llama,rope=2d", marks=pytest.mark.slow),
    pytest.param("proposal=nar", marks=pytest.mark.slow),
    "proposal=nar,conditioning=cross_attention"])  # 15-25 s each; one in the default suite
def test_loss_decreases_on_a_fixed_batch(workdirs, arg):
  """make_objective of each network and conditioning (the AR prefix model the stage's default);
  the loss starts near log K (uniform over the 32 codes) and falls when fitting one batch."""
  from vqkd_jax.data.pipeline import synthetic_iterator
  from vqkd_jax.train.t2i import make_objective

  objective = make_objective(_config(workdirs, arg), workdir=str(workdirs["root"]),
                             axis_name=None)
  batch = jax.tree.map(jnp.asarray, next(synthetic_iterator(16, 32, 12, seed=0)))
  params = nn.unbox(objective.init(jax.random.PRNGKey(0), batch))["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def update(params, opt_state, i):
    # NAR: the same masks every step (a fixed key), so that the batch's loss is one function.
    rng = jax.random.PRNGKey(1) if "nar" in arg else jax.random.fold_in(jax.random.PRNGKey(1), i)
    (loss, _), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        params, {}, objective.frozen, batch, rng, True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for i in range(30):
    params, opt_state, loss = update(params, opt_state, i)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(32)) < 0.5
  assert losses[-1] < 0.8 * losses[0] and losses[-1] < min(losses[:5])


@pytest.mark.slow   # 51 s in the suite; test_nar.py runs the class-conditional NAR stage's loop
def test_nar_stage_trains_through_the_loop_and_samples(workdirs, tmp_path):
  """proposal=nar with cross-attention through the shared loop: masked-token validation with the
  captions and the null caption, the sample files; load_t2i gives the NAR model and its decoding
  settings, and sample_images equals nar.sample_from_prefix on the same condition."""
  from vqkd_jax.train import loop
  from vqkd_jax.train.t2i import _sampling_inputs, load_t2i, sample_images

  c = _config(workdirs, "proposal=nar,conditioning=cross_attention")
  result = loop.train(c, str(tmp_path))
  assert result.steps_run == 3
  evals = [h for h in result.history if "eval/masked_accuracy" in h][-1]
  assert 0 <= evals["eval/masked_accuracy"] <= 1
  assert 1 < evals["eval/masked_perplexity"] < 64
  assert 1 < evals["eval/masked_perplexity_null_caption"] < 64
  assert len((tmp_path / "samples_3.txt").read_text().splitlines()) == 4
  assert np.load(tmp_path / "samples_3.npy").shape == (4, 4, 4)

  model, variables, info = load_t2i(str(tmp_path))
  assert isinstance(model, t2i_lib.TextConditionedNAR) and info["proposal"] == "nar"
  assert model.conditioning == "cross_attention" and info["sampling"]["steps"] == 8
  enc = info["text_encoder"]
  ids, mask = enc.tokenize(["a red circle on the left", "a large blue cross", "a green square"])
  codes = sample_images(model, variables, enc, enc.variables, ids, mask,
                        rng=jax.random.PRNGKey(0), steps=4, cfg_scale=1.75)
  inputs = _sampling_inputs(model, enc.encode, variables, enc.variables, ids, mask)
  want = nar_lib.sample_from_prefix(model.transformer, variables["params"]["transformer"],
                                    **inputs, rng=jax.random.PRNGKey(0), steps=4, cfg_scale=1.75)
  np.testing.assert_array_equal(codes, want)
  assert codes.shape == (3, 16) and int(codes.max()) < 32
  with pytest.raises(ValueError, match="top_k and top_p"):
    sample_images(model, variables, enc, enc.variables, ids, mask, rng=jax.random.PRNGKey(0),
                  top_k=5)
