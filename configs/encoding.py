"""Brain Decodes Deep Nets encoding model (FactorTopy) on cached frozen-backbone tokens.

The default reads the embedded synthetic stimulus set (images built from package sample
images and procedural ones; occipital vertices of fsaverage5 with a planted layer, position
and scale per vertex) through a small random `tiny` ViT, trains on 2 CPU cores in a few
minutes and prints held-out R^2, the ridge baseline and the planted-answer recovery.

  python -m boldjax.main --config=configs/encoding.py --workdir=runs/encoding
  python -m boldjax.main --config=configs/encoding.py:backbone=clip_b16 \
      --config.data.source=stimulus --config.data.path=DATA \
      --config.data.backbone.weights=open_clip_vit_b16.safetensors --workdir=runs/clip

`backbone=clip_b16|dinov2_s14|mae_b16` restores the seed's defaults (224-pixel images, ImageNet
normalisation, AdamW lr 1e-3, weight decay 0.01, batch 8); `runlocal` is a smoke test.
"""

from __future__ import annotations

import ml_collections

from boldjax.config_utils import parse_arg
from boldjax.data import encoding_pipeline

BACKBONES = ("clip_b16", "dinov2_s14", "mae_b16", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, backbone="tiny", runlocal=False)
  if arg.backbone not in BACKBONES:
    raise ValueError(
      f"config argument 'backbone': expected one of {list(BACKBONES)}, found {arg.backbone!r}"
    )
  c = ml_collections.ConfigDict()
  c.name = f"encoding_{arg.backbone}"
  c.seed = 0
  c.total_steps = 3000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict({"rules": ()})

  c.data = encoding_pipeline.default_config()
  c.data.backbone.name = arg.backbone
  c.data.synthetic.backbone = arg.backbone  # planted and encoder backbone: the same by default
  if arg.backbone != "tiny":  # the seed: 224-pixel images, batch 8
    c.data.synthetic.image_size = 224
    c.data.backbone.image_size = 224
    c.data.batch_size = 8
    c.data.eval_batch_size = 32
    c.total_steps = 20000

  c.task = ml_collections.ConfigDict(
    {
      "name": "encoding",
      "bottleneck": 128,
      "hidden": 128,
      "num_freqs": 32,
      "reg_weight": 0.1,
      "reg_steps": 500,  # the seed's 2000 are the start of a ~10x longer run
      "smooth_l1_beta": 0.1,
      "init_from": "",
    }
  )
  if arg.backbone != "tiny":
    c.task.reg_steps = 2000
  c.model = ml_collections.ConfigDict({"name": "factortopy", "dtype": "float32"})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01  # torch AdamW's default, what the seed really ran
  c.optim.clip_norm = 0.5
  c.optim.warmup_steps = 0
  c.optim.warmup_init = 1.0
  c.optim.min_lr_ratio = 1.0  # constant learning rate, as the seed
  c.optim.accum_steps = 1
  c.optim.no_decay = ()

  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict({"type": "loss", "split": "val", "every_steps": 500})
  c.evals.encoding = ml_collections.ConfigDict(
    {"type": "encoding", "split": "test", "every_steps": c.total_steps, "ridge_baseline": True}
  )

  if arg.runlocal:
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.data.synthetic.num_images = 240
    c.data.synthetic.visual_fraction = 0.02
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.evals.val.every_steps = 10
  c.evals.encoding.every_steps = c.total_steps  # at the end (R^2, baseline, recovery)
  return c
