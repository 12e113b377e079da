"""The Hugging Face CLIP text tower (teachers/hf_clip_text.py) against transformers' PyTorch
CLIPTextModel / CLIPTextModelWithProjection / CLIPModel: tiny random checkpoints saved with
save_pretrained (safetensors; one rewritten without the "text_model." prefix; one written as a
transformers-Flax msgpack), per-token states (padding mask included), pooled end-of-text state and
projection within 1e-4 relative error in float32, both pooling rules (eos_token_id 2 / real).
Without torch (CI): the tokenizer from a folder against hand-worked BPE ids, the one error naming
missing / unexpected / mis-shaped keys, and the "hf_clip" text encoder on a numpy-written file."""

import json
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqkd_jax.teachers import hf_checkpoint
from vqkd_jax.teachers.hf_clip_text import load_hf_clip_text
from vqkd_jax.teachers.text_encoders import text_tokenizer
from torch_reference import perturbed  # tests/ is on sys.path (conftest)

TOL = 1e-4
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16, projection_dim=24)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>"]
CAPTIONS = ["a cat on the mat", "the cat", "a red circle on the left of the mat"]


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def tiny_vocab() -> dict:
  """CLIP's BPE layout in small: letters, letters ending a word ("</w>"), the merges' results,
  then <|startoftext|> and <|endoftext|> (the largest ids, as OpenAI's)."""
  words = list(LETTERS) + [c + "</w>" for c in LETTERS] + [m.replace(" ", "") for m in MERGES]
  words += ["<|startoftext|>", "<|endoftext|>"]
  return {w: i for i, w in enumerate(words)}


VOCAB = tiny_vocab()
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]


def write_tokenizer(folder):
  """A CLIPTokenizer folder (tokenizer.json) built from a vocab.json / merges.txt written here."""
  tr = pytest.importorskip("transformers")
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(VOCAB))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  tr.CLIPTokenizer(vocab=str(folder / "vocab.json"),
                   merges=str(folder / "merges.txt")).save_pretrained(str(folder))


def clip_text_keys(d=32, depth=1, mlp=64, positions=16, vocab=len(VOCAB), proj=24,
                   prefix="text_model."):
  """{key: shape} of a CLIPTextModelWithProjection file (legacy hub names)."""
  keys = {prefix + "embeddings.token_embedding.weight": (vocab, d),
          prefix + "embeddings.position_embedding.weight": (positions, d),
          prefix + "embeddings.position_ids": (1, positions),
          prefix + "final_layer_norm.weight": (d,), prefix + "final_layer_norm.bias": (d,)}
  for i in range(depth):
    layer = f"{prefix}encoder.layers.{i}."
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
      keys[layer + f"self_attn.{p}.weight"], keys[layer + f"self_attn.{p}.bias"] = (d, d), (d,)
    for n in ("layer_norm1", "layer_norm2"):
      keys[layer + f"{n}.weight"], keys[layer + f"{n}.bias"] = (d,), (d,)
    keys[layer + "mlp.fc1.weight"], keys[layer + "mlp.fc1.bias"] = (mlp, d), (mlp,)
    keys[layer + "mlp.fc2.weight"], keys[layer + "mlp.fc2.bias"] = (d, mlp), (d,)
  if proj:
    keys["text_projection.weight"] = (proj, d)
  return keys


def numpy_clip_text_folder(folder, drop=(), extra=None, reshape=None, tokenizer=True, seed=0):
  """A CLIPTextModelWithProjection-shaped folder written with NumPy only (random weights)."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  shapes = {**clip_text_keys(), **(extra or {}), **(reshape or {})}
  weights = {}
  for k, s in shapes.items():
    if k in drop:
      continue
    if k.endswith("position_ids"):
      weights[k] = np.arange(s[1], dtype=np.int64)[None]
    else:
      base = 1.0 if "norm" in k and k.endswith(".weight") else 0.0   # LayerNorm scales near 1
      weights[k] = (base + 0.2 * rng.standard_normal(s)).astype(np.float32)
  save_file(weights, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(dict(
      model_type="clip_text_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=16, projection_dim=24, vocab_size=len(VOCAB),
      eos_token_id=EOS, bos_token_id=BOS, pad_token_id=EOS)))
  if tokenizer:
    write_tokenizer(folder)
  return str(folder)


# ---------------------------------------------------------------------------------- no torch


def test_tokenizer_from_the_folder_against_hand_worked_ids(tmp_path):
  path = numpy_clip_text_folder(tmp_path / "clip")
  hf = load_hf_clip_text(path)
  ids, mask = hf.tokenize(["a cat on the mat", "The CAT"])
  v = VOCAB
  want0 = [BOS, v["a</w>"], v["cat</w>"], v["on</w>"], v["the</w>"], v["m"], v["a"], v["t</w>"],
           EOS]
  want1 = [BOS, v["the</w>"], v["cat</w>"], EOS]
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids[0, :9], want0)
  np.testing.assert_array_equal(ids[1, :4], want1)
  np.testing.assert_array_equal(mask.sum(1), [9, 4])
  assert (ids[1, 4:] == EOS).all()                     # padded with <|endoftext|>, mask says so
  long_ids, long_mask = hf.tokenize(["the cat " * 20])
  assert long_mask.all() and long_ids[0, -1] == EOS and long_ids[0, 0] == BOS   # cut, end kept
  # The input pipelines' tokenizer: from the configuration files, picklable (grain workers).
  tok = text_tokenizer(ml_collections.ConfigDict(dict(kind="hf_clip", path=path)))
  tok = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(tok(["a cat on the mat", "The CAT"])[0], ids)


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
  pre = "text_model.encoder.layers.0."
  bad = numpy_clip_text_folder(tmp_path / "bad", drop=(pre + "self_attn.k_proj.bias",),
                               extra={pre + "adapter.weight": (8, 8)},
                               reshape={pre + "mlp.fc1.weight": (63, 32)}, tokenizer=False)
  with pytest.raises(hf_checkpoint.CheckpointMismatchError) as err:
    load_hf_clip_text(bad, tokenizer=False)
  msg = str(err.value)
  assert "1 missing" in msg and pre + "self_attn.k_proj.bias" in msg
  assert "1 unexpected" in msg and pre + "adapter.weight" in msg
  assert "1 wrong shape" in msg and pre + "mlp.fc1.weight" in msg
  assert "position_ids" not in msg                     # known unused keys are ignored
  no_proj = numpy_clip_text_folder(tmp_path / "np", drop=("text_projection.weight",),
                                   tokenizer=False)
  assert load_hf_clip_text(no_proj, tokenizer=False).model.proj_dim == 0
  with pytest.raises(hf_checkpoint.CheckpointMismatchError, match="text_projection"):
    load_hf_clip_text(no_proj, with_projection=True, tokenizer=False)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    load_hf_clip_text(no_proj)


def test_hf_clip_text_encoder(tmp_path):
  from vqkd_jax.teachers.text_encoders import load_text_encoder
  path = numpy_clip_text_folder(tmp_path / "clip")
  enc = load_text_encoder(ml_collections.ConfigDict(dict(kind="hf_clip", path=path)))
  assert enc.kind == "hf_clip" and enc.dim == 32 and enc.context_length == 16
  ids, mask = enc.tokenize(CAPTIONS)
  states = np.asarray(jax.jit(enc.encode)(enc.variables, ids, mask))
  hf = load_hf_clip_text(path)
  out = hf.model.apply({"params": hf.params}, ids, mask)
  np.testing.assert_allclose(states, out["tokens"], atol=1e-6)
  # The pooled state is the state at each caption's <|endoftext|>; causal: a caption's states do
  # not depend on the tokens after it.
  eos = mask.sum(1) - 1
  np.testing.assert_allclose(out["pooled"], states[np.arange(3), eos], atol=1e-6)
  short, short_mask = enc.tokenize(["the cat"])
  np.testing.assert_allclose(np.asarray(enc.encode(enc.variables, short, short_mask))[0, :3],
                             states[1, :3], atol=1e-5)
  with pytest.raises(ValueError, match="unknown text encoder kind"):
    load_text_encoder(ml_collections.ConfigDict(dict(kind="t5")))


# ---------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")   # torchvision's import workaround: tests/conftest.py
  pytest.importorskip("transformers")
  torch.manual_seed(0)
  return torch


def _strip_prefix(folder, prefix="text_model."):
  from safetensors.numpy import load_file, save_file
  f = folder / "model.safetensors"
  weights = load_file(str(f))
  save_file({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()},
            str(f))


def _torch_outputs(torch, model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)))
  proj = out.text_embeds.numpy() if hasattr(out, "text_embeds") else None
  pooled = getattr(out, "pooler_output", None)
  return out.last_hidden_state.numpy(), None if pooled is None else pooled.numpy(), proj


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["with_projection", "text_model", "clip_model", "no_prefix",
                                     "legacy_eos"])
def test_text_tower_matches_torch(torch, tmp_path, variant):
  import transformers as tr
  folder = tmp_path / variant
  eos = 2 if variant == "legacy_eos" else EOS
  config = tr.CLIPTextConfig(vocab_size=len(VOCAB), eos_token_id=eos, bos_token_id=BOS,
                             pad_token_id=EOS, **TEXT)
  if variant == "clip_model":
    model = tr.CLIPModel(tr.CLIPConfig(
        text_config=config.to_dict(), projection_dim=TEXT["projection_dim"],
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=16, patch_size=8)))
  elif variant == "text_model":
    model = tr.CLIPTextModel(config)
  else:
    model = tr.CLIPTextModelWithProjection(config)
  model = perturbed(torch, model)
  model.save_pretrained(str(folder))
  write_tokenizer(folder)
  if variant == "no_prefix":
    _strip_prefix(folder)
  hf = load_hf_clip_text(str(folder))
  assert hf.model.proj_dim == (0 if variant == "text_model" else TEXT["projection_dim"])
  ids, mask = hf.tokenize(CAPTIONS)
  ours = jax.jit(hf.model.apply)({"params": hf.params}, jnp.asarray(ids), jnp.asarray(mask))
  if variant == "clip_model":
    tower = model.text_model
    with torch.no_grad():
      proj = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                     attention_mask=torch.from_numpy(mask.astype(np.int64)))
    proj = getattr(proj, "pooler_output", proj).numpy()
    hidden, pooled, _ = _torch_outputs(torch, tower, ids, mask)
  elif variant == "text_model":
    hidden, pooled, proj = _torch_outputs(torch, model, ids, mask)
  else:
    hidden, _, proj = _torch_outputs(torch, model, ids, mask)
    _, pooled, _ = _torch_outputs(torch, model.text_model, ids, mask)
  assert rel_err(ours["tokens"], hidden) < TOL          # every position, padding included
  assert rel_err(ours["pooled"], pooled) < TOL
  if proj is not None:
    assert rel_err(ours["projected"], proj) < TOL


@pytest.mark.torch
def test_msgpack_layout_matches_torch(torch, tmp_path):
  """A transformers-Flax `flax_model.msgpack` (nested, kernels [in, out], LayerNorm `scale`, Embed
  `embedding`), written here from the saved safetensors file."""
  import transformers as tr
  from flax.serialization import msgpack_serialize
  from safetensors.numpy import load_file
  model = perturbed(torch, tr.CLIPTextModelWithProjection(tr.CLIPTextConfig(
      vocab_size=len(VOCAB), eos_token_id=EOS, bos_token_id=BOS, pad_token_id=EOS, **TEXT)))
  model.save_pretrained(str(tmp_path / "pt"))
  tree = {}
  for key, w in load_file(str(tmp_path / "pt" / "model.safetensors")).items():
    *parents, leaf = key.split(".")
    if leaf == "weight":
      if "norm" in parents[-1]:
        leaf = "scale"
      elif parents[-1].endswith("_embedding"):
        leaf = "embedding"
      else:
        leaf, w = "kernel", np.einsum("oi->io", w)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(w)
  folder = tmp_path / "flax"
  write_tokenizer(folder)
  (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
  (folder / "config.json").write_text((tmp_path / "pt" / "config.json").read_text())
  hf = load_hf_clip_text(str(folder))
  ids, mask = hf.tokenize(CAPTIONS)
  ours = hf.model.apply({"params": hf.params}, jnp.asarray(ids), jnp.asarray(mask))
  hidden, _, proj = _torch_outputs(torch, model, ids, mask)
  assert rel_err(ours["tokens"], hidden) < TOL and rel_err(ours["projected"], proj) < TOL


def test_built_in_captions_through_the_hf_tokenizer_into_the_t2i_prefix(tmp_path):
  """The t2i stage with text_encoder.kind "hf_clip" on the built-in data: the grammar's captions
  tokenised by the folder's BPE tokenizer, encoded, projected to a prefix of the checkpoint's
  context length (16 here)."""
  from vqkd_jax.data import shapes
  from vqkd_jax.proposal.ar import ARTransformer
  from vqkd_jax.proposal.t2i import TextConditionedAR
  from vqkd_jax.teachers.text_encoders import load_text_encoder
  from vqkd_jax.train.t2i import ShapesCaptions

  enc = load_text_encoder(ml_collections.ConfigDict(dict(
      kind="hf_clip", path=numpy_clip_text_folder(tmp_path / "clip"))))
  captions = ShapesCaptions(enc)
  out = shapes.render_batch(0, "validation", range(6), 32)
  ids, mask = captions.ids({"label": jnp.asarray(out["label"]),
                            "segmentation": jnp.asarray(out["segmentation"])})
  want_ids, want_mask = enc.tokenize(captions.texts(out))
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert ids.shape == (6, 16) and (np.asarray(ids)[:, 0] == BOS).all()
  model = TextConditionedAR(ARTransformer(vocab_size=32, seq_len=16 + 4, width=24, depth=1,
                                          num_heads=2), enc.context_length)
  states = jax.jit(enc.encode)(enc.variables, ids, mask)
  tokens = jnp.zeros((6, 4), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), states, mask, tokens)
  logits = jax.jit(model.apply)(variables, states, mask, tokens)
  assert logits.shape == (6, 4, 32) and np.isfinite(np.asarray(logits)).all()
  assert nn.unbox(variables)["params"]["null_prefix"].shape == (16, 24)
