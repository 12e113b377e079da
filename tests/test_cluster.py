"""The Cluster tokenizer stage through the shared loop: codebook-only training with CVQ-VAE anchors,
then the frozen tokenizer that the pixel decoder and the proposal networks read."""

import ml_collections
import numpy as np

from vqkd_jax.config import load_config
from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
from vqkd_jax.train import loop


def _config(steps=6):
  c = load_config("configs/demo/cluster.py:runlocal=True")
  with c.unlocked():
    # A small random ViT teacher: no teacher stage needed for this test.
    c.teacher = ml_collections.ConfigDict(dict(kind="random_vit", patch_size=4, width=16, depth=1,
                                                num_heads=2, image_size=32, out_dim=0))
    c.data.synthetic = True
    c.total_steps = steps
    c.model.num_codes = 64
    c.checkpoint_every = steps
  return c


def test_cluster_trains_codebook_only_and_freezes(tmp_path):
  c = _config()
  result = loop.train(c, str(tmp_path))
  assert set(result.state.params) == {"embedding"}           # only the codebook is trained
  emb = np.asarray(result.state.params["embedding"])
  assert emb.shape == (64, 16)
  # Adam alone moves a U(-1/K, 1/K) code by at most lr per step; the anchors replace dead codes by
  # teacher features (norm ~ sqrt(16) after the final LayerNorm): only they explain large norms.
  steps_bound = c.optimizer.lr * c.total_steps * np.sqrt(16) + np.sqrt(16) / 64
  assert np.linalg.norm(emb, axis=1).max() > 2 * steps_bound
  state = result.state.model_state["codebook"]
  assert np.isclose(float(np.sum(state["usage_ema"])), 1 - 0.99 ** c.total_steps, rtol=1e-4)

  tok = load_frozen_tokenizer(str(tmp_path))
  assert tok.stage == "cluster" and tok.num_codes == 64 and tok.code_dim == 16
  assert tok.grid() == (8, 8)
  images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  idx = np.asarray(tok.encode(tok.variables, images))
  assert idx.shape == (3, 8, 8) and idx.min() >= 0 and idx.max() < 64
  np.testing.assert_array_equal(np.asarray(tok.lookup(tok.variables, idx)), emb[idx])
  # The assignment is the cosine argmax against the saved codebook (an independent NumPy path).
  feats = np.asarray(_teacher_tokens(c, tok.variables["teacher"], images)).reshape(-1, 16)
  cos = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (
      emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(idx.ravel(), cos.argmax(1))


def _teacher_tokens(c, teacher_vars, images):
  from vqkd_jax.teachers.load import load_teacher
  return load_teacher(c.teacher).tokens(teacher_vars, images)
