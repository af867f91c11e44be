"""fMRI-to-image decoding (aaalgo/fmri2img): voxels -> FmriEncoder -> 16x16x4 latent -> the
frozen decoder of a VAE run -> image, trained on pixel MSE (the seed) or a latent target.

Train the VAE first; fmri2img freezes the run that config.task.decoder_from names (a
configs/vae.py run on the same images, or a converted SD-1.5 VAE workdir at 128 pixels):

  python -m boldjax.main --config=configs/vae.py --workdir=runs/vae
  python -m boldjax.main --config=configs/fmri2img.py --workdir=runs/fmri2img \
      --config.task.decoder_from=runs/vae

The default reads the synthetic default (planted visual-cortex forward model, 64x64 images,
three repeats per image). Arguments: `objective=latent|pixel|pixel+latent` (latent, the
default, matches the frozen VAE encoder's posterior mean of the image: 3000 steps reach a
better held-out table than the seed's pixel loss in the same 10 minutes), `runlocal`
(a smoke test on a few hundred images). The seed's optimiser: AdamW lr 1e-3, weight decay
0.01, constant learning rate; hidden (2048, 2048, 1024).
"""

from __future__ import annotations

import ml_collections

from boldjax.config_utils import parse_arg
from boldjax.data import fmri2img_pipeline
from boldjax.evals import reconstruction
from boldjax.tasks.fmri2img import OBJECTIVES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, objective="latent", runlocal=False)
  if arg.objective not in OBJECTIVES:
    raise ValueError(
      f"config argument 'objective': expected one of {list(OBJECTIVES)}, found {arg.objective!r}"
    )
  c = ml_collections.ConfigDict()
  c.name = "fmri2img"
  c.seed = 0
  # Measured on 2 cores (synthetic default, AMD EPYC): latent 3000 steps in 614 s, two-way
  # 0.945; pixel (the seed's loss, ~4x slower per step through the decoder) 800 steps in
  # ~600 s, two-way 0.937. Each fits the 20-minute budget after configs/vae.py's 8 minutes.
  c.total_steps = 3000 if arg.objective == "latent" else 800
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict({"rules": ()})

  c.data = fmri2img_pipeline.default_config()

  c.task = ml_collections.ConfigDict(
    {
      "name": "fmri2img",
      "decoder_from": "",  # a workdir whose task is "vae" (train configs/vae.py first)
      "objective": arg.objective,
      "latent_weight": 1.0,  # pixel+latent: pixel + latent_weight * latent
      "init_from": "",
    }
  )
  c.model = ml_collections.ConfigDict(
    {
      "name": "fmri2img",
      "hidden": (2048, 2048, 1024),  # the seed's; hidden[-1] = C * (latent_size / 2)^2
      "latent_size": 0,  # 0: image size / the VAE's downsampling (16 for both defaults)
      "dtype": "float32",
    }
  )

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 0.0  # the seed does not clip
  c.optim.warmup_steps = 0
  c.optim.warmup_init = 1.0
  c.optim.min_lr_ratio = 1.0  # constant learning rate, as the seed
  c.optim.accum_steps = 1
  c.optim.no_decay = ()
  c.optim.decay_min_rank = 0  # torch AdamW (the seed) decays biases too

  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict({"type": "loss", "split": "val", "every_steps": 500})
  c.evals.reconstruction = reconstruction.default_config(every_steps=c.total_steps)

  if arg.runlocal:
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.data.synthetic.num_images = 240
    c.data.synthetic.num_voxels = 200
    c.data.synthetic.val_images = 20
    c.data.synthetic.test_images = 20
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.model.hidden = (256, 256, 1024)
    c.evals.val.every_steps = 10
  c.evals.reconstruction.every_steps = c.total_steps  # at the end (table and baselines)
  return c
