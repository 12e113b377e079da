"""Hugging Face image-understanding teachers as Flax `VisionTransformer`s, loaded without PyTorch.

kind    checkpoint (config model_type)                     tokens [B, N, C]
clip    CLIPModel / CLIPVisionModel(WithProjection)        post_layernorm -> visual_projection (512 for
        (clip, clip_vision_model)                          ViT-B/16); with_projection=False: the
                                                           post-LN width (768), as upstream's Cluster
vit     ViTModel / ViTForImageClassification (vit)         final layernorm (google/vit-*)
dino    the same ViT checkpoints (facebook/dino-vitb16)    final layernorm
mae     ViTMAEModel / ViTMAEForPreTraining (vit_mae)       final layernorm; no masking or shuffling, the
                                                           checkpoint's fixed 2-D sin-cos positions
dinov2  Dinov2Model, Dinov2WithRegistersModel              final layernorm; class and register tokens
siglip  SiglipModel / SiglipVisionModel                    post_layernorm (no class token; the
                                                           attention-pool head is not used)

Every family's weights live under a prefix that depends on the class that saved them
("vision_model.", "vit.", "dinov2." or none); the first that holds the patch embedding is used, and
the keys of the parts the tokens do not need (text towers, poolers, heads, MAE decoder, mask tokens)
are ignored by name. Anything else that does not fit is an error (hf_checkpoint.assign_params).
Preprocessing: the folder's preprocessor_config.json mean/std when present, else the family's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from vqkd_jax.teachers import hf_checkpoint as ckpt
from vqkd_jax.teachers.hf_vit import VisionTransformer, preprocess

HF_KINDS = ("clip", "vit", "dino", "mae", "dinov2", "siglip")

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "vit": ("vit",), "dino": ("vit",),
                "mae": ("vit_mae",), "dinov2": ("dinov2", "dinov2_with_registers"),
                "siglip": ("siglip", "siglip_vision_model")}
_DEFAULT_NORM = {"clip": (CLIP_MEAN, CLIP_STD), "vit": (HALF, HALF),
                 "dino": (IMAGENET_MEAN, IMAGENET_STD), "mae": (IMAGENET_MEAN, IMAGENET_STD),
                 "dinov2": (IMAGENET_MEAN, IMAGENET_STD), "siglip": (HALF, HALF)}
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


@dataclasses.dataclass
class HFTeacher:
  """A loaded teacher: `tokens(params, images_uint8)` -> float32 [B, N, dim] patch tokens."""
  model: VisionTransformer
  params: dict
  mean: tuple
  std: tuple
  image_size: int | None
  dim: int
  abstract: Any  # Boxed abstract params: logical axis names for sharding (nn.get_partition_spec).

  def tokens(self, params, images_uint8: jax.Array) -> jax.Array:
    x = preprocess(images_uint8, self.mean, self.std, self.image_size)
    return self.model.apply({"params": params}, x).astype(jnp.float32)


def load_hf_teacher(kind: str, path: str, image_size: int | None = None,
                    with_projection: bool = True, dtype=jnp.float32) -> HFTeacher:
  """Reads the checkpoint folder (or hub id) `path` as teacher `kind` (one of HF_KINDS).

  image_size: the side the teacher sees (images of another size are resized bicubically; its position
    embeddings are interpolated when it differs from the checkpoint's); None: the checkpoint's.
  with_projection: CLIP only, apply visual_projection. dtype: compute dtype (parameters float32).
  """
  if kind not in HF_KINDS:
    raise ValueError(f"Hugging Face teacher kind {kind!r}: one of {HF_KINDS}")
  folder = ckpt.resolve_checkpoint(path)
  config = ckpt.read_config(folder)
  model_type = config.get("model_type")
  if model_type is not None and model_type not in _MODEL_TYPES[kind]:
    raise ValueError(f"teacher kind {kind!r} reads {_MODEL_TYPES[kind]} checkpoints; {folder} holds "
                     f"model_type {model_type!r}")
  weights = ckpt.read_weights(folder)
  build = _clip if kind == "clip" else _siglip if kind == "siglip" else _vit_like
  kwargs, sources, ignore, hint, ckpt_size = build(kind, config, weights, with_projection)
  model = VisionTransformer(**kwargs, dtype=dtype)
  size = image_size or ckpt_size
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  try:
    params = ckpt.assign_params(abstract["params"], sources, weights, ignore, hint)
  except ckpt.CheckpointMismatchError as e:
    raise ckpt.CheckpointMismatchError(f"teacher kind {kind!r} from {folder}: {e}") from None
  mean, std = _normalization(kind, folder)
  return HFTeacher(model=model, params=params, mean=mean, std=std, image_size=size,
                   dim=kwargs.get("proj_dim") or kwargs["width"], abstract=abstract["params"])


def _normalization(kind: str, folder) -> tuple[tuple, tuple]:
  pre = ckpt.read_json(folder, ckpt.PREPROCESSOR) or {}
  mean, std = _DEFAULT_NORM[kind]
  return tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))


# ---------------------------------------------------------------------------------------------------
# Key maps: Flax path -> (checkpoint key, transform from the PyTorch layout)


def _dense_t(w):
  return w.T


def _conv_t(w):  # [out, in, kh, kw] -> [kh, kw, in, out]
  return w.transpose(2, 3, 1, 0)


def _same(w):
  return w


def _tokens(w):  # [D] | [1, D] | [L, D] | [1, L, D] -> [1, L, D]
  return w.reshape(1, -1, w.shape[-1])


def _block_sources(i: int, names: dict, heads: int, layer_scale: bool) -> dict:
  """Block i's parameters. names: part -> checkpoint module name with "{i}" (parts q, k, v, o,
  norm1, norm2, fc1, fc2, and scale1, scale2 for layer scales, which are full key names)."""
  blk = (f"block{i}",)
  key = lambda part, leaf: names[part].format(i=i) + leaf
  qkv_w = lambda w: w.T.reshape(w.shape[1], heads, -1)  # [H*hd, D] -> [D, H, hd]
  qkv_b = lambda b: b.reshape(heads, -1)
  out_w = lambda w: w.T.reshape(heads, -1, w.shape[0])  # [D, H*hd] -> [H, hd, D]
  out = {}
  for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
    out[blk + ("attn", ours, "kernel")] = (key(theirs, ".weight"), qkv_w)
    out[blk + ("attn", ours, "bias")] = (key(theirs, ".bias"), qkv_b)
  out[blk + ("attn", "out", "kernel")] = (key("o", ".weight"), out_w)
  out[blk + ("attn", "out", "bias")] = (key("o", ".bias"), _same)
  for norm in ("norm1", "norm2"):
    out[blk + (norm, "scale")] = (key(norm, ".weight"), _same)
    out[blk + (norm, "bias")] = (key(norm, ".bias"), _same)
  for fc in ("fc1", "fc2"):
    out[blk + ("mlp", fc, "kernel")] = (key(fc, ".weight"), _dense_t)
    out[blk + ("mlp", fc, "bias")] = (key(fc, ".bias"), _same)
  if layer_scale:
    out[blk + ("scale1",)] = (key("scale1", ""), _same)
    out[blk + ("scale2",)] = (key("scale2", ""), _same)
  return out


def _clip_layer_names(pre: str) -> dict:
  """CLIP and SigLIP encoder layers."""
  layer = pre + "encoder.layers.{i}."
  return dict(q=layer + "self_attn.q_proj", k=layer + "self_attn.k_proj",
              v=layer + "self_attn.v_proj", o=layer + "self_attn.out_proj",
              norm1=layer + "layer_norm1", norm2=layer + "layer_norm2", fc1=layer + "mlp.fc1",
              fc2=layer + "mlp.fc2")


def _norm_sources(ours: str, theirs: str) -> dict:
  return {(ours, "scale"): (theirs + ".weight", _same), (ours, "bias"): (theirs + ".bias", _same)}


def _activation(config: dict, default: str) -> str:
  act = config.get("hidden_act", default)
  if act not in _ACTIVATIONS:
    raise NotImplementedError(f"hidden_act {act!r} is not ported ({sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[act]


def _clip(kind, config, weights, with_projection):
  """CLIP vision tower (+ visual_projection); OpenAI's layout: pre_layrnorm, quick_gelu."""
  vc = config.get("vision_config", config)
  proj_dim = config.get("projection_dim", vc.get("projection_dim", 512))
  heads, depth = vc.get("num_attention_heads", 12), vc.get("num_hidden_layers", 12)
  image_size, patch_size = vc.get("image_size", 224), vc.get("patch_size", 32)
  pre = ckpt.select_prefix(weights, ("vision_model.", ""), "embeddings.patch_embedding.weight")
  kwargs = dict(patch_size=patch_size, width=vc.get("hidden_size", 768), depth=depth,
                num_heads=heads, mlp_dim=vc.get("intermediate_size", 3072),
                grid=image_size // patch_size, activation=_activation(vc, "quick_gelu"),
                layer_norm_eps=vc.get("layer_norm_eps", 1e-5), patch_bias=False, pre_norm=True,
                proj_dim=proj_dim if with_projection else 0)
  sources = {
      ("patch_embed", "kernel"): (pre + "embeddings.patch_embedding.weight", _conv_t),
      ("pos_embed",): (pre + "embeddings.position_embedding.weight", _tokens),
      ("cls_token",): (pre + "embeddings.class_embedding", _tokens),
      **_norm_sources("pre_norm", pre + "pre_layrnorm"),
      **_norm_sources("norm", pre + "post_layernorm"),
  }
  for i in range(depth):
    sources.update(_block_sources(i, _clip_layer_names(pre), heads, False))
  if with_projection:
    sources[("proj", "kernel")] = ("visual_projection.weight", _dense_t)
  ignore = [r"text_model\.", r"text_projection\.", r"logit_scale$", r".*position_ids$"]
  if not with_projection:
    ignore.append(r"visual_projection\.")
  hint = ("(A CLIPVisionModel file has no visual_projection: with_projection=False gives the "
          "post-LN tokens.)" if with_projection and "visual_projection.weight" not in weights else "")
  return kwargs, sources, ignore, hint, image_size


def _siglip(kind, config, weights, with_projection):
  """SigLIP vision tower: no class token, tanh GELU, post_layernorm on every token."""
  vc = config.get("vision_config", config)
  heads, depth = vc.get("num_attention_heads", 12), vc.get("num_hidden_layers", 12)
  image_size, patch_size = vc.get("image_size", 224), vc.get("patch_size", 16)
  pre = ckpt.select_prefix(weights, ("vision_model.", ""), "embeddings.patch_embedding.weight")
  kwargs = dict(patch_size=patch_size, width=vc.get("hidden_size", 768), depth=depth,
                num_heads=heads, mlp_dim=vc.get("intermediate_size", 3072),
                grid=image_size // patch_size, activation=_activation(vc, "gelu_pytorch_tanh"),
                layer_norm_eps=vc.get("layer_norm_eps", 1e-6), class_token=False)
  sources = {
      ("patch_embed", "kernel"): (pre + "embeddings.patch_embedding.weight", _conv_t),
      ("patch_embed", "bias"): (pre + "embeddings.patch_embedding.bias", _same),
      ("pos_embed",): (pre + "embeddings.position_embedding.weight", _tokens),
      **_norm_sources("norm", pre + "post_layernorm"),
  }
  for i in range(depth):
    sources.update(_block_sources(i, _clip_layer_names(pre), heads, False))
  ignore = [r"text_model\.", r"logit_scale$", r"logit_bias$", r".*position_ids$",
            r"(vision_model\.)?head\."]
  return kwargs, sources, ignore, "", image_size


def _vit_like(kind, config, weights, with_projection):
  """ViT / DINO / MAE encoder / DINOv2 (legacy hub names: encoder.layer.{i}.attention.attention.*)."""
  dinov2 = kind == "dinov2"
  heads, depth = config.get("num_attention_heads", 12), config.get("num_hidden_layers", 12)
  width = config.get("hidden_size", 768)
  if not config.get("qkv_bias", True):
    raise NotImplementedError("checkpoints with qkv_bias=False are not ported")
  if config.get("use_swiglu_ffn", False):
    raise NotImplementedError("DINOv2 with a SwiGLU MLP (giant) is not ported")
  with_registers = config.get("model_type") == "dinov2_with_registers"  # transformers' defaults:
  image_size = config.get("image_size", 224)
  patch_size = config.get("patch_size", 14 if kind == "dinov2" and not with_registers else 16)
  mlp_dim = int(width * config.get("mlp_ratio", 4)) if dinov2 else config.get(
      "intermediate_size", 3072)
  registers = config.get("num_register_tokens", 4) if with_registers else 0
  kwargs = dict(patch_size=patch_size, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                grid=image_size // patch_size, activation=_activation(config, "gelu"),
                layer_norm_eps=config.get("layer_norm_eps", 1e-6 if dinov2 else 1e-12),
                layer_scale=dinov2, num_registers=registers,
                pos_antialias=with_registers)
  pre = ckpt.select_prefix(weights, ("dinov2.", "") if dinov2 else ("vit.", ""),
                           "embeddings.patch_embeddings.projection.weight")
  emb = pre + "embeddings."
  sources = {
      ("patch_embed", "kernel"): (emb + "patch_embeddings.projection.weight", _conv_t),
      ("patch_embed", "bias"): (emb + "patch_embeddings.projection.bias", _same),
      ("pos_embed",): (emb + "position_embeddings", _tokens),
      ("cls_token",): (emb + "cls_token", _tokens),
      **_norm_sources("norm", pre + "layernorm"),
  }
  if registers:
    sources[("registers",)] = (emb + "register_tokens", _tokens)
  layer = pre + "encoder.layer.{i}."
  names = dict(q=layer + "attention.attention.query", k=layer + "attention.attention.key",
               v=layer + "attention.attention.value", o=layer + "attention.output.dense")
  if dinov2:
    names.update(norm1=layer + "norm1", norm2=layer + "norm2", fc1=layer + "mlp.fc1",
                 fc2=layer + "mlp.fc2", scale1=layer + "layer_scale1.lambda1",
                 scale2=layer + "layer_scale2.lambda1")
  else:
    names.update(norm1=layer + "layernorm_before", norm2=layer + "layernorm_after",
                 fc1=layer + "intermediate.dense", fc2=layer + "output.dense")
  for i in range(depth):
    sources.update(_block_sources(i, names, heads, dinov2))
  ignore = [r"(vit\.|dinov2\.)?pooler\.", r"classifier\.", r"decoder\.",
            r"(vit\.|dinov2\.)?embeddings\.mask_token$"]
  return kwargs, sources, ignore, "", image_size
