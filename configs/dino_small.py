"""Brain-Semantoks network-token self-distillation (SimDINO, EMA teacher) at CPU scale.

  python -m boldjax.main --config=configs/dino_small.py --workdir=runs/dino_small
  python -m boldjax.evaluate --workdir=runs/dino_small --protocol=linear --labels=state

The original (config/example_config.yaml): 457 ROIs in 9 networks, TR 2 s, crops of 100 TRs
in 5 patches of 20, D=768, depth 8, tokenizer branches 384+384, head 1024 -> 128, batch 512,
100 epochs. Here, on the synthetic parcellated default (64 MMP parcels in the 7 Yeo
networks, TRs 0.72-2 s): runs resampled to 1 s, crops of 20 s in 5 patches of 4 s (so that
the 16 s task blocks the probe decodes fit in one crop), D=128 in depth 2, 1000 steps.
The recipe keeps the original's schedules: lr 7e-4 * B / 256 with warmup from 0 (3% of the
run) then cosine to 0, weight decay 0.05 -> 0.3 on every parameter, EMA momentum 0.99 -> 1,
network-loss
weight 0.5 cosine-decayed to 0 over the first 5% of the run, mask loss 0.5 on half the
batches.

`dino_small.py:semantoks` takes the original's input instead, for a dataset imported from a
Brain-Semantoks HDF5 (`python -m boldjax.prepare hdf5 FILE --out=D`: 457 ROIs in 9
networks at TR 2 s): crops of 100 TRs at TR 2 s in 5 patches of 20 TRs, the original's
tokenizer kernels (Conv1d k=3, SLConv 3 scales x 4 taps = 16), 8 probe crops, runs up to
300 TRs for the probe examples; same model width and recipe:

  python -m boldjax.main --config=configs/dino_small.py:semantoks --config.data.path=D \
      --workdir=runs/dino_semantoks
  python -m boldjax.evaluate --workdir=runs/dino_semantoks --labels=sex_bi
"""

import ml_collections

from boldjax.parcellated_config import base_config


def get_config(arg=None):
  c, arg = base_config("dino", arg, semantoks=False)
  c.name = "dino_small"
  c.total_steps = 1000 if not arg.runlocal else 6
  c.checkpoint_every = 250 if not arg.runlocal else 2

  d = c.data
  d.mode = "views"
  d.views_tr = 1.0
  d.crop_length = 20
  d.patch_size = 4
  d.augment = (1, 1, 1, 1)  # the original's switch order: roi drop, time block, noise, scale
  d.mask_ratio = (0.65, 0.85)
  d.batch_size = 64 if not arg.runlocal else 8
  d.eval_batch_size = 64 if not arg.runlocal else 8

  c.model = ml_collections.ConfigDict()
  c.model.name = "semantoks"
  c.model.embed_dim = 128 if not arg.runlocal else 32
  c.model.depth = 2 if not arg.runlocal else 1
  c.model.num_heads = 2 if not arg.runlocal else 1  # head dim 64, as main.py forces
  c.model.mlp_dim = 4 * c.model.embed_dim
  c.model.layer_scale_init = 0.1
  half = c.model.embed_dim // 2
  # The original's two branches: a dense Conv1d and the multi-scale long convolution (SLConv);
  # kernel 2 x 2 scales = a length-4 long kernel, one patch.
  c.model.tokenizer = (
    {"type": "dense", "kernel_size": 3, "out_channels": half},
    {"type": "sgconv", "kernel_size": 2, "num_scales": 2, "out_channels": half},
  )
  c.model.head_hidden_dim = 512 if not arg.runlocal else 32
  c.model.head_bottleneck_dim = 128 if not arg.runlocal else 16
  c.model.head_nlayers = 2

  if arg.semantoks:  # the original's input (config/example_config.yaml, data/dataset.py)
    c.data.source = "parcellated"
    d.views_tr = 2.0
    d.crop_length = 100
    d.patch_size = 20
    d.seq_max = 300  # probe examples: runs up to 300 TRs (10 min), crops spread over them
    c.model.tokenizer = (
      {"type": "dense", "kernel_size": 3, "out_channels": half},
      {"type": "sgconv", "kernel_size": 4, "num_scales": 3, "out_channels": half},
    )

  c.task = ml_collections.ConfigDict(
    {
      "name": "dino",
      "init_from": "",  # a workdir (trained or converted) to start from; "" = from scratch
      "mask_frequency": 0.5,
      "mask_loss_weight": 0.5,
      "mcr_eps": 0.05,
      "mcr_coeff": 1.0,
      "teacher_momentum": 0.99,
      "network_loss_weight": 0.5,
      "network_loss_delay_steps": 0,
      "network_loss_decay_steps": max(c.total_steps // 20, 1),
      "network_loss_schedule": "cosine",
      "probe_crops": 8 if arg.semantoks else 1,  # the original probes 8 crops per run
    }
  )

  o = c.optim
  o.lr = 7e-4 * c.data.batch_size / 256
  o.b1, o.b2 = 0.9, 0.999
  o.weight_decay = 0.05
  o.weight_decay_end = 0.3
  o.decay_min_rank = 0  # the original decays every parameter
  o.clip_norm = 1.0
  o.warmup_steps = max(c.total_steps * 3 // 100, 1)
  o.warmup_init = 0.0
  o.min_lr_ratio = 0.0

  c.evals.val.every_steps = 250 if not arg.runlocal else 4
  return c
