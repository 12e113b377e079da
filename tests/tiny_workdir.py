"""Tiny trained pipelines in demo-style work directories, shared by tests/test_api.py and
tests/test_notebook.py: each is built once per pytest session (the paths live under the session's
tmp_path_factory).

  tiny_pipeline:  tokenizer/ (Cluster codes of a random one-block ViT teacher), pixel_decoder/,
                  ar/ and nar/, from the demo configs at runlocal size, shrunk, one step each on
                  synthetic data: the layout of a demo directory in seconds.
  tiny_t2i:       a multi-row demo layout for text-to-image: shared/teacher_clip (the runlocal
                  CLIP-style teacher at random initialisation, not trained) and vqkd_clip/ with
                  tiny_pipeline's tokenizer/ and pixel_decoder/ (links) and a one-step t2i/.
  runlocal_demo:  `vqkd demo --config configs/demo/demo.py:runlocal` (minutes on 2 CPU cores),
                  for the slow tests.
"""

from __future__ import annotations

import ml_collections

_BUILT = {}


def _shrink(c, steps: int = 1, batch: int = 8):
  with c.unlocked():
    c.data.synthetic = True
    c.batch_size = batch
    c.total_steps = c.checkpoint_every = steps
    c.eval_every = 0
  return c


def train_tiny_stage(name: str, workdir: str, tokenizer_workdir: str) -> None:
  """Trains the demo's `name` stage ("ar", "nar", "pixel_decoder") at runlocal size, shrunk to one
  step of batch 8 on synthetic data, on the tokenizer in `tokenizer_workdir`."""
  from vqkd_jax.config import load_config
  from vqkd_jax.train import loop

  arg = "runlocal=True,gan=False" if name == "pixel_decoder" else "runlocal=True"
  c = _shrink(load_config(f"configs/demo/{name}.py:{arg}"))
  with c.unlocked():
    c.tokenizer_workdir = str(tokenizer_workdir)
    if name in ("ar", "nar"):
      c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
  loop.train(c, str(workdir))


def train_tiny_cluster_tokenizer(workdir: str, *, patch_size: int = 4, width: int = 32,
                                 batch: int = 8) -> None:
  """One step of the demo's Cluster tokenizer (32 codes, runlocal size, synthetic data) over a
  random one-block ViT teacher of `patch_size` and `width`."""
  from vqkd_jax.config import load_config
  from vqkd_jax.train import loop

  tok = _shrink(load_config("configs/demo/cluster.py:runlocal=True"), batch=batch)
  with tok.unlocked():
    tok.teacher = ml_collections.ConfigDict(dict(
        kind="random_vit", patch_size=patch_size, width=width, depth=1, num_heads=2,
        image_size=32, out_dim=0))
    tok.model.num_codes = 32
  loop.train(tok, str(workdir))


def tiny_pipeline(tmp_path_factory):
  """A demo-style directory (tokenizer/, pixel_decoder/, ar/, nar/) of one-step stages: 32x32
  images, an 8x8 grid of 32 codes, 12 classes."""
  if "tiny" not in _BUILT:
    root = tmp_path_factory.mktemp("tiny_pipeline")
    train_tiny_cluster_tokenizer(root / "tokenizer")
    for name in ("pixel_decoder", "ar", "nar"):
      train_tiny_stage(name, root / name, root / "tokenizer")
    _BUILT["tiny"] = root
  return _BUILT["tiny"]


def random_like(tree, seed: int = 0, scale: float = 0.3):
  """Random float32 weights of the tree's shapes, N(0, scale) (norm scales N(1, scale)), so that
  every weight matters (unlike an initialisation's zeros and ones)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)

  def leaf(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(tree))


def random_clip_workdir(workdir, scale: float | None = None, seed: int = 2) -> None:
  """A teacher_clip stage's work directory without training: config.json and a checkpoint as the
  loop writes them (configs/demo/teacher_clip.py:runlocal), at random initialisation, or with
  `random_like(seed, scale)` weights when scale is given."""
  import os

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from vqkd_jax.config import load_config
  from vqkd_jax.train import checkpoint as ckpt_lib
  from vqkd_jax.train import teacher_clip
  from vqkd_jax.train.state import TrainState

  c = load_config("configs/demo/teacher_clip.py:runlocal")
  model = teacher_clip.build_model(c.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                               jnp.zeros((1, c.model.context_length), jnp.int32))["params"]
  if scale is not None:
    params = random_like(params, seed, scale)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, TrainState.create({"params": nn.meta.unbox(params)}, optax.identity(),
                                 jax.random.PRNGKey(0)))
  ckpt.close()


def tiny_t2i(tmp_path_factory):
  """<root>/shared/teacher_clip (random) and <root>/vqkd_clip/{tokenizer, pixel_decoder} (links to
  tiny_pipeline's) + t2i/ (configs/demo/t2i.py at runlocal size, width 32, one layer, one step of
  batch 8 on synthetic data; 12-token captions, an 8x8 grid of 32 codes). Returns <root>."""
  if "t2i" not in _BUILT:
    import os

    from vqkd_jax.config import load_config
    from vqkd_jax.train import loop

    tiny = tiny_pipeline(tmp_path_factory)
    root = tmp_path_factory.mktemp("tiny_t2i")
    random_clip_workdir(str(root / "shared" / "teacher_clip"))
    row = root / "vqkd_clip"
    row.mkdir()
    for stage in ("tokenizer", "pixel_decoder"):
      os.symlink(tiny / stage, row / stage)
    c = _shrink(load_config("configs/demo/t2i.py:runlocal=True"))
    with c.unlocked():
      c.tokenizer_workdir = str(row / "tokenizer")
      c.pixel_decoder_workdir = str(row / "pixel_decoder")
      c.text_encoder.workdir = str(root / "shared" / "teacher_clip")
      c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
      c.sampling.num_samples = 0
    loop.train(c, str(row / "t2i"))
    _BUILT["t2i"] = root
  return _BUILT["t2i"]


def runlocal_demo(tmp_path_factory):
  """The runlocal demo's work directory (its layout is configs/demo/demo.py's)."""
  if "demo" not in _BUILT:
    from vqkd_jax import cli

    root = tmp_path_factory.mktemp("runlocal_demo")
    rc = cli.main(["demo", "--workdir", str(root / "run"), "--config",
                   "configs/demo/demo.py:runlocal", f"--config.data_dir={root / 'data'}"])
    assert rc == 0
    _BUILT["demo"] = root / "run"
  return _BUILT["demo"]
