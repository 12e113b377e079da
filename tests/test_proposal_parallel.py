"""The AR proposal network under the dp, fsdp and fsdp_tp strategies on 8 simulated CPU devices: training
computes the same function as on one device (losses and parameters), and sampled tokens depend on
the seed, not on the number of devices or on how the batch is split over them (a batch split over
devices is sampled on each device's rows)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, devices: int = 8, timeout: int = 600) -> None:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]


def test_ar_strategies_match_one_device_and_samples_ignore_the_device_count(tmp_path):
  out = tmp_path / "results.npz"
  _run(f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from vqkd_jax.config import load_config
      from vqkd_jax.proposal import sampling
      from vqkd_jax.proposal.sampling import sample
      from vqkd_jax.train import ar as ar_stage
      from vqkd_jax.train import loop

      results = {{}}
      runs = [("single", "dp", 1, {{}}), ("dp", "dp", 8, {{}}), ("fsdp", "fsdp", 8, {{}}),
              ("fsdp_tp", "fsdp_tp", 8, {{"fsdp": 4, "tensor": 2}})]  # tp: in fsdp_tp
      for name, strategy, n, mesh in runs:
        c = load_config("configs/imagenet/ar.py:runlocal,variant=llama")
        with c.unlocked():
          c.total_steps, c.batch_size, c.checkpoint_every = 3, 16, 100
          c.parallel.strategy, c.parallel.num_devices = strategy, n
          for k, v in mesh.items():
            c.parallel.mesh[k] = v
        r = loop.train(c, "{tmp_path}/" + name)
        results[name + "/loss"] = np.array([h["loss"] for h in r.history])
        for path, leaf in jax.tree_util.tree_leaves_with_path(r.state.params):
          results[name + "/" + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
        if name == "single":
          params = jax.device_get(r.state.params)

      # Sampling: the same labels and seed on one device, and with the batch split over 8.
      g = c.bench.grid
      model = ar_stage.build_model(c.model, num_classes=c.data.num_classes,
                                   codebook_size=c.bench.codebook_size, num_image_tokens=g * g,
                                   precision="float32")
      labels = np.arange(16) % 7
      kw = dict(num_image_tokens=g * g, num_classes=c.data.num_classes,
                codebook_size=c.bench.codebook_size, rng=jax.random.PRNGKey(5), cfg_scale=1.75,
                temperature=1.0, top_k=20, top_p=0.9)
      one = jax.devices()[:1]
      results["tokens/1"] = np.asarray(sample(model, jax.device_put(params, one[0]),
                                              jax.device_put(labels, one[0]), **kw))
      mesh8 = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      split = jax.device_put(labels, NamedSharding(mesh8, P("data")))
      assert sampling.batch_split(split)[1] == "data" and sampling.batch_split(labels) is None
      results["tokens/8"] = np.asarray(sample(
          model, jax.device_put(params, NamedSharding(mesh8, P())), split, **kw))
      # Each device's rows through the Pallas step kernels (interpret mode here), the norms folded
      # and the filtered draw: kernels XLA cannot partition, run on the local rows only.
      results["tokens/8_pallas"] = np.asarray(sample(
          model.clone(decode_step="pallas"), params, split, decode_kernels="folded",
          draw="pallas", **kw))
      # Half the labels as their own batch (example_offset keeps each sample's stream).
      results["tokens/half"] = np.asarray(sample(model, params, labels[8:], example_offset=8,
                                                 **kw))
      np.savez("{out}", **results)
  """)
  res = dict(np.load(out))
  single = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith("single/")}
  assert len(single["loss"]) == 3 and np.all(np.isfinite(single["loss"]))
  assert len(single) > 10   # every parameter is compared, not only the loss
  for strategy in ("dp", "fsdp", "fsdp_tp"):
    for key, ref in single.items():
      np.testing.assert_allclose(res[f"{strategy}/{key}"], ref, rtol=2e-4, atol=2e-5,
                                 err_msg=f"{strategy} {key}")
  np.testing.assert_array_equal(res["tokens/8"], res["tokens/1"])
  np.testing.assert_array_equal(res["tokens/8_pallas"], res["tokens/1"])
  np.testing.assert_array_equal(res["tokens/half"], res["tokens/1"][8:])
  assert len(np.unique(res["tokens/1"])) > 5   # not a degenerate constant sample


@pytest.mark.slow  # 43 s; test_api's device-split test covers the T2I generator (prefix AR)
def test_text_conditioned_samples_split_over_devices_equal_one_device(tmp_path):
  """Text-to-image sampling (AR and NAR, prefix and cross-attention conditioning) of captions
  whose rows are split over 8 devices gives the tokens of one device: AR decodes each device's
  rows (the prefix, context and mask split, the null condition replicated), NAR through XLA's
  partitioner."""
  out = tmp_path / "tokens.npz"
  _run(f"""
      import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from vqkd_jax.proposal import nar as nar_lib, sampling, t2i as t2i_lib
      from vqkd_jax.proposal.ar import ARTransformer
      from vqkd_jax.proposal.nar import NARTransformer

      mesh8 = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      split = lambda a: jax.device_put(a, NamedSharding(mesh8, P("data")))
      rng = np.random.default_rng(0)
      b, text_len, text_dim, codebook, n = 16, 5, 7, 24, 9
      states = jnp.asarray(rng.normal(size=(b, text_len, text_dim)), jnp.float32)
      mask = jnp.asarray(np.arange(text_len)[None] < rng.integers(2, text_len + 1, b)[:, None])
      results = {{}}
      for proposal in ("ar", "nar"):
        for conditioning in ("prefix", "cross_attention"):
          cross = conditioning == "cross_attention"
          seq_len = (1 if cross else text_len) + n
          if proposal == "ar":
            net = ARTransformer(vocab_size=codebook, seq_len=seq_len, width=32, depth=2,
                                num_heads=2, flavour="llama", cross_attention=cross)
            model = t2i_lib.TextConditionedAR(net, text_len, conditioning)
          else:
            net = NARTransformer(num_classes=0, codebook_size=codebook, seq_len=seq_len,
                                 width=32, depth=2, num_heads=2, cross_attention=cross)
            model = t2i_lib.TextConditionedNAR(net, text_len, conditioning)
          variables = nn.unbox(model.init(jax.random.PRNGKey(1), states[:1], mask[:1],
                                          jnp.zeros((1, n), jnp.int32)))
          variables = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
              jax.random.PRNGKey(x.size), x.shape, x.dtype), variables)  # no zero heads
          inputs = model.apply(variables, states, mask, method="sampling_inputs")
          params = variables["params"]["transformer"]
          if proposal == "ar":
            run = lambda **kw: sampling.sample_from_prefix(
                net, params, rng=jax.random.PRNGKey(3), num_image_tokens=n,
                codebook_size=codebook, cfg_scale=1.75, top_k=10, top_p=0.9, **kw)
          else:
            run = lambda **kw: nar_lib.sample_from_prefix(
                net, params, rng=jax.random.PRNGKey(3), steps=3, cfg_scale=1.75, **kw)
          key = proposal + "/" + conditioning
          results[key + "/1"] = np.asarray(run(**inputs))
          rows = {{k: split(v) if k in ("prefix", "context", "context_mask") and v is not None
                  else v for k, v in inputs.items()}}
          assert sampling.batch_split(rows["prefix"]) is not None
          results[key + "/8"] = np.asarray(run(**rows))
      np.savez("{out}", **results)
  """)
  res = dict(np.load(out))
  assert len(res) == 8
  for key in res:
    if key.endswith("/1"):
      assert len(np.unique(res[key])) > 5, key   # the tokens depend on the network and captions
      np.testing.assert_array_equal(res[key[:-2] + "/8"], res[key], err_msg=key)
