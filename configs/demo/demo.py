"""The paper in a box: every tokenizer row of the paper's table, trained and measured on the
built-in dataset with nothing downloaded.

  vqkd demo --workdir runs/demo                                    # one seed, 2 CPU cores (see STEPS)
  vqkd demo --workdir runs/demo --config configs/demo/demo.py:seeds=3   # 3 seeds, verdicts with spread
  vqkd demo --workdir runs/demo_gpu --config configs/demo/demo.py:gpu   # larger study, one GPU
  vqkd demo --workdir runs/tiny --config configs/demo/demo.py:runlocal  # seconds (tests)
  vqkd demo --workdir runs/gpu_check --config configs/demo/demo.py:gpu,runlocal=True  # GPU check

Shared stages, trained once (`<workdir>/shared/<stage>`): the four in-the-box teachers (supervised
ViT, MAE-, CLIP- and DINO-style), the perceptual network of the GAN-trained decoders, and the
evaluator network whose features FD_eval uses. Rows (`<workdir>/<row>/<stage>`):

  vqgan      VQGAN (pixel reconstruction + perceptual + PatchGAN)       AR, NAR, T2I
  fsq        FSQ on the same trunk                                      AR, NAR
  vqkd_clip  VQ-KD distilled from the CLIP-style teacher + pixel decoder  AR, NAR, T2I
  vqkd_vit / vqkd_dino / vqkd_mae   VQ-KD from the other teachers + pixel decoder   AR, NAR
  cluster    Cluster: the CLIP-style teacher's tokens clustered (as upstream's Cluster, on CLIP)
             + pixel decoder                                              AR, NAR

T2I (captions through the CLIP-style teacher's text tower) runs on the VQGAN and VQ-KD_CLIP rows,
the pair the paper's text-to-image comparison turns on. Each stage's config is its own file's
(configs/demo/<stage>.py), with the steps of the size variant below (warm-up and GAN start scaled
with them). Override a field with its path: --config.rows.vqgan.ar.total_steps=2000,
--config.shared.evaluator.total_steps=500, --config.report.num_samples=2000.

Variants: `seeds=N` repeats every stage but the evaluator (the measuring instrument, shared so that
FD_eval stays comparable) N times with seed + r (repeat r > 0 in `<workdir>/seed<r>/`), then reports
mean +- std and a verdict per seed and overall. `gpu`: 64x64 images (16x16 tokens, as the paper's
256 / 16), every stage with more steps, wider proposal networks, 5,000 samples per FD_eval.
"""

import os

import ml_collections

from vqkd_jax.config import load_config, parse_arg, scale_steps

HERE = os.path.dirname(os.path.abspath(__file__))

# Shared stages: key -> config file (the key is also the directory under <workdir>/shared).
SHARED = (("teacher_vit", "teacher.py"), ("teacher_mae", "teacher_mae.py"),
          ("teacher_clip", "teacher_clip.py"), ("teacher_dino", "teacher_dino.py"),
          ("perceptual", "perceptual.py"), ("evaluator", "evaluator.py"))

# Rows: key, table label, tokenizer config (file, arg), shared teacher, with T2I.
ROWS = (
    ("vqgan", "VQGAN", ("vqgan.py", "quantizer=vq"), "", True),
    ("fsq", "FSQ", ("vqgan.py", "quantizer=fsq"), "", False),
    ("vqkd_clip", "VQ-KD_CLIP", ("vqkd.py", "teacher=clip"), "teacher_clip", True),
    ("vqkd_vit", "VQ-KD_ViT", ("vqkd.py", "teacher=vit"), "teacher_vit", False),
    ("vqkd_dino", "VQ-KD_DINO", ("vqkd.py", "teacher=dino"), "teacher_dino", False),
    ("vqkd_mae", "VQ-KD_MAE", ("vqkd.py", "teacher=mae"), "teacher_mae", False),
    ("cluster", "Cluster_CLIP", ("cluster.py", ""), "teacher_clip", False),
)

# Steps and batch sizes per stage (shared keys, and row stages by kind). "default" is meant for 20
# minutes on 2 CPU cores; measured with these budgets (5 Dec 2026, nothing else running): 18:24,
# the stages 13:55 two at a time (teachers 80-117 s each, tokenizers 47-77 s, pixel decoders
# 30-42 s, AR 30-35 s, NAR 30-44 s, T2I 41-42 s) and the report 4:29 (48-85 s per row, 23 s of
# it the NAR samples). The budgets before (teachers 250-400 steps, tokenizers and pixel decoders
# 300, AR / NAR / T2I 200 x 48, 1,000 samples per FD_eval): 34:39. The cut kept what the loss
# curves of that run showed still mattered: the evaluator was at 98% accuracy by step 100, the
# MAE-style teacher's loss flat from step 100 (yet at 150 steps its VQ-KD row's distillation loss
# stayed at 0.37 against 0.07 with the 400-step teacher: hence 400), the DINO-style teacher's
# lowest at step 150. The NAR sampler runs 250 samples at a time: 400 samples cost what 500 do.
# 6 Dec 2026 (evening), on a machine that ran these budgets in 21:34: AR / NAR / T2I 120 -> 100
# steps (their losses were flat after step 90), the rows evaluated beside the last stages, the
# perplexities on 1,000 validation images and AR / NAR sampling calls of 128 rows: 18:38 (the
# machine's speed drifted too: README).
# Two stages at once give about 1.2x one stage's throughput on 2 vCPUs (measured: the ViT
# teacher's step 243 ms alone, 400 ms each for two together, pinned to a core each or not; with
# one XLA thread per process, 205 and 356 ms), so the time is the stages' total work.
# `vqkd bench pipeline --config configs/demo/demo.py --steps 9` gives each stage's step time and
# setup (compile) time.
# Pre-tokenising the rows' training images for AR / NAR (data.tokens_dir) saves little here:
# AR 4.2 -> 5.7 steps/s, but the 20k images take ~40 s to encode. "gpu" is meant for one GPU.
STEPS = {
    "default": dict(teacher_vit=200, teacher_mae=400, teacher_clip=200, teacher_dino=100,
                    perceptual=100, evaluator=120, vqgan=150, vqkd=150, cluster=120,
                    pixel_decoder=100, ar=100, nar=100, t2i=100),
    "gpu": dict(teacher_vit=3000, teacher_mae=3000, teacher_clip=3000, teacher_dino=2000,
                perceptual=2000, evaluator=2000, vqgan=5000, vqkd=4000, cluster=2000,
                pixel_decoder=4000, ar=6000, nar=6000, t2i=6000),
}
BATCH = {"default": dict(vqgan=32, vqkd=32, pixel_decoder=32, ar=32, nar=32, t2i=32), "gpu": {}}
GPU_BATCH = 128
# Width of the convolutional trunks that make pixels: the VQGAN / FSQ encoder-decoder, the pixel
# decoders of VQ-KD and Cluster codes (the same for both, so that the rows' decoders match), and
# their PatchGAN discriminators. Their stage configs use 32; 16 halves their CPU time.
DECODER_WIDTH = {"default": 16, "gpu": 32}


# Stages whose own evaluation runs at their end (the teachers' token similarity and patch probe,
# the evaluator's accuracy); the report measures every other stage itself.
EVALUATED = ("teacher_vit", "teacher_mae", "teacher_clip", "teacher_dino", "evaluator")


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, gpu=False, seeds=1, precision="float32")
  size = "gpu" if arg.gpu else "default"
  image_size = 64 if arg.gpu else 32
  sub = f"runlocal={arg.runlocal},image_size={image_size}"
  load = lambda file, extra="": load_config(
      os.path.join(HERE, f"{file}:{sub}" + (f",{extra}" if extra else "")))
  steps = STEPS[size]

  def finish(c, kind):
    c.precision = arg.precision
    if "loss" in c and "perceptual" in c.loss:
      c.loss.perceptual.kind = "in_the_box"  # runlocal too: the path through the shared stage
    if arg.runlocal:  # Every stage and path once, as fast as it goes (tests).
      scale_steps(c, 2)
      c.batch_size = 16
    else:
      scale_steps(c, steps[kind])
      c.batch_size = GPU_BATCH if arg.gpu else BATCH[size].get(kind, c.batch_size)
    if kind in ("vqgan", "pixel_decoder"):
      c.model.width = c.gan.width = DECODER_WIDTH[size]
    if kind not in EVALUATED:
      c.eval_every = 0  # The report measures these stages itself.
    return c

  c = ml_collections.ConfigDict()
  c.data_dir = os.path.expanduser("~/tensorflow_datasets")
  c.seeds = arg.seeds
  # Stages trained at once (worker processes; 1 = in this process). Two on CPUs: a demo stage
  # keeps about one core busy. One on a GPU.
  c.workers = 1 if arg.gpu else 2
  c.shared = ml_collections.ConfigDict()
  for key, file in SHARED:
    if os.path.exists(os.path.join(HERE, file)):
      c.shared[key] = finish(load(file), key)

  # Teacher widths: a pixel decoder reads Cluster codes of the CLIP-style teacher's width.
  widths = {"teacher_clip": c.shared.teacher_clip.model.embed_dim}
  c.rows = ml_collections.ConfigDict()
  c.row_order = tuple(key for key, *_ in ROWS)  # ConfigDict iterates its keys sorted
  for key, label, (file, extra), teacher, with_t2i in ROWS:
    r = ml_collections.ConfigDict()
    r.label = label
    r.teacher = teacher
    r_kind = file[:-3]  # vqgan | vqkd | cluster
    r.tokenizer = finish(load(file, extra), r_kind)
    if r_kind == "cluster":
      r.tokenizer.teacher.kind = "in_the_box_clip"
    if r_kind != "vqgan":
      code_dim = r.tokenizer.model.code_dim if r_kind == "vqkd" else widths[teacher]
      r.pixel_decoder = finish(load("pixel_decoder.py", f"code_dim={code_dim}"), "pixel_decoder")
      if r_kind == "vqkd":  # Unit-norm codes: entries ~1/sqrt(D); the decoder sees unit scale.
        r.pixel_decoder.model.input_scale = float(code_dim) ** 0.5
    r.ar = finish(load("ar.py"), "ar")
    r.nar = finish(load("nar.py"), "nar")
    if with_t2i and os.path.exists(os.path.join(HERE, "t2i.py")):  # else "n/a (stage missing)"
      r.t2i = finish(load("t2i.py"), "t2i")
      r.t2i.sampling.num_samples = 0  # The report samples; the stage's own grid is skipped.
    if arg.gpu:
      for kind in ("ar", "nar") + (("t2i",) if "t2i" in r else ()):
        r[kind].model.width, r[kind].model.depth, r[kind].model.num_heads = 256, 6, 8
    c.rows[key] = r

  c.report = ml_collections.ConfigDict(dict(
      num_samples=48 if arg.runlocal else (5000 if arg.gpu else 500), cfg_scale=1.75,
      temperature=1.0, top_k=0, top_p=1.0, seed=0, probe_train=200 if arg.runlocal else 5000,
      min_evaluator_accuracy=0.9,
      # CPU: the perplexities on 1,000 of the 2,000 validation images (64,000 tokens), and
      # sampling calls of 128 rows (the NAR samples of a row: 13.3-14.3 s against 16.7 s with
      # 256 on 2 cores; the samples are the same).
      ppl_images=None if arg.gpu or arg.runlocal else 1000, sample_batch=256 if arg.gpu else 128))
  return c
