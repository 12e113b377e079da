"""The gpt2 flavour of ARTransformer initialised from a Hugging Face GPT-2 checkpoint folder.

Upstream (§5.2) starts its AR prior from text-pretrained GPT-2 medium
(`GPT2LMHeadModel.from_pretrained` then `resize_token_embeddings(9193)`). Here a local folder with
config.json and model.safetensors (read with safetensors.numpy by teachers/hf_checkpoint.py, no
torch) is mapped onto the model's parameters by a pure function of the loaded arrays:

  wte [V_ckpt, D]            -> token_embed/embedding: the first V rows (as resize_token_embeddings
                                keeps them); when V > V_ckpt the rows past V_ckpt keep the model's
                                own initial values (truncated normal, std 0.02; HF draws N(0, 0.02))
  wpe [n_positions, D]       -> pos_embed: the first seq_len rows
  h.i.ln_1 / ln_2            -> block{i}/norm1 / norm2 (scale, bias)
  h.i.attn.c_attn [D, 3D]    -> block{i}/attn/query, key, value ([D, heads, head_dim]); HF GPT-2's
                                Conv1D weights are [in, out], so no transpose
  h.i.attn.c_proj [D, D]     -> block{i}/attn/out ([heads, head_dim, D])
  h.i.mlp.c_fc / c_proj      -> block{i}/fc1 / fc2
  ln_f                       -> norm_out
  output head                -> tied (tie_embeddings=True, as upstream): nothing more to load;
                                untied: head/kernel starts as the checkpoint's output head, the
                                (resized) wte transposed (or lm_head.weight when the file holds an
                                untied one), and then trains on its own.

Keys may carry the `transformer.` prefix (GPT2LMHeadModel.save_pretrained) or not (the hub's
gpt2-medium file); the causal-mask buffers `h.i.attn.bias` / `masked_bias` are ignored. Every other
key must be used, and every parameter found with its shape: one CheckpointMismatchError names all
missing, unexpected and mis-shaped keys. The architecture (width, depth, heads, MLP size, LayerNorm
epsilon, activation, attention scaling, number of positions) must match the model's:
`check_gpt2_config` raises one ValueError naming every difference.
"""

from __future__ import annotations

import pathlib

import numpy as np
from flax import traverse_util

from vqkd_jax.proposal.ar import ARTransformer
from vqkd_jax.teachers import hf_checkpoint

# transformers' names of the tanh-approximated GELU that the gpt2 flavour computes.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$",)


def _folder(path: str) -> pathlib.Path:
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"GPT-2 checkpoint folder {str(path)!r} does not exist (it needs "
                            f"{hf_checkpoint.CONFIG} and {hf_checkpoint.SAFETENSORS})")
  return folder


def read_gpt2_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {key: array}) of a local Hugging Face GPT-2 folder."""
  folder = _folder(path)
  return hf_checkpoint.read_config(folder), hf_checkpoint.read_weights(folder)


def check_gpt2_config(hf_config: dict, model: ARTransformer) -> None:
  """Raises one ValueError naming every architecture field of the checkpoint's config.json that
  does not fit `model` (a gpt2-flavour ARTransformer)."""
  if model.flavour != "gpt2":
    raise ValueError(f"a GPT-2 checkpoint initialises the gpt2 flavour, not {model.flavour!r}")
  if hf_config.get("model_type", "gpt2") != "gpt2":
    raise ValueError(f"checkpoint model_type {hf_config.get('model_type')!r} is not gpt2")
  width = hf_config.get("n_embd")
  inner = hf_config.get("n_inner") or 4 * (width or 0)
  wrong = []
  for name, theirs, ours in (("n_embd (width)", width, model.width),
                             ("n_layer (depth)", hf_config.get("n_layer"), model.depth),
                             ("n_head (num_heads)", hf_config.get("n_head"), model.num_heads),
                             ("n_inner (MLP hidden)", inner, model.mlp_hidden())):
    if theirs != ours:
      wrong.append(f"{name}: checkpoint {theirs}, model {ours}")
  eps = hf_config.get("layer_norm_epsilon", 1e-5)
  if not np.isclose(eps, model.norm_eps, rtol=1e-6, atol=0):
    wrong.append(f"layer_norm_epsilon: checkpoint {eps}, model norm_eps {model.norm_eps}")
  act = hf_config.get("activation_function", "gelu_new")
  if act not in _GELU_TANH:
    wrong.append(f"activation_function: checkpoint {act!r}, model computes gelu_new")
  if not hf_config.get("scale_attn_weights", True):
    wrong.append("scale_attn_weights: checkpoint False, model scales scores by head_dim^-0.5")
  if hf_config.get("scale_attn_by_inverse_layer_idx", False):
    wrong.append("scale_attn_by_inverse_layer_idx: checkpoint True, model does not")
  positions = hf_config.get("n_positions")
  if positions is not None and positions < model.seq_len:
    wrong.append(f"n_positions: checkpoint {positions} < the model's seq_len {model.seq_len}")
  if wrong:
    raise ValueError("the GPT-2 checkpoint's architecture does not fit the model:\n  "
                     + "\n  ".join(wrong))


def params_from_gpt2(weights: dict[str, np.ndarray], hf_config: dict, model: ARTransformer,
                     init_params) -> dict:
  """The model's parameters (nested float32 NumPy arrays, the structure of `init_params`) from a
  GPT-2 checkpoint's `weights` ({key: array} as read_gpt2_checkpoint gives). `init_params`: the
  model's freshly initialised parameters (unboxed), read for the shapes and for the embedding rows
  (and untied head columns) past the checkpoint's vocabulary. Raises ValueError
  (check_gpt2_config) or hf_checkpoint.CheckpointMismatchError."""
  check_gpt2_config(hf_config, model)
  d, h, v = model.width, model.num_heads, model.vocab_size
  hd = d // h
  init = traverse_util.flatten_dict(init_params)
  p = hf_checkpoint.select_prefix(weights, ("transformer.", ""), "wte.weight")
  vocab_rows = lambda w, new: np.concatenate([w[:v], new[w.shape[0]:]]) if w.shape[0] < v else w[:v]
  embed_init = np.asarray(init[("token_embed", "embedding")])

  sources = {
      ("token_embed", "embedding"): (p + "wte.weight", lambda w: vocab_rows(w, embed_init)),
      ("pos_embed",): (p + "wpe.weight", lambda w: w[:model.seq_len]),
      ("norm_out", "scale"): (p + "ln_f.weight", lambda w: w),
      ("norm_out", "bias"): (p + "ln_f.bias", lambda w: w),
  }
  for i in range(model.depth):
    b, k = f"block{i}", f"{p}h.{i}."
    for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
      sources[(b, ours, "scale")] = (k + theirs + ".weight", lambda w: w)
      sources[(b, ours, "bias")] = (k + theirs + ".bias", lambda w: w)
    for j, name in enumerate(("query", "key", "value")):
      part = lambda w, j=j: np.split(w, 3, axis=-1)[j]   # c_attn: [D, 3D] = [q | k | v]
      sources[(b, "attn", name, "kernel")] = (k + "attn.c_attn.weight",
                                              lambda w, part=part: part(w).reshape(d, h, hd))
      sources[(b, "attn", name, "bias")] = (k + "attn.c_attn.bias",
                                            lambda w, part=part: part(w).reshape(h, hd))
    sources[(b, "attn", "out", "kernel")] = (k + "attn.c_proj.weight",
                                             lambda w: w.reshape(h, hd, d))
    sources[(b, "attn", "out", "bias")] = (k + "attn.c_proj.bias", lambda w: w)
    for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
      sources[(b, ours, "kernel")] = (k + f"mlp.{theirs}.weight", lambda w: w)
      sources[(b, ours, "bias")] = (k + f"mlp.{theirs}.bias", lambda w: w)

  ignore = list(_IGNORED)
  wte = weights.get(p + "wte.weight")
  lm_head = weights.get("lm_head.weight")
  untied_file = lm_head is not None and (wte is None or lm_head.shape != wte.shape
                                         or not np.array_equal(lm_head, wte))
  if model.tie_embeddings:
    if untied_file:
      raise hf_checkpoint.CheckpointMismatchError(
          "the checkpoint's lm_head.weight differs from its wte.weight (an untied head) but the "
          "model ties its head to the token embedding: set tie_embeddings=False")
    ignore.append(r"lm_head\.weight$")   # GPT-2's tied copy of wte, when the file holds it
  else:
    head_init = np.asarray(init[("head", "kernel")]).T          # [V, D]
    key = "lm_head.weight" if untied_file else p + "wte.weight"
    if not untied_file:
      ignore.append(r"lm_head\.weight$")
    sources[("head", "kernel")] = (key, lambda w: vocab_rows(w, head_init).T)
  hint = ("GPT-2 checkpoints initialise the gpt2 flavour of the same width, depth and heads "
          "(config.model), e.g. gpt2-medium: width 1024, depth 24, num_heads 16")
  loaded = hf_checkpoint.assign_params(init_params, sources, weights, ignore=ignore, hint=hint)
  return _like(init_params, loaded)


def _like(reference, tree):
  """`tree` (nested dicts) in the container types of `reference` (dicts or FrozenDicts)."""
  if isinstance(reference, dict):
    return {k: _like(reference[k], tree[k]) for k in reference}
  if hasattr(reference, "items") and not hasattr(reference, "shape"):
    return type(reference)({k: _like(reference[k], tree[k]) for k in reference})
  return tree


def gpt2_initializer(path: str, model: ARTransformer):
  """Checks the folder's config.json against `model` now; returns `init_params -> params`, which
  reads the weights (only then, so that they are not held for the whole run) and applies the pure
  function params_from_gpt2 (for Objective.init_params)."""
  folder = _folder(path)
  hf_config = hf_checkpoint.read_config(folder)
  check_gpt2_config(hf_config, model)
  return lambda init_params: params_from_gpt2(hf_checkpoint.read_weights(folder), hf_config, model,
                                              init_params)
