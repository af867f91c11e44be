"""KL-VAE (Stable Diffusion's AutoencoderKL architecture) on the stimulus images: the decoder
that configs/fmri2img.py freezes (config.task.decoder_from = this run's workdir).

  python -m boldjax.main --config=configs/vae.py --workdir=runs/vae
  python -m boldjax.convert sd_vae diffusion_pytorch_model.safetensors \
      --config=configs/vae.py:preset=sd15 --workdir=runs/sd15_vae

The default reads the synthetic fmri2img default's images (64x64; config.data.path: a
stimulus or trials dataset instead) and trains the `small` preset (16/32/64 channels, one
resnet per level, 16x16x4 latents) for 600 steps of 16 images: about 7 minutes on 2 CPU
cores. `preset=sd15` is SD-1.5's VAE (83.7M params) at 128 pixels, the seed's image size,
for converted weights (train it only on an accelerator); `runlocal` is a smoke test on the
same small synthetic set as configs/fmri2img.py:runlocal.
"""

from __future__ import annotations

import ml_collections

from boldjax.config_utils import parse_arg
from boldjax.data import fmri2img_pipeline
from boldjax.models.vae import PRESETS
from boldjax.tasks import vae as vae_task


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="small", runlocal=False)
  if arg.preset not in PRESETS:
    raise ValueError(
      f"config argument 'preset': expected one of {sorted(PRESETS)}, found {arg.preset!r}"
    )
  c = ml_collections.ConfigDict()
  c.name = f"vae_{arg.preset}"
  c.seed = 0
  c.total_steps = 600
  c.log_every = 50
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict({"rules": ()})

  c.data = fmri2img_pipeline.default_config()
  c.data.source = "stimulus_images"
  c.data.batch_size = 16
  c.data.eval_batch_size = 50

  c.task = ml_collections.ConfigDict(
    {
      "name": "vae",
      # Weight of the KL per pixel value next to the per-pixel MSE: a light pull towards
      # N(0, 1) that keeps latents bounded without blurring (SD trained with 1e-6 on sums).
      "kl_weight": 1e-3,
      "init_from": "",
    }
  )
  c.model = vae_task.model_config(arg.preset)  # + VAEConfig fields overriding the preset

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 50
  c.optim.warmup_init = 0.0
  c.optim.min_lr_ratio = 0.05
  c.optim.accum_steps = 1
  c.optim.no_decay = ()

  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict({"type": "loss", "split": "val", "every_steps": 300})

  if arg.preset == "sd15":
    c.data.synthetic.image_size = 128
    c.data.batch_size = 4
    c.data.eval_batch_size = 8
    c.task.kl_weight = 1e-6
    c.optim.lr = 1e-4
  if arg.runlocal:  # the synthetic set of configs/fmri2img.py:runlocal
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.data.synthetic.num_images = 240
    c.data.synthetic.num_voxels = 200
    c.data.synthetic.val_images = 20
    c.data.synthetic.test_images = 20
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.optim.warmup_steps = 5
    c.evals.val.every_steps = 10
  return c
