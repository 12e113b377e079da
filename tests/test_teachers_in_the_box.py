"""The in-the-box MAE, CLIP and DINO-style teachers: their pieces against closed-form NumPy, the
caption ids against the dataset's own captions, and each stage through the shared loop (`:runlocal`)
into load_teacher."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqkd_jax.config import load_config
from vqkd_jax.data import shapes
from vqkd_jax.teachers import in_the_box_captions as captions
from vqkd_jax.teachers import in_the_box_dino as dino
from vqkd_jax.teachers.in_the_box_clip import contrastive_loss, same_caption
from vqkd_jax.teachers.in_the_box_encoder import PatchViT, keep_to_visible
from vqkd_jax.teachers.in_the_box_mae import (masked_patch_loss, normalised_patches, num_visible,
                                              patchify, random_keep)
from vqkd_jax.teachers.load import load_teacher
from vqkd_jax.train import loop
from vqkd_jax.train.teacher_dino import random_resized_crops
from vqkd_jax.train.teacher_probe import patch_probe, token_similarity


# ------------------------------------------------------------------------------------------------
# CLIP: InfoNCE and captions


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _numpy_infonce(image, text, logit_scale, positives):
  """Direct computation: cosine logits, per-row and per-column cross-entropies to the targets
  spread over the positives; columns without a positive skipped."""
  image = image / np.linalg.norm(image, axis=1, keepdims=True)
  text = text / np.linalg.norm(text, axis=1, keepdims=True)
  logits = math.exp(logit_scale) * image @ text.T
  rows = [-(positives[b] / positives[b].sum()) @ _log_softmax(logits[b])
          for b in range(len(image))]
  cols = [-(positives[:, j] / positives[:, j].sum()) @ _log_softmax(logits[:, j])
          for j in range(len(text)) if positives[:, j].any()]
  return 0.5 * (np.mean(rows) + np.mean(cols))


def test_infonce_matches_numpy():
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
  # In-batch texts with repeated captions (rows 0, 3 and 1, 4 share theirs).
  ids = np.array([[3, 4, 1], [3, 5, 1], [6, 4, 1], [3, 4, 1], [3, 5, 1], [7, 7, 1]])
  positives = np.asarray(same_caption(jnp.asarray(ids)))
  assert positives.sum() == 6 + 4 and positives[0, 3] and not positives[0, 1]
  for pos in (positives, None):
    got, metrics = contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(2.3),
                                    None if pos is None else jnp.asarray(pos))
    want = _numpy_infonce(image, text, 2.3, np.eye(6) if pos is None else pos.astype(float))
    assert np.isclose(float(got), want, rtol=1e-5), (float(got), want)
    assert 0.0 <= float(metrics["image_to_text_accuracy"]) <= 1.0
  # A caption bank: 9 texts, one positive per image, some texts without an image.
  bank = rng.normal(size=(9, 8))
  pos = np.zeros((5, 9), bool)
  pos[np.arange(5), [0, 2, 2, 7, 8]] = True
  got, _ = contrastive_loss(jnp.asarray(image[:5]), jnp.asarray(bank), jnp.float32(1.0),
                            jnp.asarray(pos))
  assert np.isclose(float(got), _numpy_infonce(image[:5], bank, 1.0, pos.astype(float)), rtol=1e-5)


def test_caption_ids_match_the_datasets_captions():
  assert captions.vocabulary() == captions.VOCAB  # deterministic
  assert captions.VOCAB[:3] == ("<pad>", "<eos>", "<unk>") and len(set(captions.VOCAB)) == 22
  ids = captions.tokenize(["a large red triangle at the top left", "a cross in the centre"])
  words = lambda row: " ".join(captions.VOCAB[i] for i in row if i > captions.EOS_ID)
  assert words(ids[0]) == "a large red triangle at the top left"
  assert ids[0, 8] == captions.EOS_ID and (ids[0, 9:] == captions.PAD_ID).all()
  assert words(ids[1]) == "a cross in the centre" and ids[1, 5] == captions.EOS_ID
  with pytest.raises(ValueError, match="purple"):
    captions.tokenize("a purple circle")
  assert captions.tokenize("a purple circle", strict=False)[0, 1] == captions.UNK_ID
  # From label + segmentation (what the training loop has) vs the stored captions.
  out = shapes.render_batch(7, "validation", range(400), 32)
  derived = np.asarray(captions.caption_ids_from_annotation(out["label"], out["segmentation"]))
  stored = captions.tokenize(out["caption"])
  assert (derived == stored).all(axis=1).mean() > 0.9
  cells = np.array([shapes.parse_caption(c)[2] for c in out["caption"]])
  attrs = captions.attributes_from_annotation(out["label"], out["segmentation"])
  assert np.mean(np.asarray(attrs["cell"]) == cells) > 0.95
  # The table is indexed by caption_index, and a flip swaps left and right.
  table = captions.caption_table().reshape(-1, captions.CONTEXT_LENGTH)
  np.testing.assert_array_equal(table[np.asarray(captions.caption_index(attrs))], derived)
  flipped = captions.attributes_from_annotation(out["label"], out["segmentation"][:, :, ::-1])
  col = np.asarray(attrs["cell"]) % 3
  np.testing.assert_array_equal(np.asarray(flipped["cell"]) % 3, 2 - col)


# ------------------------------------------------------------------------------------------------
# MAE: masking and loss


def test_mae_masking_keeps_exactly_the_visible_patches_and_loss_counts_hidden_only():
  n, ratio = 64, 0.75
  k = num_visible(n, ratio)
  assert k == 16
  keep = np.asarray(random_keep(jax.random.PRNGKey(0), 5, n, k))
  assert keep.shape == (5, 16)
  for row in keep:
    assert len(set(row.tolist())) == 16 and row.min() >= 0 and row.max() < n
  visible = np.asarray(keep_to_visible(jnp.asarray(keep), n))
  want = np.zeros((5, n))
  for b, row in enumerate(keep):
    want[b, row] = 1
  np.testing.assert_array_equal(visible, want)
  # Loss: mean over hidden patches of the per-patch MSE; visible predictions do not count.
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(5, n, 12)), rng.normal(size=(5, n, 12))
  hidden = 1 - visible
  per_patch = ((pred - target) ** 2).mean(-1)
  want_loss = per_patch[hidden > 0].mean()
  got = float(masked_patch_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(hidden)))
  assert np.isclose(got, want_loss, rtol=1e-5)
  pred2 = np.where(visible[..., None] > 0, 100.0, pred)
  assert np.isclose(float(masked_patch_loss(jnp.asarray(pred2), jnp.asarray(target),
                                            jnp.asarray(hidden))), want_loss, rtol=1e-5)
  # Patches in raster order, pixels (row, col, channel); norm_pix per patch.
  images = rng.normal(size=(2, 8, 8, 3))
  p = np.asarray(patchify(jnp.asarray(images), 4))
  np.testing.assert_allclose(p[1, 3], images[1, 4:8, 4:8].reshape(-1), rtol=1e-6)
  q = p[1, 3]
  np.testing.assert_allclose(np.asarray(normalised_patches(jnp.asarray(p)))[1, 3],
                             (q - q.mean()) / np.sqrt(q.var() + 1e-6), rtol=1e-4, atol=1e-5)


def test_masked_encoder_sees_no_pixel_of_a_hidden_patch():
  model = PatchViT(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, conv_stem=True,
                   use_mask_token=True)
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  keep = jnp.asarray([[0, 5, 10, 15], [1, 2, 3, 4]])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, keep=keep)
  apply = jax.jit(model.apply)
  hidden_pixels = np.asarray(jax.image.resize(1 - keep_to_visible(keep, 16).reshape(2, 4, 4),
                                              (2, 16, 16), "nearest"))[..., None] > 0
  changed = np.where(hidden_pixels, rng.uniform(-1, 1, images.shape), images).astype(np.float32)
  for kw in ({"keep": keep}, {"mask": jnp.asarray(1 - keep_to_visible(keep, 16)) > 0}):
    a = apply(variables, images, **kw)
    b = apply(variables, changed, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    c = apply(variables, np.where(hidden_pixels, images, -images), **kw)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2  # visible pixels do count
  assert jax.eval_shape(model.apply, variables, images, keep=keep).shape == (2, 5, 16)
  assert jax.eval_shape(model.apply, variables, images).shape == (2, 17, 16)


# ------------------------------------------------------------------------------------------------
# DINO: centring, sharpening, EMA


def test_dino_centring_sharpening_and_ema_against_numpy():
  rng = np.random.default_rng(3)
  logits, center = rng.normal(size=(4, 3, 10)), rng.normal(size=10)
  got = np.asarray(dino.update_center(jnp.asarray(center), jnp.asarray(logits), 0.9))
  np.testing.assert_allclose(got, 0.9 * center + 0.1 * logits.reshape(-1, 10).mean(0), rtol=1e-5)
  p = np.asarray(dino.teacher_distribution(jnp.asarray(logits), jnp.asarray(center), 0.04))
  z = (logits - center) / 0.04
  want = np.exp(z - z.max(-1, keepdims=True))
  np.testing.assert_allclose(p, want / want.sum(-1, keepdims=True), rtol=1e-4, atol=1e-7)
  student = rng.normal(size=(4, 3, 10))
  ce = np.asarray(dino.cross_entropy(jnp.asarray(p), jnp.asarray(student), 0.1))
  log_q = np.stack([[_log_softmax(s / 0.1) for s in row] for row in student])
  np.testing.assert_allclose(ce, -(p * log_q).sum(-1), rtol=1e-4)
  teacher = {"a": rng.normal(size=(3, 2)), "b": {"c": rng.normal(size=4)}}
  params = {"a": rng.normal(size=(3, 2)), "b": {"c": rng.normal(size=4)}}
  new = dino.ema_update(jax.tree.map(jnp.asarray, teacher), jax.tree.map(jnp.asarray, params),
                        0.99)
  np.testing.assert_allclose(np.asarray(new["b"]["c"]),
                             0.99 * teacher["b"]["c"] + 0.01 * params["b"]["c"], rtol=1e-5)
  assert np.isclose(float(dino.ema_momentum(jnp.int32(0), 100, 0.99)), 0.99)
  assert np.isclose(float(dino.ema_momentum(jnp.int32(50), 100, 0.99)), 0.995)
  assert np.isclose(float(dino.ema_momentum(jnp.int32(100), 100, 0.99)), 1.0)


def test_full_crop_is_the_image_and_flip_mirrors():
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
  same = random_resized_crops(jax.random.PRNGKey(0), images, (1.0, 1.0), (1.0, 1.0), flip=False)
  np.testing.assert_allclose(np.asarray(same), np.asarray(images), atol=1e-5)
  views = np.asarray(random_resized_crops(jax.random.PRNGKey(1), images, (1.0, 1.0), (1.0, 1.0)))
  for v, im in zip(views, np.asarray(images)):
    assert np.allclose(v, im, atol=1e-5) or np.allclose(v, im[:, ::-1], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The probe


def test_probe_reads_labels_from_tokens_that_carry_them():
  rng = np.random.default_rng(5)
  labels = np.where(rng.uniform(size=(40, 16)) < 0.8, 12, rng.integers(0, 12, (40, 16)))
  informative = np.eye(13)[labels] * 3 + rng.normal(scale=0.3, size=(40, 16, 13))
  res = patch_probe(informative.astype(np.float32), labels, 13, background=12)
  assert res["probe_accuracy"] > 0.99 and res["probe_object_accuracy"] > 0.95
  noise = patch_probe(rng.normal(size=(40, 16, 13)).astype(np.float32), labels, 13, background=12)
  assert noise["probe_object_accuracy"] < 0.3
  assert np.isclose(res["probe_majority"], np.mean(labels[20:] == 12))
  tokens = np.ones((2, 5, 4)) + np.arange(4) * 0.0
  np.testing.assert_allclose(np.asarray(token_similarity(jnp.asarray(tokens))), [1.0, 1.0],
                             rtol=1e-6)
  ortho = np.eye(4)[None]  # 4 orthogonal tokens: similarity = 4 diagonal ones / 16
  assert np.isclose(float(token_similarity(jnp.asarray(ortho))[0]), 0.25)


# ------------------------------------------------------------------------------------------------
# The stages through the shared loop, then load_teacher


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _train(kind, data_dir, workdir):
  c = load_config(f"configs/demo/teacher_{kind}.py:runlocal")
  c.data.data_dir = data_dir
  c.total_steps = 4
  c.eval_every = c.checkpoint_every = 4
  return loop.train(c, workdir), c


def _check_history(result):
  assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)
  ev = [h for h in result.history if "eval/token_similarity" in h][-1]
  assert 0 < ev["eval/token_similarity"] <= 1
  assert 0 <= ev["eval/probe_object_accuracy"] <= 1
  assert 0.5 < ev["eval/probe_majority"] < 1
  return ev


def _teacher(kind, workdir):
  return load_teacher(ml_collections.ConfigDict(dict(kind=f"in_the_box_{kind}", workdir=workdir)))


IMAGES = np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.mark.slow  # 40 s; the full demo (tests/test_demo.py, slow) trains it
def test_mae_stage_trains_and_loads_as_teacher(data_dir, tmp_path):
  from vqkd_jax.teachers.in_the_box_mae import MaskedAutoencoder
  from vqkd_jax.train import teacher_mae

  result, config = _train("mae", data_dir, str(tmp_path))
  _check_history(result)
  teacher = _teacher("mae", str(tmp_path))
  tokens = np.asarray(jax.jit(teacher.tokens)(teacher.variables, IMAGES))
  assert teacher.dim == 96 and tokens.shape == (2, 64, 96) and np.isfinite(tokens).all()
  model = teacher_mae.build_model(config.model)
  full = jax.jit(lambda v, x: model.apply(v, x, method=MaskedAutoencoder.tokens))(
      {"params": result.state.params}, IMAGES / 127.5 - 1.0)
  np.testing.assert_allclose(tokens, np.asarray(full), atol=1e-5)
  with pytest.raises(ValueError, match="teacher_clip stage"):
    _teacher("clip", str(tmp_path))


@pytest.mark.slow  # 50 s; the demo fixture (tests/test_demo.py) trains it for VQ-KD and T2I
def test_clip_stage_trains_and_loads_as_teacher_and_text_tower(data_dir, tmp_path):
  from vqkd_jax.teachers.in_the_box_clip import ContrastiveImageText
  from vqkd_jax.train.teacher_clip import load_clip

  result, config = _train("clip", data_dir, str(tmp_path))
  ev = _check_history(result)
  assert 0 <= ev["eval/zero_shot_cell_accuracy"] <= 1
  teacher = _teacher("clip", str(tmp_path))
  tokens = np.asarray(jax.jit(teacher.tokens)(teacher.variables, IMAGES))
  assert teacher.dim == 96 and tokens.shape == (2, 64, 96) and np.isfinite(tokens).all()
  model, variables = load_clip(str(tmp_path))
  full = jax.jit(lambda v, x: model.apply(v, x, method=ContrastiveImageText.patch_tokens))(
      variables, IMAGES / 127.5 - 1.0)
  np.testing.assert_allclose(tokens, np.asarray(full), atol=1e-5)
  text = jax.jit(lambda v, ids: model.apply(v, ids, method=ContrastiveImageText.encode_text))(
      variables, jnp.asarray(captions.tokenize(["a red circle on the left"] * 2)))
  assert text.shape == (2, 96) and np.allclose(text[0], text[1])


@pytest.mark.slow  # 40 s; the full demo (tests/test_demo.py, slow) trains it
def test_dino_stage_trains_and_exports_the_ema_teacher(data_dir, tmp_path):
  from vqkd_jax.train import teacher_dino

  result, config = _train("dino", data_dir, str(tmp_path))
  _check_history(result)
  state = result.state.model_state
  assert int(state["dino_state"]["updates"]) == 4
  assert np.abs(np.asarray(state["dino_state"]["center_cls"])).max() > 0
  teacher = _teacher("dino", str(tmp_path))
  tokens = np.asarray(jax.jit(teacher.tokens)(teacher.variables, IMAGES))
  assert teacher.dim == 96 and tokens.shape == (2, 64, 96) and np.isfinite(tokens).all()
  model = teacher_dino.build_model(config.model)
  tokens_of = jax.jit(lambda params, x: teacher_dino.tokens_fn(model, params)(x))
  ema = np.asarray(tokens_of(state["ema_teacher"], IMAGES))
  student = np.asarray(tokens_of(result.state.params, IMAGES))
  np.testing.assert_allclose(tokens, ema, atol=1e-5)
  assert np.abs(tokens - student).max() > 1e-4  # the EMA teacher, not the student
  # One more after_update: teacher <- m * teacher + (1 - m) * student, m at update 4 of 4 = 1.
  objective = teacher_dino.make_objective(config, workdir="", axis_name=None)
  moved = jax.tree.map(lambda x: x + 1.0, result.state.params)
  base = config.dino.teacher_momentum
  for updates, m in ((4, 1.0), (0, base), (2, 1 - (1 - base) / 2)):
    ms = dict(state, dino_state=dict(state["dino_state"], updates=jnp.int32(updates)))
    _, new = jax.jit(objective.after_update)(moved, ms)
    assert int(new["dino_state"]["updates"]) == updates + 1
    for t, p, e in zip(jax.tree.leaves(new["ema_teacher"]), jax.tree.leaves(moved),
                       jax.tree.leaves(state["ema_teacher"])):
      np.testing.assert_allclose(np.asarray(t), m * np.asarray(e) + (1 - m) * np.asarray(p),
                                 rtol=1e-5, atol=1e-6)
