"""The walking skeleton on the built-in dataset: every stage's config, and the report's settings.

  vqkd demo --workdir runs/demo                      # about 10 minutes on 2 CPU cores
  vqkd demo --workdir runs/tiny --config configs/demo/demo.py:runlocal   # seconds (tests)
  vqkd bench pipeline --config configs/demo/demo.py:precision=bfloat16 --steps 30   # GPU step times

Override a stage's field with its group name: --config.ar.total_steps=2000.
"""

import os

import ml_collections

from vqkd_jax.config import load_config, parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, image_size=32, precision="float32")
  sub = f"runlocal={arg.runlocal},image_size={arg.image_size}"
  c = ml_collections.ConfigDict()
  c.data_dir = os.path.expanduser("~/tensorflow_datasets")
  for name, file in (("teacher", "teacher.py"), ("evaluator", "evaluator.py"),
                     ("tokenizer", "vqkd.py"), ("pixel_decoder", "pixel_decoder.py"),
                     ("ar", "ar.py")):
    c[name] = load_config(os.path.join(HERE, f"{file}:{sub}"))
    c[name].precision = arg.precision
  c.report = ml_collections.ConfigDict(dict(
      num_samples=64 if arg.runlocal else 1000, cfg_scale=1.75, temperature=1.0, top_k=0,
      top_p=1.0, seed=0))
  return c
