"""Shared config of the learning-from-brains family on parcellated BOLD.

Sizes follow the original's flags (embedding_dim, num_hidden_layers, ...); the default
is a CPU-scale model (192 wide, 2 layers) on the synthetic parcellated source (64 MMP
parcels in Yeo-7 networks, 12 subjects, task blocks of 5 mental states).
"""

from __future__ import annotations

import os

import ml_collections

from boldjax.config_utils import parse_arg

# Named synthetic regimes (config argument `synthetic=NAME`), applied over the default fields.
#   activation:  states add HRF-shaped activation of a network pair (linearly readable from
#                the raw window: even one training subject decodes them well).
#   distributed: weak activation along random directions over all parcels.
#   coupling:    states only make one network of the pair follow the other 1 s later; the
#                window mean carries nothing, and a decoder must find the lagged coupling.
#   rhythm:      states only make their network pair oscillate together at the state's
#                frequency; window means carry nothing, the dynamics everything.
SYNTHETIC_REGIMES = {
  "activation": {},
  "distributed": {"pattern_layout": "distributed", "task_scale": 0.25},
  "rhythm": {
    "rhythm_scale": 3.0,  # x the HRF envelope, clipped at 0.95
    "task_scale": 0.0,
    "block_seconds": 30.0,
    "run_seconds": 300.0,
  },
  "coupling": {
    "coupling_scale": 3.0,  # x the HRF envelope, clipped at 0.95
    "coupling_lag_s": 1.0,
    "task_scale": 0.0,
    "block_seconds": 30.0,
    "run_seconds": 300.0,
  },
}


def base_config(
  task: str, arg: str | None, **extra_args
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  arg = parse_arg(arg, runlocal=False, synthetic="activation", **extra_args)
  if arg.synthetic not in SYNTHETIC_REGIMES:
    raise ValueError(
      f"config argument 'synthetic': expected one of {sorted(SYNTHETIC_REGIMES)}, "
      f"found {arg.synthetic!r}"
    )
  c = ml_collections.ConfigDict()
  c.name = task
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict({"rules": ()})

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic_parcellated"
  c.data.path = ml_collections.FieldReference(None, field_type=str)
  c.data.cache_dir = os.environ.get("BOLDJAX_CACHE", os.path.expanduser("~/.cache/boldjax"))
  # SyntheticBoldSpec fields that experiments vary (the rest keep their defaults).
  c.data.synthetic = ml_collections.ConfigDict(
    {
      "num_parcels": 64,
      "num_subjects": 12,
      "val_subjects": 2,
      "test_subjects": 2,
      "trs": (0.72, 1.0, 1.5, 2.0),  # subjects cycle through these TRs (seconds)
      "network_scale": 1.0,  # spontaneous network fluctuations
      "task_scale": 1.0,
      "noise_scale": 0.5,
      "subject_pattern_scale": 0.3,
      "pattern_layout": "networks",
      "coupling_scale": 0.0,
      "coupling_lag_s": 2.0,
      "rhythm_scale": 0.0,
      "block_seconds": 16.0,
      "run_seconds": 240.0,
      "seed": 0,
    }
  )
  c.data.synthetic.update(SYNTHETIC_REGIMES[arg.synthetic])
  c.data.seq_min = 10
  c.data.seq_max = 49
  c.data.zscore = "run"
  c.data.split_seed = 0
  c.data.train_subjects = ml_collections.FieldReference(None, field_type=int)
  c.data.pairs = False
  c.data.pair_gap = (0, 0)
  c.data.mode = "pretrain"
  c.data.decode_shift_s = 5.0
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.data.num_workers = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "lfb"
  c.model.embedding_dim = 192
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.intermediate_dim_factor = 4
  c.model.n_positions = 512
  c.model.dropout = 0.1
  c.model.tr_precision = 0.2
  c.model.tr_max = 300.0
  c.model.num_hidden_layers_embedding_model = 1
  c.model.num_hidden_layers_unembedding_model = 1
  c.model.hidden_activation = "gelu_new"
  c.model.decode_pooling = "cls"  # decoding runs: "cls" (the original) or "mean" over frames

  # init_from: a workdir (trained, or written by `python -m boldjax.convert`) whose params a
  # new run starts from (Task.load_pretrained); "" = from scratch.
  c.task = ml_collections.ConfigDict({"name": task, "init_from": ""})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.9  # the original passes beta1 twice: effectively (0.9, 0.9)
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 10  # 1% warmup
  c.optim.warmup_init = 0.0
  c.optim.min_lr_ratio = 0.0
  c.optim.accum_steps = 1
  c.optim.no_decay = ()

  c.evals = ml_collections.ConfigDict()
  c.evals.val = ml_collections.ConfigDict({"type": "loss", "split": "val", "every_steps": 250})

  if arg.runlocal:
    c.total_steps = 6
    c.log_every = 2
    c.checkpoint_every = 2
    c.data.synthetic.num_parcels = 16
    c.data.synthetic.num_subjects = 6
    c.data.synthetic.val_subjects = 1
    c.data.synthetic.test_subjects = 1
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.model.embedding_dim = 32
    c.model.num_hidden_layers = 1
    c.model.num_attention_heads = 2
    c.evals.val.every_steps = 4
  return c, arg
