"""MS-COCO 2017 captions as an ArrayRecord tfds dataset, converted once from a manual directory
(TF-free), and a source that tokenises each image's captions for the t2i stage.

Manual directory (the files of cocodataset.org, unpacked):
    MANUAL_DIR/annotations/captions_train2017.json
    MANUAL_DIR/annotations/captions_val2017.json
    MANUAL_DIR/train2017/<file_name>.jpg        (file names as in the json's "images")
    MANUAL_DIR/val2017/<file_name>.jpg
`prepare_coco(data_dir, manual_dir)` writes DATA_DIR/vqkd_coco_captions/<config>/1.0.0/ (configs
"256": short side resized to 256, JPEG quality 95, about 20 KB an image; "full": the original
pixels re-encoded); `load_coco(data_dir)` reads it back TF-free:
    ({"train": source, "validation": source}, 1), source[i] = {"image": uint8 [H, W, 3],
    "label": 0, "captions": n bytes strings (n >= 1; 5 for nearly every COCO image),
    "image_id": int64}
(one class: COCO is unconditional for the class-conditional stages, as upstream's non-ImageNet
datasets). Images without captions in the json are left out; examples are keyed by image id.

tfds' own `coco_captions` builder is not used: it downloads the 2014 archives (Karpathy splits)
and needs TensorFlow to prepare.

`CaptionTokens(source, tokenize, num_captions=5)` wraps a source: each record also gets
"caption_ids" int32 [num_captions, L] and "caption_mask" bool [num_captions, L] (the captions
tokenised by the text encoder's `tokenize`, the first num_captions, repeated cyclically when an
image has fewer) and "caption" (the first caption, str). The t2i stage draws one of the
num_captions per example and step in training and reads the first in evaluation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

BUILDER_NAME = "vqkd_coco_captions"
SPLIT_FILES = {"train": ("annotations/captions_train2017.json", "train2017"),
               "validation": ("annotations/captions_val2017.json", "val2017")}


def expected_files(manual_dir: str) -> list[str]:
  """The json files and image folders that prepare_coco reads from manual_dir."""
  return [os.path.join(manual_dir, p) for pair in SPLIT_FILES.values() for p in pair]


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError naming every expected file or folder that manual_dir lacks."""
  missing = [p for p in expected_files(manual_dir) if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        "the COCO manual directory lacks " + ", ".join(missing) + ". Expected (from "
        "cocodataset.org: annotations_trainval2017.zip, train2017.zip, val2017.zip, unpacked): "
        + ", ".join(os.path.relpath(p, manual_dir) for p in expected_files(manual_dir)))


def read_captions(json_path: str) -> list[tuple[int, str, list[str]]]:
  """[(image id, file name, [captions])] of a COCO captions json, images without captions left
  out, sorted by image id; captions stripped, whitespace runs (newlines too) made single spaces."""
  with open(json_path) as f:
    data = json.load(f)
  captions: dict[int, list[str]] = {}
  for a in data["annotations"]:
    captions.setdefault(int(a["image_id"]), []).append(" ".join(str(a["caption"]).split()))
  files = {int(im["id"]): im["file_name"] for im in data["images"]}
  unknown = sorted(set(captions) - set(files))
  if unknown:
    raise ValueError(f"{json_path}: captions of image ids without an image entry: {unknown[:5]}")
  return [(i, files[i], captions[i]) for i in sorted(captions)]


def _builder_class():
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class CocoConfig(tfds.core.BuilderConfig):
    """image_size: short side after resizing (0 = original pixels)."""
    image_size: int = 256

  class VqkdCocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MS-COCO 2017 images with all their captions."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [CocoConfig(name="256", image_size=256),
                       CocoConfig(name="full", image_size=0)]
    DEFAULT_CONFIG_NAME = "256"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpacked COCO 2017: " + ", ".join(
        p for pair in SPLIT_FILES.values() for p in pair)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="MS-COCO 2017 captions (images + their 5-7 English captions).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(names=["image"]),
              "captions": tfds.features.Sequence(tfds.features.Text()),
              "image_id": tfds.features.Scalar(np.int64),
          }),
          supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      manual_dir = str(dl_manager.manual_dir)
      check_manual_dir(manual_dir)
      return {split: self._generate_examples(os.path.join(manual_dir, js),
                                             os.path.join(manual_dir, folder))
              for split, (js, folder) in SPLIT_FILES.items()}

    def _generate_examples(self, json_path: str, image_dir: str):
      from PIL import Image

      from vqkd_jax.data.augment import ensure_rgb, resize_short_side

      size = self.builder_config.image_size
      for image_id, file_name, caps in read_captions(json_path):
        path = os.path.join(image_dir, file_name)
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path} (image {image_id} of {json_path}) does not exist")
        with Image.open(path) as im:
          image = ensure_rgb(np.asarray(im.convert("RGB")))
        if size:
          image = resize_short_side(image, size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        yield image_id, {"image": buf.getvalue(), "label": 0, "captions": caps,
                         "image_id": image_id}

  return VqkdCocoCaptions


def _builder(data_dir: str, config: str):
  cls = _builder_class()
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if config not in names:
    raise ValueError(f"COCO captions config {config!r}: one of {names}")
  return cls(config=config, data_dir=os.path.expanduser(data_dir))


def prepare_coco(data_dir: str, manual_dir: str, config: str = "256") -> str:
  """Converts the COCO 2017 captions in manual_dir into ArrayRecord under data_dir (once; an
  already prepared dataset is kept). Returns the dataset's directory.

  Raises FileNotFoundError naming the expected files when manual_dir lacks some."""
  import tensorflow_datasets as tfds

  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  check_manual_dir(manual_dir)
  builder = _builder(data_dir, config)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False))
  return str(builder.data_path)


def load_coco(data_dir: str, manual_dir: str | None = None,
              config: str = "256") -> tuple[dict, int]:
  """Random-access sources of the prepared dataset (see the module docstring); prepares it first
  from manual_dir when given and not prepared yet."""
  builder = _builder(data_dir, config)
  if not builder.is_prepared():
    if manual_dir is None:
      raise FileNotFoundError(
          f"COCO captions ({config}) are not prepared under {os.path.expanduser(data_dir)}: run "
          f"vqkd_jax.data.coco.prepare_coco(data_dir, manual_dir) with manual_dir holding "
          + ", ".join(p for pair in SPLIT_FILES.values() for p in pair))
    prepare_coco(data_dir, manual_dir, config)
    builder = _builder(data_dir, config)
  return {s: builder.as_data_source(split=s) for s in SPLIT_FILES}, 1


class CaptionTokens:
  """A source whose records also carry their captions tokenised (see the module docstring).

  tokenize: captions (list of str) -> (ids int [n, L], mask bool [n, L]), host-side (a text
  encoder's `tokenize`)."""

  def __init__(self, source, tokenize: Callable[[Sequence[str]], tuple], num_captions: int = 5):
    self.source, self.tokenize, self.num_captions = source, tokenize, num_captions

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = dict(self.source[index])
    caps = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
            for c in np.asarray(record["captions"]).reshape(-1)]
    if not caps:
      raise ValueError(f"record {index} has no captions")
    chosen = [caps[i % len(caps)] for i in range(self.num_captions)]
    ids, mask = self.tokenize(chosen)
    record["caption_ids"] = np.asarray(ids, np.int32)
    record["caption_mask"] = np.asarray(mask, bool)
    record["caption"] = caps[0]
    return record


def with_caption_tokens(config, splits: dict, num_captions: int = 5) -> dict:
  """{split: CaptionTokens(source)} with the tokenizer of config.text_encoder (only its
  configuration files are read), for the input pipeline of a t2i config on COCO; the splits
  unchanged for configs without a text encoder."""
  if config.get("text_encoder") is None:
    return splits
  from vqkd_jax.teachers.text_encoders import text_tokenizer

  tokenize = text_tokenizer(config.text_encoder)
  return {name: CaptionTokens(src, tokenize, num_captions) for name, src in splits.items()}
