"""The `vqkd` command: one stage per subcommand, configs from files with command-line overrides.

  vqkd train    --config configs/demo/vqkd.py[:arg] --workdir DIR [--config.a.b=value ...]
  vqkd evaluate --config ... --workdir DIR        evaluate the newest checkpoint of a stage
  vqkd sample   --workdir DIR [--kind ar|nar] [--labels 0,1] [--cfg 1.75] [--out grid.png]
                | --kind t2i --prompts "a red circle at the top left;a blue square"
  vqkd bench    train|sample|pipeline --config ... [--steps N] | fid [--batch 256 --mode exact]
  vqkd convert  inception SRC.pth OUT.npz | lpips VGG16.pth OUT --lin vgg.pth   PyTorch weights, converted once
  vqkd demo     [--workdir runs/demo] [--config configs/demo/demo.py[:arg]]
  vqkd data     prepare [--image_size 32] | prepare-imagenet --manual_dir DIR |
                convert-folder SRC OUT --name NAME |
                pretokenize --tokenizer WORKDIR --out DIR [--crops 5] [--no_flip]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vqkd_jax.config import ConfigError, load_config_with_overrides

DEFAULT_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "configs", "demo", "demo.py")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=value` (or `--config.a.b value`) overrides from other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"override {arg} has no value")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="vqkd", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train one stage")
  t.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  t.add_argument("--workdir", required=True)

  e = sub.add_parser("evaluate", help="evaluate a stage's newest checkpoint")
  e.add_argument("--config", required=True)
  e.add_argument("--workdir", required=True)

  s = sub.add_parser("sample", help="sample images from a demo work directory or a proposal stage")
  s.add_argument("--workdir", required=True,
                 help="a demo-style work directory (some of ar/, nar/, t2i/) or an ar, nar or t2i "
                 "stage's")
  s.add_argument("--kind", default=None, choices=["ar", "nar", "t2i"],
                 help="which proposal network of a demo directory (default: t2i with --prompts, "
                 "else the first of ar, nar there)")
  s.add_argument("--row", default=None,
                 help="which row of a multi-row demo directory (default: vqkd_clip)")
  s.add_argument("--steps", type=int, default=None,
                 help="nar: decoding steps (default: the stage config's sampling.steps)")
  s.add_argument("--choice_temperature", type=float, default=None,
                 help="nar: initial Gumbel temperature of the confidence (default: the config's)")
  s.add_argument("--decoder", default=None,
                 help="pixel decoder work directory (default: the sibling pixel_decoder/)")
  s.add_argument("--labels", default="", help="ar / nar: comma-separated class ids (default: "
                 "every class)")
  s.add_argument("--prompts", default="",
                 help="t2i: text prompts separated by semicolons ';' (commas may appear inside a "
                 "prompt; spaces around each prompt are dropped), e.g. \"a red circle at the top "
                 "left;a blue square\"; one grid row per prompt")
  s.add_argument("--per_label", type=int, default=8,
                 help="samples per label (ar / nar) or per prompt (t2i): the grid's columns")
  s.add_argument("--cfg", type=float, default=1.75)
  s.add_argument("--temperature", type=float, default=1.0)
  s.add_argument("--top_k", type=int, default=0)
  s.add_argument("--top_p", type=float, default=1.0)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--out", default=None,
                 help="PNG path (default: <workdir>/sampled_<kind>_seed<seed>.png)")

  b = sub.add_parser("bench", help="time a stage's training step or sampling")
  b.add_argument("what", choices=["train", "sample", "pipeline", "fid"],
                 help="train: one stage's update step; sample: AR or NAR sampling (by the "
                 "config's stage); pipeline: every stage "
                 "of a demo config for --steps steps on the built-in data; fid: the FID Inception "
                 "forward (random weights) and the Frechet distance")
  b.add_argument("--config", default=None, help="required except for fid")
  b.add_argument("--batch", type=int, default=256, help="fid: batch size")
  b.add_argument("--mode", default="exact", choices=["exact", "fast", "tf32", "bf16"],
                 help="fid: float32 exact, float16 (fast), TF32 matmuls, or bfloat16")
  b.add_argument("--drift_images", type=int, default=5000,
                 help="fid, modes other than exact: images per set of the FID drift against exact "
                 "(0: skip)")
  b.add_argument("--steps", type=int, default=20)
  b.add_argument("--rows", default="",
                 help="pipeline: comma-separated rows of the demo config (default: every row)")
  b.add_argument("--peak_tflops", type=float, default=780.0,
                 help="measured bf16 peak per device for MFU (H100: ~780)")

  cv = sub.add_parser("convert", help="convert PyTorch weights once (read without torch or pickle)")
  cv.add_argument("what", choices=["inception", "lpips"])
  cv.add_argument("src", help="inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "
                  "lpips: torchvision's vgg16-397923af.pth")
  cv.add_argument("out", help="converted file (.npz or .msgpack)")
  cv.add_argument("--lin", default=None, help="lpips: the lpips package's weights/v0.1/vgg.pth")

  d = sub.add_parser("demo", help="the walking skeleton on the built-in dataset, stage by stage")
  d.add_argument("--workdir", default="runs/demo")
  d.add_argument("--config", default=DEFAULT_DEMO_CONFIG)

  dt = sub.add_parser("data", help="prepare or convert datasets")
  dsub = dt.add_subparsers(dest="data_command", required=True)
  prep = dsub.add_parser("prepare", help="prepare the built-in dataset")
  prep.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  prep.add_argument("--image_size", type=int, default=32)
  inet = dsub.add_parser("prepare-imagenet", help="imagenet2012 from a tfds manual directory")
  inet.add_argument("--manual_dir", required=True, help="holds ILSVRC2012_img_{train,val}.tar")
  inet.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  conv = dsub.add_parser("convert-folder", help="folder of class subfolders -> ArrayRecord")
  conv.add_argument("src")
  conv.add_argument("out")
  conv.add_argument("--name", required=True)
  conv.add_argument("--image_size", type=int, default=0)
  tok = dsub.add_parser("pretokenize", help="a frozen tokenizer's codes of a dataset -> ArrayRecord")
  tok.add_argument("--tokenizer", required=True, help="work directory of a tokenizer stage")
  tok.add_argument("--out", required=True)
  tok.add_argument("--data", default="shapes", help="dataset name (as config.data.name)")
  tok.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  tok.add_argument("--image_size", type=int, default=0, help="default: the tokenizer's")
  tok.add_argument("--crops", type=int, default=1, choices=[1, 5])
  tok.add_argument("--no_flip", action="store_true")
  tok.add_argument("--batch_size", type=int, default=256)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "etils", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  except Exception:
    pass
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    return _run(args, overrides)
  except ConfigError as e:
    print(f"vqkd: error: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:
    print(f"vqkd: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # Known failure kinds get one line; others keep their traceback.
    from vqkd_jax.train.checkpoint import CheckpointError
    from vqkd_jax.train.loop import NonFiniteLossError
    if isinstance(e, (CheckpointError, NonFiniteLossError)):
      print(f"vqkd: error: {e}", file=sys.stderr)
      return 1
    raise


def _run(args, overrides: list[str]) -> int:
  if args.command in ("train", "evaluate", "bench", "demo"):
    from vqkd_jax.parallel import distributed
    distributed.initialize()  # Multi-process runs started by launch/ (no-op otherwise).
  if args.command == "train":
    config = load_config_with_overrides(args.config, overrides)
    from vqkd_jax.train.loop import train
    train(config, args.workdir)
    return 0
  if args.command == "evaluate":
    config = load_config_with_overrides(args.config, overrides)
    from vqkd_jax.train.evaluate import evaluate_workdir
    metrics = evaluate_workdir(config, args.workdir)
    for k, v in metrics.items():
      print(f"{k}: {v}")
    return 0
  if args.command == "sample":
    from vqkd_jax.api import Generator, SamplingError
    from vqkd_jax.evaluation.images import save_grid
    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    if args.prompts and not prompts:
      raise ConfigError(f"--prompts {args.prompts!r} holds no prompt (separate them with ';')")
    if prompts and args.labels:
      raise ConfigError("pass --labels (ar / nar) or --prompts (t2i), not both")
    kind = args.kind or ("t2i" if prompts else None)
    try:
      gen = Generator.from_checkpoint(args.workdir, kind=kind, row=args.row,
                                      decoder=args.decoder)
      if gen.kind == "t2i" and not prompts:
        raise ConfigError("t2i samples from text prompts: pass --prompts \"a red circle;a blue "
                          "square\" (separated by ';')")
      if prompts:
        conditions = prompts            # strings for an ar / nar generator: its SamplingError
      else:
        try:
          conditions = ([int(x) for x in args.labels.split(",")] if args.labels
                        else list(range(gen.num_classes)))
        except ValueError as e:
          raise ConfigError(f"--labels takes comma-separated class ids, got {args.labels!r}") from e
      labels = [l for l in conditions for _ in range(args.per_label)]
      images = gen.sample(labels, cfg_scale=args.cfg, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, steps=args.steps,
                          choice_temperature=args.choice_temperature)
    except SamplingError as e:        # a wrong kind, label or setting: one line
      raise ConfigError(str(e)) from e
    # Not samples_<kind>.png: the demo's report writes that one beside its table.
    out = args.out or os.path.join(args.workdir, f"sampled_{gen.kind}_seed{args.seed}.png")
    save_grid(images, out, ncols=args.per_label)
    print(f"wrote {len(images)} samples to {out}")
    if prompts:                     # one grid row per prompt
      print("".join(f"row {i}: {p}\n" for i, p in enumerate(prompts)), end="")
    return 0
  if args.command == "bench":
    from vqkd_jax import bench
    if args.what == "fid":
      print(bench._table([bench.bench_fid(batch=args.batch, mode=args.mode, steps=args.steps,
                                          peak_tflops=args.peak_tflops,
                                          drift_images=args.drift_images)]))
      return 0
    if args.config is None:
      raise ConfigError(f"vqkd bench {args.what} needs --config")
    config = load_config_with_overrides(args.config, overrides)
    bench.main(args.what, config, steps=args.steps, peak_tflops=args.peak_tflops,
               rows=tuple(r for r in args.rows.split(",") if r))
    return 0
  if args.command == "convert":
    if args.what == "lpips":
      from vqkd_jax.evaluation.lpips import convert_lpips
      from vqkd_jax.io.torch_pth import UnsafePickleError
      if not args.lin:
        raise ConfigError("vqkd convert lpips needs --lin LIN.pth: LPIPS's linear heads, "
                          "lpips/weights/v0.1/vgg.pth inside the `lpips` package (pip install "
                          "lpips==0.1.4, or unzip its wheel from `pip download lpips==0.1.4 "
                          "--no-deps`)")
      try:
        print(f"wrote {convert_lpips(args.src, args.lin, args.out)}")
      except (ValueError, UnsafePickleError) as e:   # keys/shapes that do not fit, unsafe .pth
        raise ConfigError(str(e)) from e
      return 0
    from vqkd_jax.evaluation.inception import convert_inception_file
    print(f"wrote {convert_inception_file(args.src, args.out)}")
    return 0
  if args.command == "demo":
    from vqkd_jax import demo
    return demo.run(args.workdir, args.config, overrides)
  if args.command == "data":
    if args.data_command == "prepare":
      from vqkd_jax.data.shapes_builder import prepare_main
      prepare_main(args.data_dir, args.image_size)
      return 0
    if args.data_command == "prepare-imagenet":
      from vqkd_jax.data.imagenet import prepare_imagenet
      prepare_imagenet(args.data_dir, args.manual_dir)
      return 0
    if args.data_command == "pretokenize":
      from vqkd_jax.data.pipeline import load_dataset
      from vqkd_jax.data.pretokenize import pretokenize
      from vqkd_jax.tokenizers.frozen import load_frozen_tokenizer
      tokenizer = load_frozen_tokenizer(args.tokenizer)
      size = args.image_size or tokenizer.image_size
      splits, _ = load_dataset(args.data, args.data_dir, size)
      meta = pretokenize(tokenizer, splits["train"], args.out, image_size=size, crops=args.crops,
                         flip=not args.no_flip, batch_size=args.batch_size,
                         tokenizer_workdir=os.path.abspath(args.tokenizer))
      print(f"wrote {meta['count']} x {meta['views']} views of {meta['grid']} codes to {args.out}")
      return 0
    from vqkd_jax.data.image_folder import convert_image_folder
    summary = convert_image_folder(args.src, args.out, args.name, image_size=args.image_size or None)
    print(summary)
    return 0
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
