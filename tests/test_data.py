"""Data package: procedural generator, tfds builder (TF-free), augmentations, grain pipelines,
image-folder converter, ImageNet reading through tfds mock data."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqkd_jax.data import augment, pipeline, shapes

pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from vqkd_jax.data import shapes_builder  # noqa: E402  (needs tfds)

SMALL = dict(image_size=32, num_train=240, num_validation=70)


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = shapes_builder.ShapesConfig(name="test_small", **SMALL)
  return data_dir, config, shapes_builder.load_shapes(data_dir, config=config)


class IndexSource:
  """In-memory source whose example i carries i in its pixels (to follow the order)."""

  def __init__(self, n, size=8, variable=False):
    self.n, self.size, self.variable = n, size, variable

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    h = self.size + (i % 5 if self.variable else 0)
    w = self.size + (i % 3 if self.variable else 0)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1] = i % 256, i // 256
    return {"image": image, "label": np.int64(i % 7)}


def _ids(images):
  images = images.astype(np.int64)
  return (images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]).tolist()


# ------------------------------------------------------------------------------------------------
# Generator.


def test_generator_deterministic_and_batch_independent():
  a = shapes.render_example(3, "train", 11)
  b = shapes.render_example(3, "train", 11)
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
  assert a["image"].tobytes() == b["image"].tobytes() and a["caption"] == b["caption"]
  assert shapes.render_example(3, "train", 12)["image"].tobytes() != a["image"].tobytes()
  assert shapes.render_example(3, "validation", 11)["image"].tobytes() != a["image"].tobytes()
  assert shapes.render_example(4, "train", 11)["image"].tobytes() != a["image"].tobytes()
  batch = shapes.render_batch(3, "train", [5, 11, 700, 11])
  assert batch["image"][1].tobytes() == a["image"].tobytes()
  assert batch["image"][3].tobytes() == a["image"].tobytes()
  big = shapes.render_example(3, "train", 11, image_size=64)
  assert big["image"].shape == (64, 64, 3)
  assert (big["label"], big["caption"]) == (a["label"], a["caption"])


def test_labels_captions_layout_and_colours():
  n = 600
  out = shapes.render_batch(0, "train", range(n), return_meta=True)
  assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == 12
  counts = np.bincount(out["label"], minlength=12)
  assert counts.min() > 20  # Every class occurs.
  for i in range(n):
    label, shape, cell = shapes.parse_caption(out["caption"][i])
    assert label == out["label"][i], out["caption"][i]
    assert shapes.CLASS_NAMES[label].split()[::-1] == [shapes.SHAPES[shape],
                                                      shapes.COLOURS[label % 3]]
    assert cell == out["cell"][i]
    # The caption's place is where the object is: its centre lies in the named third.
    cy, cx = out["center"][i]
    assert cell == 3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)
    # The object's colour is clearly its class colour under the nuisance.
    inside = out["alpha"][i] > 0.99
    assert inside.sum() >= 12
    mean = out["image"][i][inside].mean(0)
    colour = label % 3
    assert mean.argmax() == colour
    assert mean[colour] - np.delete(mean, colour).max() > 100
  # The segmentation is the object (half-covered pixels) labelled label + 1.
  np.testing.assert_array_equal(
      out["segmentation"], np.where(out["alpha"] >= 0.5, out["label"][:, None, None] + 1, 0))
  assert out["segmentation"].dtype == np.uint8
  # Coverage grows with the half size; the background has nuisance, which nuisance=0 removes.
  area = out["alpha"].sum((1, 2))
  shape_of = out["label"] // 3
  for k in range(4):
    assert np.corrcoef(area[shape_of == k], out["half_size"][shape_of == k])[0, 1] > 0.9
  bg = out["alpha"] == 0
  noisy = [out["image"][i][bg[i]].std(0).mean() for i in range(20)]
  clean = shapes.render_batch(0, "train", range(20), nuisance=0.0, return_meta=True)
  flat = [clean["image"][i][clean["alpha"][i] == 0].std(0).max() for i in range(20)]
  assert min(noisy) > 5 and max(flat) == 0
  assert (clean["label"] == out["label"][:20]).all()


def test_nuisance_helpers():
  rng = np.random.default_rng(0)
  bg = shapes.random_background(rng, 32)
  assert bg.shape == (32, 32, 3) and bg.dtype == np.float32 and 0.0 < bg.mean() < 1.0
  flat = shapes.random_background(rng, 32, strength=0.0)
  assert np.ptp(flat) == 0
  img = shapes.render_object_on(flat, shape=0, colour=2, center=(0.5, 0.5), half_size=0.2)
  assert img.dtype == np.uint8 and img[16, 16].argmax() == 2
  assert (img[0, 0] == np.rint(flat[0, 0] * 255)).all()


# ------------------------------------------------------------------------------------------------
# tfds builder.


def test_builder_prepares_tf_free_cached_and_complete(small_shapes, monkeypatch):
  data_dir, config, splits = small_shapes
  assert {k: len(v) for k, v in splits.items()} == {"train": SMALL["num_train"],
                                                   "validation": SMALL["num_validation"]}
  ex = splits["train"][0]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  # Stored examples are exactly the generator's (records are in hashed key order: compare sets).
  for split, n in (("train", SMALL["num_train"]), ("validation", SMALL["num_validation"])):
    want = shapes.render_batch(config.seed, split, range(n))
    want_set = {(hashlib.sha1(want["image"][i].tobytes()).hexdigest(), int(want["label"][i]),
                 want["caption"][i], want["segmentation"][i].tobytes()) for i in range(n)}
    got_set = set()
    for i in range(n):
      e = splits[split][i]
      got_set.add((hashlib.sha1(np.asarray(e["image"]).tobytes()).hexdigest(), int(e["label"]),
                   e["caption"].decode(), np.asarray(e["segmentation"])[..., 0].tobytes()))
    assert got_set == want_set
  builder = shapes_builder.shapes_builder(data_dir, config=config)
  assert builder.info.features["label"].names == shapes.CLASS_NAMES
  files = sorted(os.listdir(builder.data_path))
  assert any(f.endswith(".array_record-00000-of-00001") for f in files), files
  mtimes = {f: os.path.getmtime(os.path.join(builder.data_path, f)) for f in files}

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a cached dataset")

  monkeypatch.setattr(shapes, "render_batch", fail)
  again = shapes_builder.load_shapes(data_dir, config=config)
  assert len(again["train"]) == SMALL["num_train"]
  assert {f: os.path.getmtime(os.path.join(builder.data_path, f)) for f in files} == mtimes
  assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------------------------
# Augmentations.


def test_resize_center_crop_matches_pil():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
  out = augment.resize_center_crop(image, 32)
  # Direct PIL: short side 45 -> 32, long side int(32 * 70 / 45) = 49, crop left round(17 / 2).
  ref = np.asarray(Image.fromarray(image).resize((49, 32), Image.BICUBIC))[:, 8:40]
  np.testing.assert_array_equal(out, ref)
  tall = rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(tall).resize((32, 72), Image.BICUBIC))[20:52]
  np.testing.assert_array_equal(augment.resize_center_crop(tall, 32), ref)
  # "none" at native size is the identity.
  square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(augment.augment(square, None, 32, "none"), square)
  grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
  assert augment.augment(grey, None, 32, "none").shape == (32, 32, 3)


def test_horizontal_flip_matches_numpy():
  image = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
  flips = 0
  for seed in range(40):
    expect_flip = np.random.default_rng(seed).random() < 0.5
    out = augment.horizontal_flip(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, image[:, ::-1] if expect_flip else image)
    flips += expect_flip
  assert 5 < flips < 35
  np.testing.assert_array_equal(augment.horizontal_flip(image, np.random.default_rng(0), p=1.0),
                                image[:, ::-1])


def test_random_resized_crop_law():
  h, w = 60, 80
  rng = np.random.default_rng(0)
  areas, logratios = [], []
  for _ in range(400):
    top, left, ch, cw = augment.random_resized_crop_box(rng, h, w)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    areas.append(ch * cw / (h * w))
    logratios.append(np.log(cw / ch))
  areas, logratios = np.array(areas), np.array(logratios)
  # Rounding to whole pixels widens the ranges slightly.
  assert areas.min() >= 0.08 * 0.8 and areas.max() <= 1.0
  assert logratios.min() >= np.log(3 / 4) - 0.1 and logratios.max() <= np.log(4 / 3) + 0.1
  assert areas.mean() < 0.6  # Most crops are partial (uniform area in [0.08, 1], some rejected).
  # Impossible scales fall back to the centre crop clamped to the ratio range.
  assert augment.random_resized_crop_box(rng, 100, 20, scale=(2, 3)) == (36, 0, 27, 20)
  assert augment.random_resized_crop_box(rng, 20, 100, scale=(2, 3)) == (0, 36, 20, 27)
  assert augment.random_resized_crop_box(rng, 50, 60, scale=(2, 3)) == (0, 0, 50, 60)
  # The crop is the box resized with PIL bicubic.
  image = np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)
  out = augment.random_resized_crop(image, np.random.default_rng(7), 24)
  top, left, ch, cw = augment.random_resized_crop_box(np.random.default_rng(7), h, w)
  ref = np.asarray(Image.fromarray(image[top:top + ch, left:left + cw]).resize((24, 24),
                                                                               Image.BICUBIC))
  np.testing.assert_array_equal(out, ref)
  for name in augment.AUGMENTATIONS:
    o = augment.augment(image, np.random.default_rng(3), 24, name)
    assert o.shape == (24, 24, 3) and o.dtype == np.uint8 and o.flags.c_contiguous
  with pytest.raises(ValueError):
    augment.make_augmentation("nope", 24)


def test_augmentation_moves_segmentation_with_image():
  # Four flat quadrants of different colours; the label map names the quadrant.
  seg = np.zeros((40, 56), np.uint8)
  seg[20:, :28], seg[:20, 28:], seg[20:, 28:] = 1, 2, 3
  colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 200, 0]], np.uint8)
  image = colours[seg]
  for name in augment.AUGMENTATIONS:
    for seed in range(10):
      out, out_seg = augment.augment_with_segmentation(image, seg[..., None],
                                                       np.random.default_rng(seed), 24, name)
      np.testing.assert_array_equal(out, augment.augment(image, np.random.default_rng(seed),
                                                         24, name))
      assert out_seg.shape == (24, 24) and out_seg.dtype == np.uint8
      close = np.abs(out.astype(int) - colours[out_seg].astype(int)).max(-1) < 40
      assert close.mean() > 0.85, (name, seed, close.mean())


# ------------------------------------------------------------------------------------------------
# Pipelines.


def test_train_iterator_resume_exact(small_shapes):
  _, _, splits = small_shapes
  kw = dict(global_batch_size=16, image_size=32, augmentation="default", seed=5,
            process_index=0, process_count=1)
  it = pipeline.make_train_iterator(splits["train"], **kw)
  batches = [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  batches += [next(it) for _ in range(3)]
  assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int32
  assert set(batches[0]) == {"image", "label", "segmentation"}
  assert batches[0]["segmentation"].shape == (16, 32, 32)
  fresh = pipeline.make_train_iterator(splits["train"], **kw)
  fresh.set_state(state)
  for want in batches[2:]:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Same seed, same stream; another seed, another stream.
  again = pipeline.make_train_iterator(splits["train"], **kw)
  np.testing.assert_array_equal(next(again)["image"], batches[0]["image"])
  other = pipeline.make_train_iterator(splits["train"], **dict(kw, seed=6))
  assert not np.array_equal(next(other)["image"], batches[0]["image"])


def test_train_iterator_epochs_and_process_shards():
  n, b = 40, 8
  kw = dict(global_batch_size=b, image_size=8, augmentation="none", seed=1)
  it = pipeline.make_train_iterator(IndexSource(n), process_index=0, process_count=1, **kw)
  stream = sum((_ids(next(it)["image"]) for _ in range(3 * n // b)), [])
  epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  # Two processes: local batches of b / 2, disjoint halves that cover the data each epoch.
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(IndexSource(n), process_index=p, process_count=2, **kw)
    batch = next(it)
    assert batch["image"].shape[0] == b // 2
    seen.append(sorted(_ids(batch["image"]) + sum((_ids(next(it)["image"])
                                                   for _ in range(n // b - 1)), [])))
  assert seen[0] == list(range(0, n, 2)) and seen[1] == list(range(1, n, 2))
  with pytest.raises(ValueError):
    pipeline.make_train_iterator(IndexSource(n), process_index=0, process_count=3, **kw)


def test_train_iterator_worker_processes_same_stream(small_shapes):
  _, _, splits = small_shapes
  kw = dict(global_batch_size=8, image_size=32, augmentation="default", seed=2,
            process_index=0, process_count=1)
  threads = pipeline.make_train_iterator(splits["train"], **kw)
  want = [next(threads) for _ in range(4)]
  workers = pipeline.make_train_iterator(splits["train"], worker_count=1, **kw)
  try:
    got = [next(workers) for _ in range(2)]
    state = workers.get_state()
  finally:
    workers.close()
  resumed = pipeline.make_train_iterator(splits["train"], **kw)  # Threads resume a workers' state.
  resumed.set_state(state)
  got += [next(resumed) for _ in range(2)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iterator_each_example_once(process_count):
  n, gb = 23, 8
  seen, num_batches = [], set()
  for p in range(process_count):
    batches = list(pipeline.make_eval_iterator(IndexSource(n, variable=True), global_batch_size=gb,
                                               image_size=8, process_index=p,
                                               process_count=process_count))
    num_batches.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (gb // process_count, 8, 8, 3)
      assert batch["mask"].dtype == bool and batch["label"].dtype == np.int32
      ids = np.array(_ids(batch["image"]))
      seen += ids[batch["mask"]].tolist()
      assert (batch["image"][~batch["mask"]] == 0).all()
      np.testing.assert_array_equal(batch["label"][batch["mask"]], ids[batch["mask"]] % 7)
  assert num_batches == {pipeline.num_eval_batches(n, gb, process_count)}
  assert sorted(seen) == list(range(n))


def test_eval_iterator_shapes_dataset(small_shapes):
  _, _, splits = small_shapes
  batches = list(pipeline.make_eval_iterator(splits["validation"], global_batch_size=32,
                                             image_size=32, process_index=0, process_count=1))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == SMALL["num_validation"]
  np.testing.assert_array_equal(batches[0]["image"][0], splits["validation"][0]["image"])
  np.testing.assert_array_equal(batches[0]["segmentation"][0],
                                splits["validation"][0]["segmentation"][..., 0])
  assert (batches[-1]["segmentation"][~batches[-1]["mask"]] == 0).all()


def test_synthetic_and_global_batch_without_data_packages():
  code = (
      "import sys, json\n"
      "from vqkd_jax.data import pipeline\n"
      "it = pipeline.synthetic_iterator(8, 16, 12, seed=0, process_index=0, process_count=1)\n"
      "b = next(it); next(it); s = json.dumps(it.get_state())\n"
      "assert b['image'].shape == (8, 16, 16, 3) and b['image'].dtype.name == 'uint8'\n"
      "assert b['label'].dtype.name == 'int32' and b['label'].max() < 12\n"
      "import jax\n"
      "from jax.sharding import NamedSharding, PartitionSpec as P\n"
      "mesh = jax.make_mesh((1,), ('data',))\n"
      "g = pipeline.to_global_batch(dict(b, caption=['x'] * 8), NamedSharding(mesh, P('data')))\n"
      "assert set(g) == {'image', 'label', 'segmentation'} and g['image'].shape == (8, 16, 16, 3)\n"
      "seg = b['segmentation']; assert seg.shape == (8, 16, 16)\n"
      "assert (seg.max((1, 2)) == b['label'] + 1).all() and (seg == 0).any()\n"
      "bad = [m for m in ('grain', 'tensorflow_datasets', 'tensorflow') if m in sys.modules]\n"
      "assert not bad, bad\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(__file__)))
  it = pipeline.synthetic_iterator(8, 16, 12, seed=0, process_index=0, process_count=1)
  first = [next(it)["label"] for _ in range(3)]
  it.set_state({"index": 1})
  np.testing.assert_array_equal(next(it)["label"], first[1])


# ------------------------------------------------------------------------------------------------
# Image folders and ImageNet.


def test_image_folder_converter_skips_bad_files(tmp_path):
  src = tmp_path / "src"
  rng = np.random.default_rng(0)
  for cls in ("zebra", "ant"):
    (src / cls).mkdir(parents=True)
    for i in range(5):
      arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
      Image.fromarray(arr).save(src / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
  Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(src / "ant" / "grey.png")
  good = (src / "zebra" / "0.jpg").read_bytes()
  (src / "zebra" / "corrupt.jpg").write_bytes(good[:len(good) // 3])  # Truncated JPEG.
  (src / "ant" / "readme.txt").write_text("not an image")
  from vqkd_jax.data.image_folder import convert_image_folder
  summary = convert_image_folder(str(src), str(tmp_path / "out"), "tiny", image_size=16,
                                 val_fraction=0.2)
  assert summary["skipped"] == 2 and summary["classes"] == 2
  assert sorted(f for f, _ in summary["skipped_files"]) == ["ant/readme.txt", "zebra/corrupt.jpg"]
  assert summary["class_names"] == ["ant", "zebra"]
  # ceil(0.2 * files) per class held out (files counted before decoding): 2 + 2, bad ones included.
  assert summary["train"] + summary["validation"] == 11 and 2 <= summary["validation"] <= 4
  splits, num_classes = pipeline.load_dataset(f"image_folder:{summary['path']}", "/nonexistent")
  assert num_classes == 2
  labels = sorted(int(splits[s][i]["label"]) for s in splits for i in range(len(splits[s])))
  assert labels == [0] * 6 + [1] * 5
  ex = splits["train"][0]
  assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
  cached = convert_image_folder(str(src), str(tmp_path / "out"), "tiny", image_size=16)
  assert cached["cached"] and cached["skipped"] == 2
  splits, _ = pipeline.load_dataset("folder:tiny", str(tmp_path / "out"))
  batch = next(pipeline.make_train_iterator(splits["train"], global_batch_size=4, image_size=16,
                                            augmentation="default", seed=0, process_index=0,
                                            process_count=1))
  assert batch["image"].shape == (4, 16, 16, 3)
  assert "tensorflow" not in sys.modules


def test_imagenet_reading_through_mock_data(tmp_path):
  from vqkd_jax.data import imagenet
  with tfds.testing.mock_data(num_examples=20):
    splits, num_classes = pipeline.load_dataset("imagenet2012", str(tmp_path), 32)
    assert num_classes == 1000 and len(splits["train"]) == 20
    it = pipeline.make_train_iterator(splits["train"], global_batch_size=8, image_size=32,
                                      augmentation="default", seed=0, process_index=0,
                                      process_count=1)
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].max() < 1000
    batches = list(pipeline.make_eval_iterator(splits["validation"], global_batch_size=16,
                                               image_size=32, process_index=0, process_count=1))
    assert len(batches) == 2 and sum(b["mask"].sum() for b in batches) == 20
  # Not prepared: a clear error; preparing without TensorFlow says that TensorFlow is needed.
  with pytest.raises(FileNotFoundError, match="not prepared"):
    imagenet.load_imagenet(str(tmp_path / "empty"))
  manual = tmp_path / "manual"
  manual.mkdir()
  for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / tar).write_bytes(b"")
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="tensorflow"):
      imagenet.prepare_imagenet(str(tmp_path / "prep"), str(manual))
  assert "tensorflow" not in sys.modules
