"""ImageNet-1k (`imagenet2012`) through tensorflow-datasets, in ArrayRecord format.

Preparation (once): put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in MANUAL_DIR, then
``prepare_imagenet(DATA_DIR, MANUAL_DIR)``. **Preparation needs TensorFlow**: tfds 4.9.10's
imagenet2012 builder calls ``tf.io.gfile`` to find and read the archives (and TF to repair its
few CMYK/PNG files), so without TensorFlow it fails with ``ModuleNotFoundError: tensorflow``; this
module turns that into an ImportError that says so. Prepare once where
``pip install tensorflow-cpu`` works and copy DATA_DIR/imagenet2012/ over, or extract the archives
into class folders (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) and use
``image_folder.convert_image_folder``, which is TF-free.

Reading an already prepared ArrayRecord dataset needs no TensorFlow (``builder.as_data_source``).
Class ids follow tfds (sorted WordNet ids: 0 = n01440764 tench), not upstream's devkit order.
"""

from __future__ import annotations

import os

NUM_CLASSES = 1000
SPLITS = ("train", "validation")


def _builder(data_dir: str):
  import tensorflow_datasets as tfds
  return tfds.builder("imagenet2012", data_dir=os.path.expanduser(data_dir),
                      file_format="array_record")


def prepare_imagenet(data_dir: str, manual_dir: str) -> None:
  """Prepares imagenet2012 (ArrayRecord) under data_dir from the ILSVRC2012 tars in manual_dir.

  Raises:
    FileNotFoundError: a tar is missing.
    ImportError: TensorFlow is not installed (tfds' imagenet2012 preparation needs it).
  """
  import tensorflow_datasets as tfds
  manual_dir = os.path.expanduser(manual_dir)
  for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    if not os.path.exists(os.path.join(manual_dir, tar)):
      raise FileNotFoundError(f"{tar} not found in {manual_dir} (the ImageNet manual directory)")
  builder = _builder(data_dir)
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     try_download_gcs=False))
  except ModuleNotFoundError as e:
    if e.name is not None and e.name.split(".")[0] == "tensorflow":
      raise ImportError(
          "preparing imagenet2012 with tensorflow-datasets needs the 'tensorflow' package (its "
          "builder reads the archives through tf.io.gfile), which is not installed: "
          "`pip install tensorflow-cpu` here, or prepare on another machine and copy "
          f"{os.path.join(data_dir, 'imagenet2012')}, or extract the archives into class folders "
          "and convert them TF-free with vqkd_jax.data.image_folder.convert_image_folder") from e
    raise


def load_imagenet(data_dir: str, manual_dir: str | None = None) -> tuple[dict, int]:
  """Random-access sources of a prepared imagenet2012 (TF-free reading).

  Args:
    data_dir: tfds data directory holding imagenet2012/<version>/ in ArrayRecord format.
    manual_dir: if given and the dataset is not prepared, prepare it first (needs TensorFlow).

  Returns:
    ({"train": source, "validation": source}, 1000); ``source[i]`` is {"image": uint8 [H,W,3]
    (variable size), "label": int64, "file_name": bytes}.
  """
  data_dir = os.path.expanduser(data_dir)
  builder = _builder(data_dir)
  if manual_dir is not None and not builder.is_prepared():
    prepare_imagenet(data_dir, manual_dir)
    builder = _builder(data_dir)
  try:
    splits = {s: builder.as_data_source(split=s) for s in SPLITS}
  except Exception as e:  # Not prepared, or prepared as TFRecord (not random access).
    raise FileNotFoundError(
        f"imagenet2012 is not prepared in ArrayRecord format under {data_dir} ({e}). Prepare it "
        "with vqkd_jax.data.imagenet.prepare_imagenet(data_dir, manual_dir) (needs TensorFlow) "
        "or convert an extracted folder with image_folder.convert_image_folder") from e
  return splits, NUM_CLASSES
