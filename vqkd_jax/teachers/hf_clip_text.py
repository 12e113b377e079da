"""The text tower of Hugging Face CLIP checkpoints as a Flax module, loaded without PyTorch.

Architecture (transformers' CLIPTextModel): token + learned position embeddings; pre-LN blocks
with causal self-attention (and the padding mask when given, as transformers combines them) and a
quick_gelu MLP (config hidden_act); a final LayerNorm. Outputs the per-token states after the final
LayerNorm (last_hidden_state), the pooled state at the end-of-text token (pooler_output) and, when
the checkpoint has text_projection (CLIPModel, CLIPTextModelWithProjection), its projection
(text_embeds).

Pooling follows transformers: with config eos_token_id == 2 (configs older than transformers PR
24773) the position of the largest id of each row, otherwise the first position whose id is
eos_token_id.

Weights: config.json (CLIPConfig with a text_config, or CLIPTextConfig) and model.safetensors or
flax_model.msgpack (teachers/hf_checkpoint.py), keys with or without the "text_model." prefix;
every parameter's key and shape is checked and everything else in the file must be a known unused
part (the vision tower, logit_scale, position_ids), one error naming all that does not fit. The
tokenizer comes from the same folder through transformers' CLIPTokenizer (no torch needed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqkd_jax.nn.attention import MultiHeadAttention, dense_init
from vqkd_jax.nn.vit import layer_norm
from vqkd_jax.teachers import hf_checkpoint as ckpt
from vqkd_jax.teachers.hf_vit import FeedForward

Dtype = Any

# CLIPTextConfig's defaults (transformers 5), for fields a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}


class TextBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x), mask), then x + MLP(LN(x)); [B, L, D] -> [B, L, D]."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = layer_norm("norm1", self.dtype, eps=self.layer_norm_eps)(x)
    x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, implementation="xla",
                               name="attn")(h, mask)
    h = layer_norm("norm2", self.dtype, eps=self.layer_norm_eps)(x)
    return x + FeedForward(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(h)


class CLIPTextTransformer(nn.Module):
  """Token ids int [B, L] (L <= context_length), optional padding mask [B, L] (1 = token) ->
  {"tokens": [B, L, width] after the final LayerNorm, "pooled": [B, width] at the end-of-text
  token, "projected": [B, proj_dim] (only when proj_dim > 0)}, all float32.

  Attributes: vocab_size, context_length (max_position_embeddings), width, depth, num_heads,
  mlp_dim, activation ("quick_gelu" | "gelu" | "gelu_tanh"), layer_norm_eps, eos_token_id (pooling
  rule, see the module docstring), proj_dim (bias-free text_projection; 0 = none), dtype.
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  proj_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict:
    b, length = ids.shape
    if length > self.context_length:
      raise ValueError(f"{length} tokens, the text tower takes at most {self.context_length}")
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                 embedding_init=nn.with_logical_partitioning(dense_init(), ("vocab", "embed")))(ids)
    pos = self.param("pos_embed", nn.with_logical_partitioning(dense_init(0.01), (None, "embed")),
                     (self.context_length, self.width))
    x = x + pos[:length].astype(x.dtype)
    attend = jnp.tril(jnp.ones((length, length), bool))[None, None]          # [1, 1, L, L]
    if mask is not None:
      attend = attend & mask.astype(bool)[:, None, None, :]
    for i in range(self.depth):
      x = TextBlock(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                    self.dtype, name=f"block{i}")(x, attend)
    x = layer_norm("norm", self.dtype, eps=self.layer_norm_eps)(x).astype(jnp.float32)
    if self.eos_token_id == 2:
      eos = jnp.argmax(ids, axis=1)
    else:
      eos = jnp.argmax(ids == self.eos_token_id, axis=1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    out = {"tokens": x, "pooled": pooled}
    if self.proj_dim:
      out["projected"] = nn.Dense(
          self.proj_dim, use_bias=False, dtype=self.dtype, name="proj",
          kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "mlp")))(
              pooled).astype(jnp.float32)
    return out


@dataclasses.dataclass
class HFClipText:
  """A loaded CLIP text tower: `model.apply({"params": params}, ids, mask)` and the folder's
  tokenizer: `tokenize(captions)` -> (ids int32 [B, L], mask bool [B, L]): start token, BPE
  tokens, end token, padded to the context length L and cut to it (the end token kept); None
  when loaded without."""
  model: CLIPTextTransformer
  params: dict
  tokenize: Any
  folder: str


def text_config(config: dict) -> dict:
  """The text tower's fields of a CLIPConfig ("text_config", projection_dim at the top level) or
  CLIPTextConfig dict, CLIPTextConfig defaults filling the gaps."""
  if config.get("model_type") not in (None, "clip", "clip_text_model"):
    raise ValueError(f"a CLIP text tower needs a clip or clip_text_model checkpoint, got "
                     f"model_type {config.get('model_type')!r}")
  tc = dict(config.get("text_config") or config)
  if "text_config" in config and "projection_dim" in config:
    tc.setdefault("projection_dim", config["projection_dim"])
  return {k: tc.get(k, v) if tc.get(k) is not None else v for k, v in TEXT_DEFAULTS.items()}


def _sources(depth: int, heads: int, pre: str, with_projection: bool) -> dict:
  from vqkd_jax.teachers.hf_teachers import _block_sources, _clip_layer_names, _norm_sources

  same = lambda w: w
  sources = {("token_embed", "embedding"): (pre + "embeddings.token_embedding.weight", same),
             ("pos_embed",): (pre + "embeddings.position_embedding.weight", same),
             **_norm_sources("norm", pre + "final_layer_norm")}
  for i in range(depth):
    sources.update(_block_sources(i, _clip_layer_names(pre), heads, False))
  if with_projection:
    sources[("proj", "kernel")] = ("text_projection.weight", lambda w: w.T)
  return sources


def load_hf_clip_text(path: str, dtype=jnp.float32, with_projection: bool | None = None,
                      tokenizer: bool = True) -> HFClipText:
  """Reads the CLIP text tower of the checkpoint folder (or hub id) `path`.

  with_projection: None = when the file has text_projection.weight; True requires it.
  tokenizer: load the folder's tokenizer (transformers' CLIPTokenizer)."""
  folder = ckpt.resolve_checkpoint(path)
  cfg = text_config(ckpt.read_config(folder))
  weights = ckpt.read_weights(folder)
  pre = ckpt.select_prefix(weights, ("text_model.", ""), "embeddings.token_embedding.weight")
  has_proj = "text_projection.weight" in weights
  if with_projection is None:
    with_projection = has_proj
  act = cfg["hidden_act"]
  if act not in _ACTIVATIONS:
    raise NotImplementedError(f"hidden_act {act!r} is not ported ({sorted(_ACTIVATIONS)})")
  model = CLIPTextTransformer(
      vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"],
      width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
      activation=_ACTIVATIONS[act], layer_norm_eps=cfg["layer_norm_eps"],
      eos_token_id=cfg["eos_token_id"], proj_dim=cfg["projection_dim"] if with_projection else 0,
      dtype=dtype)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  ignore = [r"vision_model\.", r"visual_projection\.", r"logit_scale$", r".*position_ids$"]
  if not with_projection:
    ignore.append(r"text_projection\.")
  hint = ("(A CLIPTextModel file has no text_projection: load with with_projection=None/False.)"
          if with_projection and not has_proj else "")
  try:
    params = ckpt.assign_params(abstract["params"],
                                _sources(model.depth, model.num_heads, pre, with_projection),
                                weights, ignore, hint)
  except ckpt.CheckpointMismatchError as e:
    raise ckpt.CheckpointMismatchError(f"CLIP text tower from {folder}: {e}") from None
  tok = None
  if tokenizer:
    from vqkd_jax.teachers.text_encoders import CaptionTokenizer
    tok = CaptionTokenizer("hf_clip", str(folder), model.context_length, model.vocab_size)
    tok(["a"])  # Loads it now: a folder without tokenizer files fails here.
  return HFClipText(model=model, params=params, tokenize=tok, folder=str(folder))


def load_clip_tokenizer(folder, vocab_size: int):
  """transformers' CLIPTokenizer from the folder's tokenizer.json (or vocab.json + merges.txt).
  (transformers 5 builds an empty tokenizer from a folder without these files: checked here.)"""
  import pathlib

  folder = pathlib.Path(folder)
  if not ((folder / "tokenizer.json").exists()
          or ((folder / "vocab.json").exists() and (folder / "merges.txt").exists())):
    raise FileNotFoundError(f"{folder} has no CLIP tokenizer: tokenizer.json, or vocab.json + "
                            f"merges.txt (with `hf download`, fetch them beside the weights)")
  from transformers import CLIPTokenizer

  tok = CLIPTokenizer.from_pretrained(str(folder))
  if len(tok) > vocab_size:
    raise ValueError(f"the tokenizer in {folder} has {len(tok)} tokens, the text tower's "
                     f"embedding {vocab_size}")
  return tok


def load_hf_clip_text_encoder(path: str, precision: str = "float32"):
  """teachers/text_encoders.FrozenTextEncoder of kind "hf_clip": per-token states [B, L, width]
  after the final LayerNorm, L = the checkpoint's context length (77 for OpenAI CLIP)."""
  from vqkd_jax.teachers.text_encoders import FrozenTextEncoder
  from vqkd_jax.train.common import compute_dtype

  hf = load_hf_clip_text(path, compute_dtype(precision), with_projection=False)

  def encode(variables, ids, mask):
    return hf.model.apply(variables, ids, mask)["tokens"]

  return FrozenTextEncoder(kind="hf_clip", variables={"params": hf.params}, encode=encode,
                           tokenize=hf.tokenize, dim=hf.model.width,
                           context_length=hf.model.context_length)
