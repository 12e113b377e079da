"""Evaluate one tokenizer row of the demo's table from its finished stages.

A row: tokenizer (+ pixel decoder for VQ-KD / Cluster codes), class-conditional AR and NAR
proposal networks, optionally a text-to-image AR. Its numbers, on the validation split:

  codebook_usage    % of codes used at least once
  code_perplexity   exp(entropy) of the code histogram
  psnr              reconstruction PSNR (dB)
  rfd_eval          Fréchet distance of reconstructions to the originals in the evaluator's
                    features (the paper's rFID column, computed in FD_eval's features)
  code_probe_accuracy  a ridge classifier on each image's bag of codes (histogram over the
                    codebook), fitted on training images, scored on validation: how much of the
                    class (semantics) the codes carry
  ppl               the AR network's perplexity on validation tokens (the paper's PPL)
  fd_ar, fd_nar, fd_t2i  FD_eval of generated images against the validation images (NOT FID)
  *_accuracy        the evaluator's accuracy at the conditioning class of generated images

`evaluate_row` caches its result in `<row dir>/report_row.json` (+ `.npz` with the arrays the
grids need), keyed by the stages' configs and checkpoint steps: a rerun reads it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np

from vqkd_jax.evaluation import metrics as metrics_lib
from vqkd_jax.evaluation.frechet import FeatureStatistics, frechet_distance
from vqkd_jax.evaluation.images import save_grid, side_by_side

CACHE_JSON, CACHE_NPZ = "report_row.json", "report_row.npz"
GRID_PER_CLASS = 6
RIDGE = 10.0   # the code probe's ridge penalty (standardised features)


# ----------------------------------------------------------------------------------------------
# The measuring instrument: the evaluator network and the reference (validation) statistics.

class Evaluator:
  """The in-the-box evaluator network (train/evaluator.py): uint8 images -> (features [N, F],
  logits [N, C]) in chunks."""

  def __init__(self, workdir: str):
    from vqkd_jax.train import evaluator as evaluator_stage
    from vqkd_jax.train.loop import load_trained

    trained = load_trained(workdir)
    model = evaluator_stage.build_model(trained["config"]["model"])
    self._predict = evaluator_stage.make_predict_fn(model, trained["params"],
                                                    trained["model_state"])

  def __call__(self, images: np.ndarray, chunk: int = 500):
    outs = [jax.device_get(self._predict(images[i:i + chunk]))
            for i in range(0, len(images), chunk)]
    return (np.concatenate([o["features"] for o in outs]),
            np.concatenate([o["logits"] for o in outs]))


@dataclasses.dataclass
class Reference:
  """Validation images [N, H, W, 3] uint8, labels [N], segmentation [N, H, W] (captions), their
  evaluator statistics and accuracy; a subset of training images for the code probe."""
  images: np.ndarray
  labels: np.ndarray
  segmentation: np.ndarray | None
  stats: FeatureStatistics
  accuracy: float
  train_images: np.ndarray
  train_labels: np.ndarray


def load_reference(data_config, evaluator: Evaluator, probe_train: int = 5000) -> Reference:
  """`data_config`: any stage config whose data group names the dataset (validation split read
  with centre crops, in dataset order)."""
  from vqkd_jax.train.evaluate import map_split

  keep = lambda b: {k: b[k] for k in ("image", "label", "segmentation") if k in b}
  val = map_split(data_config, keep)
  train = map_split(data_config, keep, split="train", limit=probe_train)
  features, logits = evaluator(val["image"])
  stats = FeatureStatistics()
  stats.update(features)
  return Reference(images=val["image"], labels=val["label"], segmentation=val.get("segmentation"),
                   stats=stats, accuracy=float(np.mean(np.argmax(logits, -1) == val["label"])),
                   train_images=train["image"], train_labels=train["label"])


def fd_eval(evaluator: Evaluator, ref: Reference, images: np.ndarray, labels=None) -> tuple:
  """(FD_eval of `images` against the validation images, evaluator accuracy at `labels` or
  None)."""
  features, logits = evaluator(images)
  stats = FeatureStatistics()
  stats.update(features)
  fd = frechet_distance(stats.mean(), stats.covariance(), ref.stats.mean(), ref.stats.covariance())
  acc = None if labels is None else float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  return float(fd), acc


# ----------------------------------------------------------------------------------------------
# The code probe.

def bag_of_codes(indices: np.ndarray, num_codes: int) -> np.ndarray:
  """int indices [N, h, w] -> float64 [N, num_codes]: each image's code frequencies (sum 1)."""
  flat = indices.reshape(len(indices), -1)
  out = np.zeros((len(flat), num_codes), np.float64)
  np.add.at(out, (np.repeat(np.arange(len(flat)), flat.shape[1]), flat.ravel()), 1.0)
  return out / flat.shape[1]


def ridge_probe(x_train, y_train, x_test, y_test, num_classes: int, penalty: float = RIDGE) -> float:
  """Accuracy on (x_test, y_test) of a one-vs-all ridge classifier fitted in closed form on
  standardised features (train mean / std; constant features left at 0) with a bias."""
  mean, std = x_train.mean(0), x_train.std(0)
  std = np.where(std > 0, std, 1.0)
  prep = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  a, b = prep(x_train), prep(x_test)
  targets = np.eye(num_classes)[np.asarray(y_train)]
  reg = penalty * np.eye(a.shape[1])
  reg[-1, -1] = 0.0  # The bias is not penalised.
  w = np.linalg.solve(a.T @ a + reg, a.T @ targets)
  return float(np.mean(np.argmax(b @ w, -1) == np.asarray(y_test)))


# ----------------------------------------------------------------------------------------------
# One row.

def _fingerprint(stage_dirs: dict, extra: dict) -> str:
  """Hash of each stage's saved config and newest checkpoint step, and `extra`."""
  h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
  for name in sorted(stage_dirs):
    d = stage_dirs[name]
    h.update(name.encode())
    with open(os.path.join(d, "config.json"), "rb") as f:
      h.update(f.read())
    ckpts = os.path.join(d, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []
    h.update(str(steps[-1] if steps else None).encode())
  return h.hexdigest()


def _load_config(workdir: str):
  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def _grid_samples(images: np.ndarray, labels: np.ndarray, num_classes: int,
                  per_class: int) -> np.ndarray:
  """The first `per_class` images of each class, class by class (rows of a grid); classes with
  fewer are padded with white."""
  out = []
  for c in range(num_classes):
    chosen = images[np.flatnonzero(labels == c)[:per_class]]
    pad = np.full((per_class - len(chosen),) + images.shape[1:], 255, np.uint8)
    out.append(np.concatenate([chosen, pad]))
  return np.concatenate(out)


def _batched(fn, n: int, batch: int):
  out = [np.asarray(fn(i, min(i + batch, n))) for i in range(0, n, batch)]
  return np.concatenate(out) if out else np.zeros((0,))


def evaluate_row(label: str, stage_dirs: dict, ref: Reference, evaluator: Evaluator, report_cfg,
                 out_dir: str, evaluator_dir: str = "") -> tuple[dict, dict]:
  """Evaluates a row (or reads its cache).

  Args:
    label: the tokenizer's name in the table ("VQ-KD_CLIP", ...).
    stage_dirs: {"tokenizer", "ar", "nar"[, "pixel_decoder", "t2i"]} work directories.
    ref, evaluator: the validation reference and the evaluator network.
    report_cfg: num_samples, cfg_scale, temperature, top_k, top_p, seed (AR; NAR and T2I sample
      with their stage's `sampling` group, with cfg_scale and seed from here); optional
      ppl_images (the perplexities on the validation split's first that many images; default
      all) and sample_batch (rows per AR / NAR sampling call, default 256; the samples do not
      depend on it).
    out_dir: the row's directory: report_row.json / .npz and grids/.
  Returns: (row dict, arrays for the combined grids: recon [16], val_indices, ar/nar/t2i grid
    samples).
  """
  from vqkd_jax.api import Generator

  os.makedirs(out_dir, exist_ok=True)
  key = _fingerprint(stage_dirs, {"report": report_cfg.to_dict(), "label": label,
                                  "evaluator": evaluator_dir, "n_val": len(ref.images),
                                  "n_train": len(ref.train_images)})
  cache_json, cache_npz = os.path.join(out_dir, CACHE_JSON), os.path.join(out_dir, CACHE_NPZ)
  if os.path.exists(cache_json) and os.path.exists(cache_npz):
    with open(cache_json) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      with np.load(cache_npz) as z:
        return cached["row"], {k: z[k] for k in z.files}

  t0 = time.time()
  gen = Generator(stage_dirs["ar"], stage_dirs.get("pixel_decoder"))
  tok = gen.tokenizer
  images, labels = ref.images, ref.labels
  n = min(int(report_cfg.num_samples), len(labels))
  # Optional fields (older configs lack them): the validation images of the perplexities (None:
  # the whole split) and the rows per AR / NAR sampling call (the samples do not depend on it).
  ppl_images = report_cfg.get("ppl_images")
  sample_batch = int(report_cfg.get("sample_batch") or 256)
  num_classes = gen.num_classes
  arrays = {}

  # Tokenizer: usage, reconstructions, code probe.
  chunk = 500
  indices = _batched(lambda a, b: tok.encode(images[a:b]), len(images), chunk)
  counts = np.bincount(indices.ravel(), minlength=tok.num_codes)
  recon = _batched(lambda a, b: tok.decode(indices[a:b]), len(indices), chunk)
  rfd, rec_acc = fd_eval(evaluator, ref, recon, labels)
  train_idx = _batched(lambda a, b: tok.encode(ref.train_images[a:b]), len(ref.train_images),
                       chunk)
  probe = ridge_probe(bag_of_codes(train_idx, tok.num_codes), ref.train_labels,
                      bag_of_codes(indices, tok.num_codes), labels, num_classes)
  row = {"tokenizer": label, "num_codes": int(tok.num_codes),
         "codebook_usage": 100.0 * metrics_lib.codebook_usage(counts),
         "code_perplexity": metrics_lib.code_perplexity(counts),
         "psnr": metrics_lib.psnr(images, recon), "rfd_eval": rfd,
         "reconstruction_accuracy": rec_acc, "code_probe_accuracy": probe}
  arrays["recon"] = recon[:16]
  arrays["val_indices"] = indices.astype(np.int16)
  tokens_fn = lambda x: tok.frozen.encode(tok.variables, x).reshape(x.shape[0], -1)

  # AR: perplexity, samples.
  from vqkd_jax.train import ar as ar_stage
  ar_cfg = _load_config(stage_dirs["ar"])
  row["ppl"] = ar_stage.validation_perplexity(ar_cfg, gen.model, gen.variables, tokens_fn,
                                              num_classes, limit=ppl_images)
  t = time.time()
  samples = gen.sample(labels[:n], cfg_scale=report_cfg.cfg_scale,
                       temperature=report_cfg.temperature, top_k=report_cfg.top_k,
                       top_p=report_cfg.top_p, seed=report_cfg.seed, batch_size=sample_batch)
  row["ar_sampling_seconds"] = time.time() - t
  row["fd_ar"], row["ar_accuracy"] = fd_eval(evaluator, ref, samples, labels[:n])
  arrays["ar"] = _grid_samples(samples, labels[:n], num_classes, GRID_PER_CLASS)

  # NAR: masked-token perplexity, samples by parallel decoding (the stage's sampling settings).
  if stage_dirs.get("nar"):
    from vqkd_jax.train import nar as nar_stage
    nar = Generator(stage_dirs["nar"], stage_dirs.get("pixel_decoder"), tokenizer=tok.frozen)
    val = nar_stage.validation_metrics(_load_config(stage_dirs["nar"]), nar.model, nar.variables,
                                       tokens_fn, num_classes, tok.num_codes, limit=ppl_images)
    row["nar_masked_ppl"] = val["masked_perplexity"]
    t = time.time()
    samples = nar.sample(labels[:n], cfg_scale=report_cfg.cfg_scale,
                         temperature=report_cfg.temperature, seed=report_cfg.seed,
                         batch_size=sample_batch)
    row["nar_sampling_seconds"] = time.time() - t
    row["fd_nar"], row["nar_accuracy"] = fd_eval(evaluator, ref, samples, labels[:n])
    arrays["nar"] = _grid_samples(samples, labels[:n], num_classes, GRID_PER_CLASS)

  # T2I: samples from the validation images' captions.
  if stage_dirs.get("t2i"):
    from vqkd_jax.train import t2i as t2i_stage
    model, t2i_vars, info = t2i_stage.load_t2i(stage_dirs["t2i"])
    encoder = info["text_encoder"]
    captions = t2i_stage.ShapesCaptions(encoder)
    t2i_cfg = _load_config(stage_dirs["t2i"])
    frozen = {"tokenizer": tok.variables, "text_encoder": encoder.variables}
    image_tokens = lambda tv, batch: tok.frozen.encode(tv, batch["image"]).reshape(
        batch["image"].shape[0], -1)
    ppl = t2i_stage.validation_perplexity(t2i_cfg, model, t2i_vars, encoder, captions,
                                          image_tokens, frozen, limit=ppl_images)
    row["t2i_ppl"] = ppl["perplexity"]
    batch = {"label": labels[:n], "segmentation": ref.segmentation[:n]}
    ids, mask = jax.jit(captions.ids)(batch)
    s = info["sampling"]
    t = time.time()
    codes = _batched(lambda a, b: t2i_stage.sample_images(
        model, t2i_vars, encoder, encoder.variables, ids[a:b], mask[a:b],
        rng=jax.random.PRNGKey(report_cfg.seed), cfg_scale=report_cfg.cfg_scale,
        temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
        example_offset=a), n, 250)
    samples = tok.decode(codes.reshape(n, *gen.grid))
    row["t2i_sampling_seconds"] = time.time() - t
    row["fd_t2i"], row["t2i_accuracy"] = fd_eval(evaluator, ref, samples, labels[:n])
    k = 16
    arrays["t2i"] = side_by_side(images[:k], samples[:k], per_row=8)
    with open(os.path.join(out_dir, "t2i_captions.txt"), "w") as f:
      f.write("".join(f"{c}\n" for c in captions.texts(
          {"label": labels[:k], "segmentation": ref.segmentation[:k]})))

  row["num_samples"] = n
  row["seconds"] = time.time() - t0
  write_row_grids(out_dir, label, images, arrays)
  np.savez_compressed(cache_npz, **arrays)
  with open(cache_json, "w") as f:
    json.dump({"key": key, "row": row}, f, indent=2)
  return row, arrays


def write_row_grids(out_dir: str, label: str, images: np.ndarray, arrays: dict) -> None:
  """<out_dir>/grids: reconstructions.png (originals above reconstructions), ar.png / nar.png (one
  row per class), t2i.png (validation images above samples of their captions)."""
  grids = os.path.join(out_dir, "grids")
  k = len(arrays["recon"])
  save_grid(side_by_side(images[:k], arrays["recon"], per_row=8),
            os.path.join(grids, "reconstructions.png"), ncols=8, upscale=2)
  for name in ("ar", "nar"):
    if name in arrays:
      save_grid(arrays[name], os.path.join(grids, f"{name}.png"), ncols=GRID_PER_CLASS, upscale=2)
  if "t2i" in arrays:
    save_grid(arrays["t2i"], os.path.join(grids, "t2i.png"), ncols=8, upscale=2)
