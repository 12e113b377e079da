"""Hugging Face teachers (vqkd_jax/teachers/hf_*.py) against the transformers PyTorch models.

Each family: a tiny random PyTorch model saved with save_pretrained (safetensors), loaded without
torch by our loader, patch tokens compared with the torch model's (post-LN / projection as upstream
uses them) at the checkpoint's size and at a larger one (position embeddings interpolated), relative
error <= 1e-4 in float32. Also: a transformers-Flax msgpack written here from the safetensors file,
bfloat16 files, the bicubic matrices against F.interpolate, and (no torch: these run in CI) the one
error that names missing / unexpected / mis-shaped keys, the offline hub-id error, logical axis names.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqkd_jax.teachers import hf_checkpoint, hf_vit
from vqkd_jax.teachers.hf_teachers import load_hf_teacher
from vqkd_jax.teachers.load import load_teacher
from torch_reference import perturbed  # tests/ is on sys.path (conftest)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8)
TOL = 1e-4


def uint8_images(size, b=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3)).astype(np.uint8)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def our_tokens(teacher, images):
  """Our tokens at the images' own size (no resize; positions interpolated when needed)."""
  x = hf_vit.preprocess(jnp.asarray(images), teacher.mean, teacher.std, None)
  return np.asarray(jax.jit(teacher.model.apply)({"params": teacher.params}, x), np.float32)


# ---------------------------------------------------------------------------------- torch helpers


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")   # torchvision's import workaround: tests/conftest.py
  pytest.importorskip("transformers")
  torch.manual_seed(0)
  return torch


def pixels(torch, images, mean, std):
  """Independent normalisation: NCHW float32 ((x / 255) - mean) / std."""
  x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0
  return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def save(model, path):
  model.save_pretrained(path)
  return str(path)


# ---------------------------------------------------------------------------------- per family


@pytest.mark.parametrize("variant", ["clip_model", "vision_no_prefix", "vision_no_projection"])
def test_clip_tokens_match_torch(torch, tmp_path, variant):
  import transformers as tr
  vision = dict(TINY)
  if variant == "clip_model":  # The hub's layout: vision_model.* + visual_projection + text tower.
    model = tr.CLIPModel(tr.CLIPConfig(
        vision_config=vision, projection_dim=16,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)))
  elif variant == "vision_no_prefix":  # CLIPVisionModel: no prefix, no projection.
    model = tr.CLIPVisionModel(tr.CLIPVisionConfig(**vision))
  else:
    model = tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(projection_dim=16, **vision))
  model = perturbed(torch, model)
  path = save(model, tmp_path / variant)
  with_projection = variant == "clip_model"
  if variant == "vision_no_prefix":
    with pytest.raises(hf_checkpoint.CheckpointMismatchError, match="with_projection=False"):
      load_hf_teacher("clip", path)
  teacher = load_hf_teacher("clip", path, with_projection=with_projection)
  assert teacher.dim == (16 if with_projection else 32)
  tower = getattr(model, "vision_model", model)  # CLIPVisionModel is the tower itself.
  for size in (32, 48):
    images = uint8_images(size)
    with torch.no_grad():
      h = tower(pixels(torch, images, teacher.mean, teacher.std),
                interpolate_pos_encoding=size != 32).last_hidden_state
      ref = tower.post_layernorm(h[:, 1:])  # Upstream: ln_post on every patch token, then proj.
      if with_projection:
        ref = model.visual_projection(ref)
    assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL, size


def test_clip_msgpack_layout_matches_torch(torch, tmp_path):
  """A transformers-Flax `flax_model.msgpack` (nested, kernels [in, out], conv HWIO, LayerNorm
  `scale`, Embed `embedding`), written here from the saved safetensors file."""
  import transformers as tr
  from flax.serialization import msgpack_serialize
  from safetensors.numpy import load_file
  model = perturbed(torch, tr.CLIPModel(tr.CLIPConfig(
      vision_config=dict(TINY), projection_dim=16,
      text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64))))
  src = save(model, tmp_path / "pt")
  tree = {}
  for key, w in load_file(f"{src}/model.safetensors").items():
    *parents, leaf = key.split(".")
    if leaf == "weight":
      if w.ndim == 4:
        leaf, w = "kernel", np.einsum("oihw->hwio", w)
      elif "norm" in parents[-1] or "layrnorm" in parents[-1]:
        leaf = "scale"
      elif parents[-1].endswith("_embedding"):
        leaf = "embedding"
      else:
        leaf, w = "kernel", np.einsum("oi->io", w)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(w)
  assert tree["vision_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape
  folder = tmp_path / "flax"
  folder.mkdir()
  (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
  (folder / "config.json").write_text((tmp_path / "pt" / "config.json").read_text())
  teacher = load_hf_teacher("clip", str(folder))
  images = uint8_images(32)
  with torch.no_grad():
    h = model.vision_model(pixels(torch, images, teacher.mean, teacher.std)).last_hidden_state
    ref = model.visual_projection(model.vision_model.post_layernorm(h[:, 1:]))
  assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL


@pytest.mark.parametrize("kind", ["vit", "dino"])
def test_vit_tokens_match_torch(torch, tmp_path, kind):
  """ViTModel (with its pooler, ignored); "dino" reads the same class with ImageNet mean/std."""
  import transformers as tr
  model = perturbed(torch, tr.ViTModel(tr.ViTConfig(**TINY, layer_norm_eps=1e-6)))
  teacher = load_hf_teacher(kind, save(model, tmp_path / kind))
  assert teacher.mean == ((0.5,) * 3 if kind == "vit" else (0.485, 0.456, 0.406))
  for size in (32, 48):
    images = uint8_images(size)
    with torch.no_grad():
      ref = model(pixels(torch, images, teacher.mean, teacher.std),
                  interpolate_pos_encoding=size != 32).last_hidden_state[:, 1:]
    assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL, size


def test_mae_encoder_matches_torch(torch, tmp_path):
  """ViTMAEForPreTraining's file (vit.* + decoder.*): the encoder without masking, the checkpoint's
  sin-cos positions; torch run with mask_ratio 0 and increasing noise (no shuffle)."""
  import transformers as tr
  model = perturbed(torch, tr.ViTMAEForPreTraining(tr.ViTMAEConfig(
      **TINY, mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=32)))
  teacher = load_hf_teacher("mae", save(model, tmp_path / "mae"))
  for size in (32, 48):
    images = uint8_images(size)
    n = (size // 8) ** 2
    with torch.no_grad():
      ref = model.vit(pixels(torch, images, teacher.mean, teacher.std),
                      noise=torch.arange(n).float().expand(2, n),
                      interpolate_pos_encoding=size != 32).last_hidden_state[:, 1:]
    assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL, size


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2_tokens_match_torch(torch, tmp_path, registers):
  """Layer scales; register tokens dropped; positions resized (with antialiasing with registers)
  for inputs larger and smaller than the checkpoint's."""
  import transformers as tr
  kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
            image_size=40, patch_size=8)
  if registers:
    model = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(
        **kw, num_register_tokens=registers))
  else:
    model = tr.Dinov2Model(tr.Dinov2Config(**kw))
  model = perturbed(torch, model)
  teacher = load_hf_teacher("dinov2", save(model, tmp_path / "dinov2"))
  for size in (40, 56, 24):
    images = uint8_images(size)
    with torch.no_grad():
      out = model(pixels(torch, images, teacher.mean, teacher.std)).last_hidden_state
    assert rel_err(our_tokens(teacher, images), out[:, 1 + registers:].numpy()) < TOL, size


def test_siglip_tokens_match_torch(torch, tmp_path):
  """SigLIP: no class token, every token post-LN (the attention-pool head is ignored)."""
  import transformers as tr
  model = perturbed(torch, tr.SiglipVisionModel(tr.SiglipVisionConfig(**TINY)))
  teacher = load_hf_teacher("siglip", save(model, tmp_path / "siglip"))
  for size in (32, 48):
    images = uint8_images(size)
    with torch.no_grad():
      ref = model(pixels(torch, images, teacher.mean, teacher.std),
                  interpolate_pos_encoding=size != 32).last_hidden_state
    assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL, size


# ---------------------------------------------------------------------------------- loading paths


def test_load_teacher_resizes_input_and_runs_bf16(torch, tmp_path):
  """load_teacher(kind="dino", image_size=48) on 40x40 images: bicubic resize 40 -> 48 (torch
  F.interpolate reference), positions 4x4 -> 6x6; dim = token width; bfloat16 compute close."""
  import transformers as tr
  model = perturbed(torch, tr.ViTModel(tr.ViTConfig(**TINY, layer_norm_eps=1e-6)))
  path = save(model, tmp_path / "dino")
  cfg = ml_collections.ConfigDict(dict(kind="dino", path=path, image_size=48))
  teacher = load_teacher(cfg, "float32")
  assert teacher.dim == 32
  images = uint8_images(40)
  ours = np.asarray(jax.jit(teacher.tokens)(teacher.variables, jnp.asarray(images)))
  x = pixels(torch, images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  with torch.no_grad():
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False)
    ref = model(x, interpolate_pos_encoding=True).last_hidden_state[:, 1:].numpy()
  assert ours.dtype == np.float32 and ours.shape == (2, 36, 32)
  assert rel_err(ours, ref) < TOL
  bf16 = load_teacher(cfg, "bfloat16")
  assert rel_err(jax.jit(bf16.tokens)(bf16.variables, jnp.asarray(images)), ref) < 3e-2


def test_bfloat16_safetensors(torch, tmp_path):
  """A file saved in bfloat16 (which safetensors.numpy cannot read) gives float32 parameters."""
  import transformers as tr
  model = perturbed(torch, tr.SiglipVisionModel(tr.SiglipVisionConfig(**TINY)))
  path = save(model.to(torch.bfloat16), tmp_path / "bf16")
  teacher = load_hf_teacher("siglip", path)
  model = model.float()
  assert jax.tree.leaves(teacher.params)[0].dtype == np.float32
  images = uint8_images(32)
  with torch.no_grad():
    ref = model(pixels(torch, images, teacher.mean, teacher.std)).last_hidden_state
  assert rel_err(our_tokens(teacher, images), ref.numpy()) < TOL


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrices_match_torch_interpolate(torch, antialias):
  """Position-embedding resize (and the image resize) = F.interpolate(bicubic, align_corners=False,
  size=...), up and down, with and without antialias; non-square grids too."""
  rng = np.random.default_rng(0)
  for (gh, gw), (nh, nw) in [((4, 4), (6, 6)), ((14, 14), (16, 16)), ((37, 37), (16, 16)),
                             ((16, 16), (14, 14)), ((5, 7), (9, 4))]:
    grid = rng.normal(size=(1, 3, gh, gw)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(grid), size=(nh, nw), mode="bicubic",
                                          align_corners=False, antialias=antialias).numpy()
    pos = grid.transpose(0, 2, 3, 1).reshape(1, gh * gw, 3)
    ours = np.asarray(jax.jit(hf_vit.resize_pos_embed, static_argnums=(1, 2, 3))(
        jnp.asarray(pos), (gh, gw), (nh, nw), antialias))
    ref = ref.transpose(0, 2, 3, 1).reshape(1, nh * nw, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"{(gh, gw)} -> {(nh, nw)}")


# ---------------------------------------------------------------------------------- no torch (CI)


def tiny_vit_folder(path, drop=(), extra=None, reshape=None):
  """A 1-layer ViT checkpoint written by hand (legacy hub names) with numpy + safetensors."""
  from safetensors.numpy import save_file
  d, f = 8, 16
  shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.position_embeddings": (1, 5, d),
            "embeddings.patch_embeddings.projection.weight": (d, 3, 4, 4),
            "embeddings.patch_embeddings.projection.bias": (d,),
            "layernorm.weight": (d,), "layernorm.bias": (d,),
            "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
  layer = "encoder.layer.0."
  for name in ("attention.attention.query", "attention.attention.key",
               "attention.attention.value", "attention.output.dense"):
    shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (d, d), (d,)
  shapes[layer + "intermediate.dense.weight"], shapes[layer + "intermediate.dense.bias"] = (f, d), (f,)
  shapes[layer + "output.dense.weight"], shapes[layer + "output.dense.bias"] = (d, f), (d,)
  for name in ("layernorm_before", "layernorm_after"):
    shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (d,), (d,)
  shapes.update(reshape or {})
  shapes.update(extra or {})
  rng = np.random.default_rng(0)
  weights = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items() if k not in drop}
  path.mkdir()
  save_file(weights, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(dict(
      model_type="vit", hidden_size=d, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=f, image_size=8, patch_size=4, layer_norm_eps=1e-6)))
  return str(path)


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
  good = load_hf_teacher("vit", tiny_vit_folder(tmp_path / "good"))
  assert good.dim == 8
  assert good.tokens(good.params, jnp.zeros((1, 8, 8, 3), jnp.uint8)).shape == (1, 4, 8)
  bad = tiny_vit_folder(tmp_path / "bad", drop=("encoder.layer.0.attention.attention.key.bias",),
                        extra={"encoder.layer.0.adapter.weight": (8, 8)},
                        reshape={"encoder.layer.0.intermediate.dense.weight": (16, 9)})
  with pytest.raises(hf_checkpoint.CheckpointMismatchError) as err:
    load_hf_teacher("vit", bad)
  msg = str(err.value)
  assert "1 missing" in msg and "encoder.layer.0.attention.attention.key.bias" in msg
  assert "1 unexpected" in msg and "encoder.layer.0.adapter.weight" in msg
  assert "1 wrong shape" in msg and "encoder.layer.0.intermediate.dense.weight" in msg
  assert "pooler" not in msg  # Known unused parts are ignored.
  with pytest.raises(ValueError, match="model_type 'vit'"):
    load_hf_teacher("clip", tiny_vit_folder(tmp_path / "other"))


def test_missing_folder_and_offline_hub_id_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_teacher("clip", str(tmp_path / "nowhere"))
  try:
    import huggingface_hub
  except ImportError:
    huggingface_hub = None
  if huggingface_hub is not None:
    def offline(*args, **kwargs):
      raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="pass the local folder"):
    load_hf_teacher("clip", "openai/clip-vit-base-patch16")


def test_parameters_carry_logical_axis_names():
  model = hf_vit.VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
                                   grid=2, num_registers=2, pre_norm=True, layer_scale=True,
                                   proj_dim=8)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  specs = nn.get_partition_spec(abstract)["params"]
  vocab = {"embed", "mlp", "heads", "kv", "conv_in", "conv_out", "norm", "patch", None}
  for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
    assert isinstance(spec, jax.sharding.PartitionSpec) and set(spec) <= vocab, spec
  assert specs["block0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "heads", "kv")
  assert specs["proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
