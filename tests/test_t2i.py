"""Text-to-image AR (stage t2i): the prefix path of ARTransformer against the token path (a prefix
of token embeddings is the same sequence), KV-cached prefix sampling against full recomputation,
guidance against a written-out greedy reference, the caption prefix (padding, dropout) and loss
against NumPy, the in-the-box text states against the tower's pooled output, the loss going down
on a fixed batch (tests/test_t2i_conditioning.py), and the stage through the shared loop into load_t2i and CFG sampling."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_workdir import (  # tests/ is on sys.path (conftest)
    random_clip_workdir, random_like, train_tiny_cluster_tokenizer)
from PIL import Image

from vqkd_jax.proposal import sampling
from vqkd_jax.proposal import t2i as t2i_lib
from vqkd_jax.proposal.ar import ARTransformer

CODEBOOK, NUM_TOKENS, TEXT_LEN, TEXT_DIM = 24, 9, 5, 7
FLAVOURS = ("gpt2", "llama")


def _transformer(flavour, **kw):
  return ARTransformer(vocab_size=CODEBOOK, seq_len=TEXT_LEN + NUM_TOKENS, width=32, depth=2,
                       num_heads=2, flavour=flavour, **kw)


def _text_model(flavour):
  model = t2i_lib.TextConditionedAR(_transformer(flavour), TEXT_LEN)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, TEXT_LEN, TEXT_DIM)),
                          jnp.ones((1, TEXT_LEN), bool), jnp.zeros((1, NUM_TOKENS), jnp.int32))
  return model, {"params": random_like(shapes["params"])}


@pytest.fixture(scope="module", params=FLAVOURS)
def text_model(request):
  return _text_model(request.param)


def _captions(rng, b):
  states = rng.normal(size=(b, TEXT_LEN, TEXT_DIM)).astype(np.float32)
  lengths = rng.integers(2, TEXT_LEN + 1, b)
  mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  return jnp.asarray(states), jnp.asarray(mask)


# ------------------------------------------------------------------------------ prefix path

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_prefix_of_token_embeddings_is_the_token_sequence(flavour):
  """A prefix made of the token embeddings of some tokens gives the logits of those tokens fed as
  tokens: the prefix sits at positions 0 .. P-1 and the tokens follow."""
  model = _transformer(flavour)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  params = random_like(shapes["params"], seed=1)
  seq = jnp.asarray(np.random.default_rng(0).integers(0, CODEBOOK, (3, TEXT_LEN + 4)))
  full = jax.jit(model.apply)({"params": params}, seq)
  prefix = params["token_embed"]["embedding"][seq[:, :TEXT_LEN]]
  got = jax.jit(lambda p, s, x: model.apply(p, s, prefix=x))({"params": params}, seq[:, TEXT_LEN:],
                                                             prefix)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-5)
  # Cached: the prefix in one call (no tokens), then one token at a time.
  step = jax.jit(lambda tok, pos, cache, prefix=None: model.apply(
      {"params": params}, tok, positions=pos, cache=cache, prefix=prefix))
  logits, cache = step(seq[:, :0], jnp.arange(TEXT_LEN), model.init_cache(3), prefix)
  out = [logits]
  for i in range(TEXT_LEN, seq.shape[1]):
    logits, cache = step(seq[:, i:i + 1], jnp.array([i]), cache)
    out.append(logits)
  np.testing.assert_allclose(np.concatenate(out, 1), full, atol=2e-5, rtol=1e-5)


def test_text_model_prefix_padding_dropout_and_causality(text_model):
  model, variables = text_model
  rng = np.random.default_rng(0)
  states, mask = _captions(rng, 4)
  tokens = jnp.asarray(rng.integers(0, CODEBOOK, (4, NUM_TOKENS)))
  fwd = jax.jit(lambda s, m, t, d=None: model.apply(variables, s, m, t, d))
  logits = np.asarray(fwd(states, mask, tokens))
  assert logits.shape == (4, NUM_TOKENS, CODEBOOK) and logits.dtype == np.float32
  # Padded caption positions carry nothing: changing their states changes no logit.
  noise = jnp.where(mask[..., None], 0.0, 5.0)
  np.testing.assert_allclose(fwd(states + noise, mask, tokens), logits, atol=1e-5)
  assert np.abs(fwd(states + 5.0 - noise, mask, tokens) - logits).max() > 1e-3
  # A dropped caption is the null prefix: its logits ignore the text.
  drop = jnp.array([True, False, True, False])
  a = np.asarray(fwd(states, mask, tokens, drop))
  b = np.asarray(fwd(-states, ~mask, tokens, drop))
  np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], atol=1e-6)
  np.testing.assert_allclose(a[[1, 3]], logits[[1, 3]], atol=1e-6)
  null = model.apply(variables, method="unconditional_prefix")
  prefix = model.apply(variables, states, mask, drop, method="prefix")
  np.testing.assert_array_equal(prefix[0], null)
  # Image token i is predicted from tokens < i only.
  j = 4
  changed = tokens.at[:, j].set((tokens[:, j] + 1) % CODEBOOK)
  c = np.asarray(fwd(states, mask, changed))
  np.testing.assert_allclose(c[:, :j + 1], logits[:, :j + 1], atol=1e-6)
  assert np.abs(c[:, j + 1:] - logits[:, j + 1:]).max() > 1e-4


def test_image_token_loss_and_caption_dropout():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
  tokens = rng.integers(0, 11, (3, 6))
  x = logits - logits.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(t2i_lib.image_token_nll(jnp.asarray(logits), jnp.asarray(tokens)),
                             want, rtol=1e-5, atol=1e-6)
  drop = np.asarray(t2i_lib.caption_dropout(jax.random.PRNGKey(0), 20000, 0.1))
  assert abs(drop.mean() - 0.1) < 0.01
  assert not np.asarray(t2i_lib.caption_dropout(jax.random.PRNGKey(0), 8, 0.0)).any()


# ------------------------------------------------------------------------------ sampling

SAMPLE_KW = dict(num_image_tokens=NUM_TOKENS, codebook_size=CODEBOOK, cfg_scale=1.75,
                 temperature=1.3, top_k=12, top_p=0.8)


def _prefixes(model, variables, b=5, seed=0):
  states, mask = _captions(np.random.default_rng(seed), b)
  prefix = model.apply(variables, states, mask, method="prefix")
  return prefix, model.apply(variables, method="unconditional_prefix")


def test_cached_prefix_sampling_equals_full_recompute(text_model):
  model, variables = text_model
  prefix, null = _prefixes(model, variables)
  params = variables["params"]["transformer"]
  kw = dict(SAMPLE_KW, rng=jax.random.PRNGKey(0), uncond_prefix=null)
  cached = np.asarray(sampling.sample_from_prefix(model.transformer, params, prefix, **kw))
  full = np.asarray(sampling.sample_from_prefix_full_recompute(model.transformer, params, prefix,
                                                               **kw))
  assert cached.shape == (5, NUM_TOKENS) and cached.dtype == np.int32
  assert cached.min() >= 0 and cached.max() < CODEBOOK
  np.testing.assert_array_equal(cached, full)
  other = sampling.sample_from_prefix(model.transformer, params, prefix,
                                      **dict(kw, rng=jax.random.PRNGKey(7)))
  assert (np.asarray(other) != cached).mean() > 0.3
  with pytest.raises(ValueError, match="uncond_prefix"):
    sampling.sample_from_prefix(model.transformer, params, prefix, **dict(kw, uncond_prefix=None))
  if model.transformer.flavour == "gpt2":  # (the same for llama: compile time saved)
    # Each sample depends on its index only, not on the batch it was drawn in.
    second = sampling.sample_from_prefix(model.transformer, params, prefix[2:], example_offset=2,
                                         **kw)
    np.testing.assert_array_equal(second, cached[2:])
    # Decoding in 3 loops over a growing cache after the prefix: the same tokens.
    np.testing.assert_array_equal(
        sampling.sample_from_prefix(model.transformer, params, prefix, cache_segments=3, **kw),
        full)
    # Without guidance no unconditional rows are needed.
    no_cfg = dict(kw, cfg_scale=None, uncond_prefix=None)
    np.testing.assert_array_equal(
        sampling.sample_from_prefix(model.transformer, params, prefix, **no_cfg),
        sampling.sample_from_prefix_full_recompute(model.transformer, params, prefix, **no_cfg))



def written_out_greedy_guidance(model, variables, states, mask, num_tokens, cfg_scale=1.75):
  """Greedy guided decoding written out with the model's teacher-forced forward: cond and uncond
  (dropped caption) logits of the tokens so far, (1 - s) uncond + s cond in NumPy, argmax."""
  b = states.shape[0]
  fwd = jax.jit(lambda t, d: model.apply(variables, states, mask, t, d))
  tokens = np.zeros((b, num_tokens), np.int32)
  for i in range(num_tokens):
    c = np.asarray(fwd(tokens, jnp.zeros(b, bool)), np.float64)[:, i]
    u = np.asarray(fwd(tokens, jnp.ones(b, bool)), np.float64)[:, i]
    tokens[:, i] = np.argmax((1 - cfg_scale) * u + cfg_scale * c, -1)
  return tokens


def test_greedy_prefix_sampling_matches_written_out_guidance(text_model):
  model, variables = text_model
  states, mask = _captions(np.random.default_rng(3), 3)
  tokens = written_out_greedy_guidance(model, variables, states, mask, NUM_TOKENS)
  prefix = model.apply(variables, states, mask, method="prefix")
  null = model.apply(variables, method="unconditional_prefix")
  got = sampling.sample_from_prefix(model.transformer, variables["params"]["transformer"], prefix,
                                    uncond_prefix=null, rng=jax.random.PRNGKey(0),
                                    **dict(SAMPLE_KW, temperature=0.0))
  np.testing.assert_array_equal(got, tokens)


# ------------------------------------------------------------------------------ text encoder

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  random_clip_workdir(str(root / "clip"), scale=0.2)
  # Batch 64: the runlocal Cluster config's own.
  train_tiny_cluster_tokenizer(root / "tokenizer", patch_size=8, width=16, batch=64)
  return {"clip": str(root / "clip"), "tokenizer": str(root / "tokenizer"), "root": root}


def test_in_the_box_text_states(workdirs):
  """Per-token states: the tower's pooled output is the state at each caption's <eos>; the mask
  covers the words and <eos>; causal: a caption's states do not depend on what follows it."""
  from vqkd_jax.teachers import in_the_box_captions as captions
  from vqkd_jax.teachers.in_the_box_clip import ContrastiveImageText
  from vqkd_jax.teachers.text_encoders import load_text_encoder
  from vqkd_jax.train.teacher_clip import load_clip

  enc = load_text_encoder(ml_collections.ConfigDict(dict(kind="in_the_box",
                                                         workdir=workdirs["clip"])))
  texts = ["a large red triangle at the top left", "a cross in the centre", "a blue square"]
  ids, mask = enc.tokenize(texts)
  assert ids.shape == mask.shape == (3, 12) and enc.context_length == 12 and enc.dim == 64
  np.testing.assert_array_equal(mask.sum(1), [9, 6, 4])
  states = np.asarray(jax.jit(enc.encode)(enc.variables, ids, mask))
  assert states.shape == (3, 12, 64) and states.dtype == np.float32
  clip, variables = load_clip(workdirs["clip"])
  pooled = jax.jit(lambda v, x: clip.apply(v, x, method=lambda m, x: m.text(x)))(variables, ids)
  eos = np.argmax(ids == captions.EOS_ID, axis=1)
  np.testing.assert_allclose(states[np.arange(3), eos], pooled, atol=1e-5)
  proj = jax.jit(lambda v, x: clip.apply(v, x, method=ContrastiveImageText.encode_text))(
      variables, ids)
  np.testing.assert_allclose(states[np.arange(3), eos] @ np.asarray(
      variables["params"]["text_proj"]["kernel"]), proj, atol=1e-4)
  shorter = enc.tokenize(["a cross"])[0]
  np.testing.assert_allclose(np.asarray(jax.jit(enc.encode)(enc.variables, shorter, None))[0, :2],
                             states[1, :2], atol=1e-5)


# ------------------------------------------------------------------------------ stage

def _config(workdirs, steps=3):
  from vqkd_jax.config import load_config

  c = load_config("configs/demo/t2i.py:runlocal")
  with c.unlocked():
    c.tokenizer_workdir = workdirs["tokenizer"]
    c.text_encoder.workdir = workdirs["clip"]
    c.data.synthetic = True
    c.batch_size = 16
    c.total_steps = c.checkpoint_every = c.eval_every = steps
    c.model.width, c.model.depth = 32, 1
    c.sampling.num_samples = 4
  return c


@pytest.mark.slow  # 55 s; the demo fixture (tests/test_demo.py) trains T2I stages and samples them
def test_stage_trains_through_the_loop_and_samples_with_cfg(workdirs, tmp_path):
  import dataclasses

  from vqkd_jax.train import loop
  from vqkd_jax.train.objective import EvalContext
  from vqkd_jax.train.t2i import ShapesCaptions, load_t2i, sample_images, write_samples

  c = _config(workdirs)
  result = loop.train(c, str(tmp_path))
  assert result.steps_run == 3
  train_logs = [h for h in result.history if "loss" in h]
  assert train_logs and all(np.isfinite(h["loss"]) for h in train_logs)
  evals = [h for h in result.history if "eval/perplexity" in h][-1]
  assert 1 < evals["eval/perplexity"] < 64 and 1 < evals["eval/perplexity_null_caption"] < 64
  lines = (tmp_path / "samples_3.txt").read_text().splitlines()
  assert len(lines) == 4 and all(line.startswith("a ") for line in lines)
  assert np.load(tmp_path / "samples_3.npy").shape == (4, 4, 4)   # no decoder: codes
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["stage"] == "t2i"

  model, variables, info = load_t2i(str(tmp_path))
  enc = info["text_encoder"]
  assert info["grid"] == (4, 4) and info["codebook_size"] == 32 and enc.kind == "in_the_box"
  ids, mask = enc.tokenize(["a red circle on the left", "a large blue cross", "a green square",
                            "a small red triangle at the bottom right"])
  codes = sample_images(model, variables, enc, enc.variables, ids, mask, rng=jax.random.PRNGKey(0),
                        cfg_scale=1.75)
  assert codes.shape == (4, 16) and codes.dtype == jnp.int32 and int(codes.max()) < 32

  # With a tokenizer that decodes (here: each code -> a grey level), the grid and captions.
  tokenizer = dataclasses.replace(
      info["tokenizer"], decode=lambda v, idx: jnp.repeat(jnp.repeat(
          (idx * 8).astype(jnp.uint8)[..., None], 8, 1), 8, 2).repeat(3, -1))
  ctx = EvalContext(step=7, params=None, model_state={}, frozen=None, workdir=str(tmp_path),
                    mesh=None)
  write_samples(c, model, variables, enc, enc.variables, ShapesCaptions(enc), tokenizer, (4, 4),
                ctx)
  grid = np.asarray(Image.open(tmp_path / "samples_7.png"))
  assert grid.shape == ((2 * (32 + 2) + 2), 4 * (32 + 2) + 2, 3)
  assert len((tmp_path / "samples_7.txt").read_text().splitlines()) == 4

