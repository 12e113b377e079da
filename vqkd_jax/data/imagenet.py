"""ImageNet-1k (`imagenet2012`) through tensorflow-datasets, from a manual directory.

Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in MANUAL_DIR, then
`vqkd data prepare-imagenet --manual_dir MANUAL_DIR --data_dir DATA_DIR` once. Reading the prepared
ArrayRecord files needs no TensorFlow; tfds' imagenet2012 preparation itself may import TensorFlow to
repair its few CMYK/PNG files: if it is missing, the error says so (prepare once on a machine with
`pip install tensorflow-cpu`, then copy DATA_DIR).
Class ids follow tfds (sorted WordNet ids), not upstream's devkit order (upstream §11.9).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

NUM_CLASSES = 1000


def prepare_imagenet(data_dir: str, manual_dir: str) -> None:
  """Prepares imagenet2012 in ArrayRecord format from the tar files in manual_dir."""
  manual_dir = os.path.expanduser(manual_dir)
  for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    if not os.path.exists(os.path.join(manual_dir, tar)):
      raise FileNotFoundError(f"{tar} not found in {manual_dir} (the ImageNet manual directory)")
  builder = tfds.builder("imagenet2012", data_dir=os.path.expanduser(data_dir),
                         file_format="array_record")
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ImportError as e:
    raise ImportError(f"preparing imagenet2012 needs a package that is missing ({e}); prepare once "
                      f"where `pip install tensorflow-cpu` works, then copy {data_dir}") from e


def load_imagenet(data_dir: str) -> tuple[dict, int]:
  """({"train", "validation"} random-access sources, 1000) of a prepared imagenet2012."""
  data_dir = os.path.expanduser(data_dir)
  try:
    splits = {s: tfds.data_source("imagenet2012", split=s, data_dir=data_dir, download=False)
              for s in ("train", "validation")}
  except Exception as e:  # Not prepared (or prepared in another file format).
    raise FileNotFoundError(
        f"imagenet2012 is not prepared in ArrayRecord format under {data_dir}: run "
        f"`vqkd data prepare-imagenet --manual_dir DIR --data_dir {data_dir}` first ({e})") from e
  return splits, NUM_CLASSES
