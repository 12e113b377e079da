"""VQGAN / FSQ tokenizers: the trunk's shapes at demo and ImageNet size, encode/decode against the
training call (a second path), the stage through the loop and as a frozen tokenizer."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax import quantizers
from vqkd_jax.config import load_config
from vqkd_jax.train import vqgan as vqgan_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _images(n=4, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_demo_tokenizer_encode_decode_agree_with_training_call(quantizer):
  c = load_config(os.path.join(CONFIGS, f"demo/vqgan.py:quantizer={quantizer}"))
  model = vqgan_stage.build_model(c.model)
  x = _images()
  v = nn.unbox(model.init(jax.random.PRNGKey(0), x))
  out = model.apply(v, x, train=False)
  assert out["recon"].shape == x.shape and out["indices"].shape == (4, 8, 8)
  idx = model.apply(v, x, method="encode")
  np.testing.assert_array_equal(idx, out["indices"])
  np.testing.assert_allclose(model.apply(v, idx, method="decode"), out["recon"], atol=1e-4)
  assert int(idx.max()) < model.vocab_size
  if quantizer == "fsq":
    assert model.vocab_size == 240 and model.codes_dim == 3
    codes = model.apply(v, idx, method="lookup")
    # Every code is on the FSQ grid: digit / (L // 2) - 1 with digit in [0, L).
    half = np.array([4, 3, 2])
    digits = (np.asarray(codes) + 1) * half
    np.testing.assert_allclose(digits, np.round(digits), atol=1e-5)
    np.testing.assert_array_equal(quantizers.fsq_codes_to_indices(codes, (8, 6, 5)), idx)


@pytest.mark.parametrize("codes,grid_dim", [(8192, 256), (8000, 5), (64000, 6)])
def test_imagenet_configs_build_the_upstream_trunk(codes, grid_dim):
  c = load_config(os.path.join(CONFIGS, f"imagenet/vqgan.py:codes={codes}"))
  model = vqgan_stage.build_model(c.model)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0], x)
  assert out["indices"].shape == (1, 16, 16) and out["recon"].shape == (1, 256, 256, 3)
  assert model.vocab_size == codes and model.codes_dim == grid_dim
  params = jax.eval_shape(lambda x: nn.unbox(model.init(jax.random.PRNGKey(0), x))["params"], x)
  n = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
  n -= 8192 * 256 if codes == 8192 else 0   # the codebook
  # The same f16 trunk (taming / LlamaGen VQ-16 encoder and decoder): LlamaGen reports 72M.
  assert 71.5e6 < n < 72.5e6, n


@pytest.mark.slow  # 70 s; the demo fixture (tests/test_demo.py) trains a VQGAN stage, loads it frozen
def test_vqgan_stage_trains_and_loads_as_frozen_tokenizer(tmp_path):
  from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
  from vqkd_jax.train.loop import train

  c = load_config(os.path.join(CONFIGS, "demo/vqgan.py:runlocal,quantizer=fsq"))
  c.data.synthetic = True
  c.total_steps, c.eval_every = 3, 0
  result = train(c, str(tmp_path / "fsq"))
  assert result.steps_run == 3 and np.isfinite(result.history[-1]["loss"])
  tok = load_frozen_tokenizer(str(tmp_path / "fsq"))
  assert tok.stage == "vqgan" and tok.num_codes == 240 and tok.grid() == (8, 8)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  idx = tok.encode(tok.variables, images)
  assert idx.shape == (2, 8, 8)
  decoded = tok.decode(tok.variables, idx)
  assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == jnp.uint8
