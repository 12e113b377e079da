"""GAN-trained tokenizers: the PatchGAN against a PyTorch reference, hinge losses in closed form, the
adaptive weight and one GAN step's gradients against a second code path, and the two optimizers."""

import functools
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqkd_jax.config import load_config
from vqkd_jax.nn.patchgan import PatchGAN
from vqkd_jax.parallel import xla_options
from vqkd_jax.train import gan as gan_lib
from vqkd_jax.train.common import to_unit_range

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_hinge_and_generator_losses_closed_form():
  real = jnp.array([[2.0, 0.5], [-1.0, 0.0]])
  fake = jnp.array([[-2.0, 0.5], [1.0, -0.25]])
  # relu(1 - real): [0, .5, 2, 1]; relu(1 + fake): [0, 1.5, 2, .75] -> mean of sums / 2
  expected = np.mean((np.array([0, .5, 2, 1]) + np.array([0, 1.5, 2, .75])) / 2)
  np.testing.assert_allclose(gan_lib.hinge_discriminator_loss(real, fake), expected, rtol=1e-6)
  np.testing.assert_allclose(gan_lib.generator_loss(fake), -np.mean(np.asarray(fake)), rtol=1e-6)
  g1, g2 = jnp.full((3, 3), 2.0), jnp.full((3, 3), 1.0)
  np.testing.assert_allclose(gan_lib.adaptive_weight(g1, g2, 0.75), 0.75 * 6 / (3 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(gan_lib.adaptive_weight(g1, 0 * g2, 1.0), 1e4)  # clipped


def test_patchgan_matches_torch_reference():
  torch = pytest.importorskip("torch")
  nn_t = torch.nn

  def torch_patchgan(width, depth):  # taming's NLayerDiscriminator, written from its description
    layers = [nn_t.Conv2d(3, width, 4, 2, 1), nn_t.LeakyReLU(0.2)]
    for n in range(1, depth + 1):
      cin, cout = width * min(2 ** (n - 1), 8), width * min(2 ** n, 8)
      layers += [nn_t.Conv2d(cin, cout, 4, 2 if n < depth else 1, 1, bias=False),
                 nn_t.BatchNorm2d(cout), nn_t.LeakyReLU(0.2)]
    layers += [nn_t.Conv2d(width * min(2 ** depth, 8), 1, 4, 1, 1)]
    return nn_t.Sequential(*layers)

  width, depth = 8, 2
  model = PatchGAN(width=width, depth=depth)
  x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  variables = flax.linen.unbox(model.init(jax.random.PRNGKey(0), x, train=False))
  params = variables["params"]
  ref = torch_patchgan(width, depth)
  convs = [m for m in ref if isinstance(m, nn_t.Conv2d)]
  norms = [m for m in ref if isinstance(m, nn_t.BatchNorm2d)]
  with torch.no_grad():
    for i, m in enumerate(convs):
      name = f"conv{i}" if i < len(convs) - 1 else "conv_out"
      m.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1)))
      if m.bias is not None:
        m.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    for i, m in enumerate(norms):
      m.weight.copy_(torch.tensor(np.asarray(params[f"norm{i + 1}"]["scale"])))
      m.bias.copy_(torch.tensor(np.asarray(params[f"norm{i + 1}"]["bias"])))
  ref.train()
  with torch.no_grad():
    want = ref(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got, new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # Running statistics follow torch's momentum 0.1 (unbiased variance in torch; flax: biased).
  np.testing.assert_allclose(np.asarray(new_state["batch_stats"]["norm1"]["mean"]),
                             norms[0].running_mean.numpy(), rtol=1e-4, atol=1e-6)


def _vqgan_setup(start=0, adaptive=True):
  from vqkd_jax.train import stages

  c = load_config(os.path.join(CONFIGS, "demo/vqgan.py:runlocal"))
  c.data.synthetic = True
  c.gan.start = start
  c.gan.adaptive = adaptive
  obj = stages.make_objective(c, workdir="", axis_name=None)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
           "label": jnp.zeros((8,), jnp.int32)}
  # Compiled (as train/loop's initialiser is): op by op, each distinct op would compile alone.
  init = xla_options.jit_with_options(obj.init, xla_options.FAST_COMPILE)
  variables = flax.linen.unbox(init(jax.random.PRNGKey(0), batch))
  params = variables.pop("params")
  return c, obj, params, variables, batch


def _reference_gradients(c, params, model_state, batch, active):
  """The GAN step's gradients by a second path: the generator loss with the discriminator held
  constant and lambda from full jax.grad w.r.t. the decoder's last kernel through the whole
  tokenizer; the discriminator's hinge loss on the fixed reconstruction. One compiled program."""
  from vqkd_jax.train.vqgan import build_model

  model = build_model(c.model)
  disc = gan_lib.build_discriminator(c.gan)
  return jax.jit(functools.partial(_reference_program, c, model, disc))(
      params, model_state, batch["image"], active)


def _reference_program(c, model, disc, params, model_state, image, active):
  x = to_unit_range(image)
  d_state = {"batch_stats": model_state["batch_stats"]["discriminator"]}
  d_params = params["discriminator"]

  def forward(tok_params):
    return model.apply({"params": tok_params}, x, train=True)

  def d_logits(dp, images):
    return disc.apply({"params": dp, **d_state}, images, train=True, mutable=["batch_stats"])[0]

  def with_kernel(kernel, fn):
    tp = jax.tree.map(lambda a: a, params["tokenizer"])
    tp["decoder"]["conv_out"]["kernel"] = kernel
    return fn(forward(tp)["recon"])

  rec = lambda r: jnp.mean(jnp.abs(r - x))
  gan = lambda r: -jnp.mean(d_logits(d_params, r))
  kernel = params["tokenizer"]["decoder"]["conv_out"]["kernel"]
  gr = jax.grad(lambda k: with_kernel(k, rec))(kernel)
  gg = jax.grad(lambda k: with_kernel(k, gan))(kernel)
  lam = jnp.clip(jnp.linalg.norm(gr) / (jnp.linalg.norm(gg) + 1e-4), 0, 1e4) * c.gan.adaptive_gain
  if not c.gan.adaptive:
    lam = jnp.float32(1.0)

  def g_loss(tok_params):
    out = forward(tok_params)
    return out["quantizer_loss"] + rec(out["recon"]) + active * lam * gan(out["recon"])

  recon = forward(params["tokenizer"])["recon"]

  def d_loss(dp):
    return active * gan_lib.hinge_discriminator_loss(d_logits(dp, x), d_logits(dp, recon))

  return jax.grad(g_loss)(params["tokenizer"]), jax.grad(d_loss)(d_params), lam


@pytest.mark.parametrize("start,adaptive", [
    (0, True), pytest.param(0, False, marks=pytest.mark.slow), (5, True)])
def test_one_gan_step_gradients_reach_only_their_player(start, adaptive):
  c, obj, params, model_state, batch = _vqgan_setup(start, adaptive)
  active = float(start == 0)
  (loss, (metrics, new_state)), grads = jax.jit(
      jax.value_and_grad(obj.loss, has_aux=True), static_argnums=5)(
      params, model_state, obj.frozen, batch, jax.random.PRNGKey(1), True)
  want_g, want_d, lam = _reference_gradients(c, params, model_state, batch, active)
  for got, want in ((grads["tokenizer"], want_g), (grads["discriminator"], want_d)):
    # Leaves whose gradient is zero in exact arithmetic (attention key biases: softmax ignores a
    # shift shared by all keys; conv biases right before a GroupNorm) hold float32 rounding noise
    # (1e-10 to 1e-6 of the player's largest gradient, by evaluation order and CPU): both sides
    # must be noise there; every other leaf is compared at its own scale.
    player = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want)) + 1e-12
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
      scale = float(np.max(np.abs(b)))
      if scale < 1e-5 * player:
        assert float(np.max(np.abs(a))) < 1e-5 * player, name
        continue
      np.testing.assert_allclose(a / scale, b / scale, atol=2e-4, err_msg=name)
  if active:
    np.testing.assert_allclose(float(metrics["gan/adaptive_weight"]), float(lam), rtol=1e-3)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["discriminator"]))
  else:
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["discriminator"]))
  assert int(new_state["gan"]["step"]) == 1


def test_update_step_uses_each_players_optimizer(tmp_path):
  """Adam's first step moves every parameter with a nonzero gradient by its group's learning rate;
  the frozen perceptual network and everything outside params stay out of the optimizer."""
  from vqkd_jax.train.loop import setup

  c = load_config(os.path.join(CONFIGS, "demo/vqgan.py:runlocal"))
  c.data.synthetic = True
  c.optimizer.lr, c.disc_optimizer.lr = 1e-3, 7e-3
  t = setup(c)
  before = jax.device_get(t.state.params)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (c.batch_size, 32, 32, 3), dtype=np.uint8),
           "label": np.zeros((c.batch_size,), np.int32)}
  state, _ = t.update_fn(t.state, t.put_batch(batch), t.frozen)
  after = jax.device_get(state.params)
  for group, lr in (("tokenizer", 1e-3), ("discriminator", 7e-3)):
    deltas = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree.leaves(after[group]), jax.tree.leaves(before[group]))])
    moved = deltas[deltas > lr * 1e-3]
    assert moved.size > 0.5 * deltas.size, group
    np.testing.assert_allclose(np.median(moved), lr, rtol=0.05, err_msg=group)
  assert int(state.model_state["gan"]["step"]) == 1


def test_disc_optimizer_without_discriminator_is_an_error():
  from vqkd_jax.train.optimizers import make_stage_optimizer

  c = load_config(os.path.join(CONFIGS, "demo/vqgan.py:runlocal"))
  with pytest.raises(ValueError, match="no 'discriminator'"):
    make_stage_optimizer(c, ["decoder"])
