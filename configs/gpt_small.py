"""boldGPT patch GPT on cortical flat maps: shuffled next-patch prediction.

The default trains a tiny-width, 4-layer model on the embedded synthetic flat maps
(real fsLR-32k geometry) in a few minutes on a laptop CPU. `size=small|base` restores
boldGPT's published widths (12 layers); `runlocal` shrinks everything to a smoke test.

  python -m boldjax.main --config=configs/gpt_small.py --workdir=runs/gpt_small
  python -m boldjax.main --config=configs/gpt_small.py:size=small,target=continuous ...
"""

from __future__ import annotations

import os

import ml_collections

from boldjax.config_utils import parse_arg

SIZES = {  # boldGPT: embed dim, heads (12 layers, MLP ratio 4)
  "tiny": (192, 3),
  "small": (384, 6),
  "base": (768, 12),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, size="tiny", target="categorical", ordering="radial", runlocal=False)
  c = ml_collections.ConfigDict()
  c.name = "gpt_small"
  c.seed = 0
  c.total_steps = 600
  c.log_every = 25
  c.checkpoint_every = 100
  c.keep_checkpoints = 3

  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict({"rules": ()})

  # Data: the embedded synthetic flat maps unless `path` names a prepared dataset.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic_flat"
  c.data.path = ml_collections.FieldReference(None, field_type=str)
  c.data.cache_dir = os.environ.get("BOLDJAX_CACHE", os.path.expanduser("~/.cache/boldjax"))
  c.data.synthetic = ml_collections.ConfigDict(
    {
      "space": "fsLR32k",
      "height": 64,
      "num_subjects": 8,
      "trials_per_subject": 500,
      "num_classes": 8,
      "seed": 0,
    }
  )
  c.data.patch_size = 8
  c.data.ordering = arg.ordering
  c.data.shuffle_order = True
  c.data.tokenizer = ml_collections.ConfigDict({"vocab_size": 1024, "num_maps": 2000, "seed": 42})
  # A given k-means vocabulary (.npz with 'vocab', e.g. a converted boldGPT workdir's
  # tokenizer.npz) instead of fitting one; None = fit on the train split.
  c.data.tokenizer.path = ml_collections.config_dict.placeholder(str)
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.num_workers = 0

  if arg.size not in SIZES:
    raise ValueError(f"config argument 'size': expected one of {sorted(SIZES)}, found {arg.size!r}")
  embed_dim, heads = SIZES[arg.size]
  c.model = ml_collections.ConfigDict()
  c.model.name = "patch_gpt"
  c.model.size = arg.size
  c.model.embed_dim = embed_dim
  c.model.num_heads = heads
  c.model.depth = 4 if arg.size == "tiny" else 12
  c.model.mlp_ratio = 4.0
  c.model.num_registers = 0
  c.model.num_subjects = 1024  # boldGPT reserves 1024 subject embeddings
  c.model.drop_rate = 0.0
  c.model.attn_drop_rate = 0.0
  c.model.drop_path_rate = 0.0
  c.model.dtype = "float32"

  # init_from: a workdir (trained, or from `python -m boldjax.convert`) to start from; "" = none.
  c.task = ml_collections.ConfigDict({"name": "next_patch", "target": arg.target, "init_from": ""})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 60  # boldGPT: 2000 of 90k steps
  c.optim.warmup_init = 0.05
  c.optim.min_lr_ratio = 0.05
  c.optim.accum_steps = 1
  c.optim.no_decay = ("pos_embed", "sub_embed", "next_pos_query", "eos_query", "group_token")

  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict({"type": "loss", "split": "val", "every_steps": 200})

  if arg.runlocal:
    c.total_steps = 6
    c.log_every = 2
    c.checkpoint_every = 2
    c.data.synthetic.num_subjects = 2
    c.data.synthetic.trials_per_subject = 40
    c.data.tokenizer.vocab_size = 32
    c.data.tokenizer.num_maps = 40
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.model.depth = 1
    c.evals.val.every_steps = 4
  return c


def sweep():
  """Override dicts for `python -m launch.sweep --config=configs/gpt_small.py`."""
  for target in ("categorical", "continuous"):
    for lr in (3e-4, 1e-3):
      yield {"task.target": target, "optim.lr": lr}
