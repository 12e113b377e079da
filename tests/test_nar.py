"""Masked-token (NAR) proposal network: the cosine masking schedules in closed form, the masked-only
loss against NumPy, the sequence layout, guidance and the whole greedy decoder against a written-out
NumPy reference, fixed tokens never changing, batch-split invariance, draws following the model's
distribution, and one training run through the shared loop on a tiny Cluster tokenizer."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_workdir import train_tiny_cluster_tokenizer  # tests/ is on sys.path (conftest)

from vqkd_jax.proposal import nar

NUM_CLASSES, CODEBOOK, NUM_TOKENS = 5, 24, 9
MASK_ID = NUM_CLASSES + 1 + CODEBOOK


def _model(**kw):
  return nar.NARTransformer(num_classes=NUM_CLASSES, codebook_size=CODEBOOK,
                            seq_len=1 + NUM_TOKENS, width=32, depth=2, num_heads=2, **kw)


def _random_params(model, seed=0, scale=0.3):
  """Random weights of the model's shapes (norm scales around 1): logits far from uniform."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, model.seq_len), jnp.int32))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes["params"]))


@pytest.fixture(scope="module")
def model_and_params():
  model = _model()
  return model, _random_params(model)


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ schedules

def test_decoding_mask_schedule_closed_form():
  for n, steps in [(256, 8), (256, 12), (64, 8), (1024, 10), (9, 8), (9, 12), (3, 6), (5, 1)]:
    want = [max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps)))
            for t in range(steps - 1)] + [0]
    np.testing.assert_array_equal(nar.mask_schedule(n, steps), want, err_msg=f"{n} {steps}")
  np.testing.assert_array_equal(nar.mask_schedule(256, 8), [251, 236, 212, 181, 142, 97, 49, 0])
  np.testing.assert_array_equal(nar.mask_schedule(9, 8), [8, 8, 7, 6, 5, 3, 1, 0])
  with pytest.raises(ValueError):
    nar.mask_schedule(4, 0)
  np.testing.assert_allclose(nar.choice_temperatures(4.5, 4), [3.375, 2.25, 1.125, 0.0])
  np.testing.assert_allclose(nar.cfg_scales(3.0, 4, "linear"), [1.5, 2.0, 2.5, 3.0])
  np.testing.assert_allclose(nar.cfg_scales(3.0, 4), [3.0] * 4)


def test_training_masks_follow_the_cosine_schedule():
  """r = cos(pi/2 u), u ~ U(0, 1): E[r] = 2/pi and P(r <= x) = 1 - 2 arccos(x) / pi; the count is
  ceil(r N) >= 1; every position is equally likely to be masked."""
  n, b = 16, 40000
  mask = np.asarray(nar.random_mask(jax.random.PRNGKey(0), b, n))
  count = mask.sum(1)
  assert mask.shape == (b, n) and mask.dtype == bool and count.min() >= 1
  # ceil(rN) / N = r + (a fractional part, uniform-ish in [0, 1)) / N.
  assert abs(count.mean() / n - (2 / np.pi + 0.5 / n)) < 0.01
  for k in (1, 4, 8, 12, 15):       # P(count <= k) = P(r <= k / N)
    assert abs((count <= k).mean() - (1 - 2 * np.arccos(k / n) / np.pi)) < 0.01, k
  np.testing.assert_allclose(mask.mean(0), count.mean() / n, atol=0.01)


# ------------------------------------------------------------------------------ layout and loss

def test_sequence_layout_and_class_dropout():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, NUM_CLASSES, 20000)
  codes = rng.integers(0, CODEBOOK, (20000, 4))
  mask = rng.random((20000, 4)) < 0.5
  seq = np.asarray(nar.masked_sequence(labels, codes, mask, NUM_CLASSES, CODEBOOK, 0.1,
                                       jax.random.PRNGKey(0)))
  assert seq.dtype == np.int32 and seq.shape == (20000, 5)
  np.testing.assert_array_equal(seq[:, 1:], np.where(mask, MASK_ID, codes + NUM_CLASSES + 1))
  dropped = seq[:, 0] != labels
  assert abs(dropped.mean() - 0.1) < 0.01 and np.all(seq[dropped, 0] == NUM_CLASSES)
  kept = np.asarray(nar.masked_sequence(labels, codes, mask, NUM_CLASSES, CODEBOOK))
  np.testing.assert_array_equal(kept[:, 0], labels)
  assert nar.mask_token_id(1000, 8192) == 9193 and nar.vocab_size(1000, 8192) == 9194
  assert nar.mask_token_id(NUM_CLASSES, CODEBOOK) == nar.vocab_size(NUM_CLASSES, CODEBOOK) - 1


def test_loss_counts_only_masked_positions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  codes = rng.integers(0, 11, (3, 7))
  mask = rng.random((3, 7)) < 0.4
  mask[2] = False                                             # a row with nothing masked
  logp = np_log_softmax(logits)
  nll = -np.take_along_axis(logp, codes[..., None], -1)[..., 0]
  got = nar.masked_token_loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  np.testing.assert_allclose(got, nll[mask].mean(), rtol=1e-5)
  eps = 0.1
  smooth = (1 - eps) * nll - eps / 11 * logp.sum(-1)
  got = nar.masked_token_loss(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask), eps)
  np.testing.assert_allclose(got, smooth[mask].mean(), rtol=1e-5)
  # The unmasked positions get no gradient.
  grad = jax.grad(nar.masked_token_loss)(jnp.asarray(logits), jnp.asarray(codes), jnp.asarray(mask))
  assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.abs(np.asarray(grad)[mask]).sum(-1) > 0)


# ------------------------------------------------------------------------------ model

def test_model_is_bidirectional_and_names_its_axes(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(1)
  seq = np.asarray(nar.masked_sequence(rng.integers(0, NUM_CLASSES, 2),
                                       rng.integers(0, CODEBOOK, (2, NUM_TOKENS)),
                                       rng.random((2, NUM_TOKENS)) < 0.5, NUM_CLASSES, CODEBOOK))
  fwd = jax.jit(lambda s: model.apply({"params": params}, s))
  out = np.asarray(fwd(seq))
  assert out.shape == (2, NUM_TOKENS, CODEBOOK) and out.dtype == np.float32
  changed = seq.copy()
  changed[:, -1] = NUM_CLASSES + 1 + (changed[:, -1] + 1) % CODEBOOK
  assert np.abs(np.asarray(fwd(changed))[:, 0] - out[:, 0]).max() > 1e-3   # later token seen
  changed = seq.copy()
  changed[:, 0] = (changed[:, 0] + 1) % NUM_CLASSES
  assert np.abs(np.asarray(fwd(changed)) - out).max(-1).min() > 1e-4       # class seen everywhere
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  allowed = {"vocab", "embed", "mlp", "heads", "kv", "norm", None}
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(set(x.names) <= allowed and len(x.names) == x.value.ndim for x in leaves)
  assert boxed["params"]["token_embed"]["embedding"].value.shape == (NUM_CLASSES + CODEBOOK + 2, 32)


def test_remat_gives_the_same_gradients(model_and_params):
  model, params = model_and_params
  seq = jnp.asarray(np.random.default_rng(4).integers(0, MASK_ID + 1, (2, 1 + NUM_TOKENS)))
  codes = jnp.asarray(np.random.default_rng(5).integers(0, CODEBOOK, (2, NUM_TOKENS)))
  grad = lambda m: jax.jit(jax.grad(lambda p: nar.masked_token_loss(
      m.apply({"params": p}, seq, True), codes, seq[:, 1:] == MASK_ID)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad(model),
               grad(model.clone(remat=True)))


# ------------------------------------------------------------------------------ decoding

def _greedy_reference(model, params, labels, steps, cfg_scale, schedule="constant"):
  """Greedy decoding written out in NumPy: separate conditional and null-class forwards,
  (1 - s) uncond + s cond in float64, argmax, confidence log p(argmax) (no Gumbel noise), the
  floor(N cos(pi/2 (t+1)/T)) least confident re-masked (clipped as documented)."""
  b, n = len(labels), NUM_TOKENS
  fwd = jax.jit(lambda s: model.apply({"params": params}, s))
  codes, known, remaining = np.zeros((b, n), np.int64), np.zeros((b, n), bool), n
  for t in range(steps):
    ids = np.where(known, codes + NUM_CLASSES + 1, MASK_ID)
    cond = np.asarray(fwd(np.concatenate([labels[:, None], ids], 1)), np.float64)
    if cfg_scale is None:
      g = cond
    else:
      s = cfg_scale if schedule == "constant" else 1 + (cfg_scale - 1) * (t + 1) / steps
      uncond = np.asarray(fwd(np.concatenate([np.full((b, 1), NUM_CLASSES), ids], 1)), np.float64)
      g = (1 - s) * uncond + s * cond
    drawn = np.where(known, codes, g.argmax(-1))
    logp = np.take_along_axis(np_log_softmax(g), drawn[..., None], -1)[..., 0]
    conf = np.where(known, np.inf, logp)
    cosine = math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))
    m = 0 if t == steps - 1 else max(1, min(remaining, cosine))
    remask = np.zeros((b, n), bool)
    np.put_along_axis(remask, np.argsort(conf, -1, kind="stable")[:, :m], True, -1)
    codes, known, remaining = drawn, ~remask, m
  return codes


@pytest.mark.parametrize("cfg_scale,schedule,steps", [(2.5, "constant", 8), (3.0, "linear", 5),
                                                      (None, "constant", 12)])
def test_greedy_decoding_matches_written_out_reference(model_and_params, cfg_scale, schedule,
                                                       steps):
  model, params = model_and_params
  labels = np.array([0, 3, 4, 1])
  got = nar.sample(model, params, labels, rng=jax.random.PRNGKey(0), steps=steps,
                   cfg_scale=cfg_scale, cfg_schedule=schedule, temperature=0.0,
                   choice_temperature=0.0)
  want = _greedy_reference(model, params, labels, steps, cfg_scale, schedule)
  np.testing.assert_array_equal(got, want)


def test_cfg_combination_closed_form():
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 3, 4, 7)).astype(np.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))
  known = jnp.zeros((3, 4), bool)
  # Greedy draw of the combined logits is the argmax of 1.75 cond - 0.75 uncond.
  logits = jnp.asarray(np.concatenate([cond, uncond]))
  drawn, _ = nar._decode_step(logits, jnp.zeros((3, 4), jnp.int32), known, keys, 2, 1.75, 0.0,
                              batch=3, cfg=True, temperature=0.0)
  np.testing.assert_array_equal(drawn, (1.75 * cond - 0.75 * uncond).argmax(-1))


def test_fixed_tokens_never_change_and_masks_follow_the_schedule(model_and_params):
  model, params = model_and_params
  labels = np.array([0, 1, 2, 3, 4, 0, 1])
  steps = 12     # 12 steps on 9 tokens: some counts repeat (steps that fix nothing)
  codes, (hist_codes, hist_known) = nar.sample(
      model, params, labels, rng=jax.random.PRNGKey(1), steps=steps, cfg_scale=2.0,
      temperature=1.0, choice_temperature=4.5, return_history=True)
  hist_codes, hist_known = np.asarray(hist_codes), np.asarray(hist_known)
  assert hist_codes.shape == (steps, len(labels), NUM_TOKENS)
  # Still-masked count per step and example = the closed-form schedule; all fixed at the end.
  np.testing.assert_array_equal((~hist_known).sum(-1),
                                np.repeat(nar.mask_schedule(NUM_TOKENS, steps)[:, None],
                                          len(labels), 1))
  assert hist_known[-1].all()
  np.testing.assert_array_equal(hist_codes[-1], codes)
  for t in range(1, steps):
    assert np.all(hist_known[t][hist_known[t - 1]])              # fixed stays fixed
    np.testing.assert_array_equal(hist_codes[t][hist_known[t - 1]],
                                  hist_codes[t - 1][hist_known[t - 1]])
  assert codes.min() >= 0 and codes.max() < CODEBOOK


def test_samples_depend_on_seed_and_index_only(model_and_params):
  model, params = model_and_params
  labels = np.array([0, 1, 2, 3, 4, 0])
  kw = dict(rng=jax.random.PRNGKey(3), steps=8, cfg_scale=1.75, temperature=1.0)
  whole = np.asarray(nar.sample(model, params, labels, **kw))
  first = np.asarray(nar.sample(model, params, labels[:3], **kw))
  second = np.asarray(nar.sample(model, params, labels[3:], example_offset=3, **kw))
  np.testing.assert_array_equal(np.concatenate([first, second]), whole)
  other = np.asarray(nar.sample(model, params, labels, **{**kw, "rng": jax.random.PRNGKey(4)}))
  assert (other != whole).mean() > 0.3
  assert (whole[0] != whole[5]).any()        # same label, another index: another stream


def test_draws_follow_the_model_distribution():
  """A model whose output is constant (final LayerNorm scale 0, bias e_0; head row 0 gives code 7
  a logit of 4): without guidance P(7) = e^(4/T) / (e^(4/T) + K - 1) at temperature T. One step (all
  drawn at once; later steps keep the confident draws, which favours code 7)."""
  model = _model()
  params = _random_params(model)
  params["norm_out"]["scale"] = jnp.zeros(model.width)
  params["norm_out"]["bias"] = jnp.zeros(model.width).at[0].set(1.0)
  params["head"] = jnp.zeros((model.width, CODEBOOK)).at[0, 7].set(4.0)
  params["head_bias"] = jnp.zeros(CODEBOOK)
  for temperature in (1.0, 2.0):
    out = np.asarray(nar.sample(model, params, np.zeros(300, np.int32), rng=jax.random.PRNGKey(0),
                                steps=1, cfg_scale=None, temperature=temperature))
    e = np.exp(4 / temperature)
    assert abs((out == 7).mean() - e / (e + CODEBOOK - 1)) < 0.03
    assert len(np.unique(out[out != 7])) == CODEBOOK - 1


def test_bfloat16_sampling(model_and_params):
  model, params = model_and_params
  out = nar.sample(model.clone(dtype=jnp.bfloat16), params, np.arange(3), rng=jax.random.PRNGKey(0),
                   steps=4)
  assert out.shape == (3, NUM_TOKENS) and out.dtype == jnp.int32
  assert int(out.min()) >= 0 and int(out.max()) < CODEBOOK


# ------------------------------------------------------------------------------ stage

@pytest.mark.slow  # 45 s; the demo fixture (tests/test_demo.py) trains NAR stages and samples them
def test_nar_stage_trains_through_the_loop_and_loads(tmp_path):
  """A tiny Cluster tokenizer (random ViT teacher, as tests/test_cluster.py), then the demo NAR
  config for a few steps with validation; load_nar gives a model that samples the tokenizer's
  grid."""
  from vqkd_jax.config import load_config
  from vqkd_jax.train import loop
  from vqkd_jax.train.nar import load_nar

  # Batch 64: the runlocal Cluster config's own.
  train_tiny_cluster_tokenizer(tmp_path / "tokenizer", patch_size=8, width=16, batch=64)

  c = load_config("configs/demo/nar.py:runlocal")
  with c.unlocked():
    c.tokenizer_workdir = str(tmp_path / "tokenizer")
    c.data.synthetic = True
    c.batch_size = 16
    c.total_steps = c.checkpoint_every = c.eval_every = 3
    c.model.width, c.model.depth = 32, 1
  result = loop.train(c, str(tmp_path / "nar"))
  assert result.steps_run == 3
  train_logs = [h for h in result.history if "loss" in h]
  assert train_logs and all(np.isfinite(h["loss"]) for h in train_logs)
  assert 0 < train_logs[-1]["mask_ratio"] <= 1
  assert abs(train_logs[-1]["masked_perplexity"] - 32) < 16            # near uniform early on
  evals = [h for h in result.history if "eval/masked_accuracy" in h]
  assert evals and 0 <= evals[-1]["eval/masked_accuracy"] <= 1
  assert np.isfinite(evals[-1]["eval/masked_perplexity"])

  model, variables, info = load_nar(str(tmp_path / "nar"))
  assert info["grid"] == (4, 4) and info["codebook_size"] == 32 and info["sampling"]["steps"] == 8
  codes = nar.sample(model, variables, np.array([0, 1]), rng=jax.random.PRNGKey(0), steps=4)
  assert codes.shape == (2, 16) and int(codes.max()) < 32
