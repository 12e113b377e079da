"""MS-COCO captions (data/coco.py): a fake 4-image COCO 2017 folder written here (images of several
sizes, 5 or 6 captions each, whitespace to normalise) converted to ArrayRecord and read back TF-free
against what was written; the error naming the expected files; CaptionTokens; the t2i stage's
choice of one caption per example, and its loss on batches of such records."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")

from vqkd_jax.data import coco  # noqa: E402

SPLITS = {"train": ("train2017", [9, 25, 30]), "val": ("val2017", [139])}
WORDS = ("a red circle on the left", "a large blue square", "a green cross at the top",
         "a small red triangle in the centre", "a blue circle at the bottom right",
         "a cross on the right")


def caption(image_id, k):
  return WORDS[(image_id + k) % len(WORDS)]


def fake_coco(root):
  """MANUAL_DIR with annotations/captions_{train,val}2017.json and the jpgs: 3 train, 1 val
  images; image 25 has 6 captions; an annotation-less image entry (id 77) is left out."""
  rng = np.random.default_rng(0)
  images = {}
  (root / "annotations").mkdir(parents=True)
  for split, (folder, ids) in SPLITS.items():
    (root / folder).mkdir()
    entries, anns = [{"id": 77, "file_name": "none.jpg", "height": 1, "width": 1}], []
    for i in ids:
      h, w = 40 + i, 60
      yy, xx = np.mgrid[:h, :w]                  # smooth (JPEG keeps it close), per-image colours
      c = rng.uniform(0.2, 1.0, 3)
      image = (255 * c * (0.5 + 0.25 * np.sin(yy[..., None] / 7 + xx[..., None] / 11 + c))
               ).astype(np.uint8)
      Image.fromarray(image).save(root / folder / f"{i:012d}.jpg", quality=100)
      images[i] = image
      entries.append({"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w})
      for k in range(6 if i == 25 else 5):
        anns.append({"id": len(anns), "image_id": i, "caption": f" {caption(i, k)}\n "})
    (root / "annotations" / f"captions_{split}2017.json").write_text(
        json.dumps({"images": entries, "annotations": anns}))
  return images


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  images = fake_coco(root / "manual")
  path = coco.prepare_coco(str(root / "data"), str(root / "manual"), config="full")
  return root, images, path


def test_conversion_reads_back_what_was_written(prepared):
  root, images, path = prepared
  assert path.endswith("vqkd_coco_captions/full/1.0.0")
  splits, num_classes = coco.load_coco(str(root / "data"), config="full")
  assert num_classes == 1 and {k: len(v) for k, v in splits.items()} == {"train": 3,
                                                                        "validation": 1}
  seen = {}
  for split, src in splits.items():
    for i in range(len(src)):
      r = src[i]
      seen[int(r["image_id"])] = r
      assert r["label"] == 0
  assert sorted(seen) == [9, 25, 30, 139]
  for image_id, r in seen.items():
    assert r["image"].shape == images[image_id].shape and r["image"].dtype == np.uint8
    # JPEG twice (quality 100, then 95): close to the pixels written, not equal.
    assert np.abs(r["image"].astype(float) - images[image_id]).mean() < 3
    caps = [c.decode() for c in r["captions"]]
    assert caps == [caption(image_id, k) for k in range(6 if image_id == 25 else 5)]
  # Config "256": the short side resized to 256.
  coco.prepare_coco(str(root / "data"), str(root / "manual"))
  small = coco.load_coco(str(root / "data"))[0]["validation"][0]
  assert min(small["image"].shape[:2]) == 256


def test_missing_files_are_named(tmp_path):
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "captions_val2017.json").write_text("{}")
  with pytest.raises(FileNotFoundError) as err:
    coco.prepare_coco(str(tmp_path / "data"), str(tmp_path))
  msg = str(err.value)
  for name in ("captions_train2017.json", "train2017", "val2017"):
    assert name in msg
  assert "lacks" in msg and msg.count("captions_val2017.json") == 1   # named once: as expected
  with pytest.raises(FileNotFoundError, match="prepare_coco"):
    coco.load_coco(str(tmp_path / "data"))


def test_caption_tokens_and_the_stage_drawing_one_caption(prepared):
  from vqkd_jax.teachers.text_encoders import CaptionTokenizer
  from vqkd_jax.train.t2i import BatchCaptions

  root, _, _ = prepared
  splits, _ = coco.load_coco(str(root / "data"), config="full")
  tokenize = CaptionTokenizer("in_the_box", "", 12)
  src = coco.CaptionTokens(splits["train"], tokenize, num_captions=7)
  assert len(src) == 3
  records = {int(src[i]["image_id"]): src[i] for i in range(3)}
  r = records[9]
  assert r["caption_ids"].shape == r["caption_mask"].shape == (7, 12)
  want = [caption(9, k % 5) for k in range(7)]          # 5 captions repeated cyclically
  np.testing.assert_array_equal(r["caption_ids"], tokenize(want)[0])
  assert r["caption"] == caption(9, 0)

  ids = jnp.asarray(np.stack([records[i]["caption_ids"] for i in (9, 25, 30)]))
  mask = jnp.asarray(np.stack([records[i]["caption_mask"] for i in (9, 25, 30)]))
  batch = {"caption_ids": ids, "caption_mask": mask}
  first_ids, first_mask = BatchCaptions().ids(batch)
  np.testing.assert_array_equal(first_ids, ids[:, 0])
  np.testing.assert_array_equal(first_mask, mask[:, 0])
  drawn = np.stack([np.asarray(BatchCaptions().ids(batch, jax.random.PRNGKey(s))[0])
                    for s in range(40)])                # [40, 3, 12]
  for b, image_id in enumerate((9, 25, 30)):
    rows = {tuple(x) for x in drawn[:, b]}
    assert rows <= {tuple(x) for x in np.asarray(ids[b])}
    assert len(rows) == (6 if image_id == 25 else 5)    # every caption drawn
  with pytest.raises(ValueError, match="caption_ids"):
    BatchCaptions().ids({"image": ids})


def test_t2i_loss_on_coco_records(prepared, tmp_path):
  """make_objective with data.name "coco_captions": the captions come from the batch (drawn per
  example); a batch of CaptionTokens records resized to 32 px gives a finite loss near log K."""
  from tiny_workdir import random_clip_workdir, train_tiny_cluster_tokenizer

  from vqkd_jax.config import load_config
  from vqkd_jax.data.augment import resize_center_crop
  from vqkd_jax.train.t2i import make_objective

  root, _, _ = prepared
  random_clip_workdir(str(tmp_path / "clip"), scale=0.2)
  train_tiny_cluster_tokenizer(tmp_path / "tokenizer", patch_size=8, width=16, batch=64)
  c = load_config("configs/demo/t2i.py:runlocal")
  with c.unlocked():
    c.data.name = "coco_captions"
    c.tokenizer_workdir = str(tmp_path / "tokenizer")
    c.text_encoder.workdir = str(tmp_path / "clip")
    c.model.width, c.model.depth = 32, 1
  src = coco.with_caption_tokens(c, coco.load_coco(str(root / "data"), config="full")[0])["train"]
  assert isinstance(src, coco.CaptionTokens) and src.tokenize.context_length == 12
  records = [src[i] for i in range(3)]
  batch = {"image": np.stack([resize_center_crop(r["image"], 32) for r in records]),
           "label": np.zeros(3, np.int32),
           "caption_ids": np.stack([r["caption_ids"] for r in records]),
           "caption_mask": np.stack([r["caption_mask"] for r in records])}
  objective = make_objective(c, workdir=str(tmp_path), axis_name=None)
  variables = nn.unbox(jax.jit(objective.init)(jax.random.PRNGKey(0), batch))
  loss, (metrics, _) = jax.jit(objective.loss, static_argnums=5)(
      variables["params"], {}, objective.frozen, batch, jax.random.PRNGKey(0), True)
  assert np.isfinite(float(loss)) and abs(float(loss) - np.log(32)) < 0.5
