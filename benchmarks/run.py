"""boldjax train step vs a PyTorch re-implementation of the original, same weights and batch.

  python -m benchmarks.run --family=patch_gpt|csm_gpt|seq_bert|dino|encoding|vit_b16|all \
      [--json] [--repeats N]

Per family: the boldjax step is built exactly as boldjax/train.py builds it (mesh, state
spec, optimizer, task loss, jit with donation) on the config's default shapes and the first
batch of the real pipeline; the torch model loads the same weights through the converter's
params_to_torch and must give the same loss (rtol 1e-4) before anything is timed. Then the
two steps are timed alternately in this process after warm-up (median of repeats).
The DINO step includes the EMA teacher update on both sides (update_extra in boldjax, after
the optimizer step in torch).

Encoding (FactorTopy on cached tokens, issue 17): `encoding` is configs/encoding.py's
synthetic default (tiny backbone); `encoding_seed` the seed's shapes (CLIP ViT-B/16 tokens:
12 layers x 768 channels on the 8 x 8 grid, bottleneck 128, batch 8) on ~10,000 fsaverage5
vertices. The backbone feature passes `vit_b16` / `vit_tiny` time no train step: the token
cache's jitted pass (uint8 images -> normalised -> ViT get_tokens -> 8 x 8 local tokens)
against open_clip's VisionTransformer running the seed's get_tokens under no_grad, same
weights (a torch init converted by boldjax.convert.vision) and images, same tokens first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import boldjax  # noqa: F401  (its XLA:CPU flags must be set before jax starts a backend)
from benchmarks import flops as flops_lib

FAMILIES = (
  "patch_gpt", "csm_gpt", "seq_bert", "net_bert", "autoencoder", "dino", "encoding",
  "encoding_seed", "vae", "fmri2img",
)  # fmt: skip
CONFIGS = {
  "patch_gpt": "configs.gpt_small",
  "csm_gpt": "configs.csm_gpt",
  "seq_bert": "configs.seq_bert",
  "net_bert": "configs.net_bert",
  "autoencoder": "configs.autoencoder",
  "dino": "configs.dino_small",
  "encoding": "configs.encoding",
  "encoding_seed": "configs.encoding",
  "vae": "configs.vae",
  "fmri2img": "configs.fmri2img",
}
ENCODING = ("encoding", "encoding_seed")
# get_config(arg) when none is given; fmri2img: the seed's pixel loss through the decoder
CONFIG_ARGS = {"encoding_seed": "backbone=clip_b16", "fmri2img": "objective=pixel"}
# Config changes that keep shapes but make both sides do the same work every step: the
# DINO student masks on every batch (boldjax computes the masked path on every batch anyway,
# static shapes; the original skips the mask loss on the unmasked half).
# encoding_seed: the seed's model shapes on a small image set (the CLIP B/16 synthetic
# default would build 3000 images); 0.535 of each fsaverage5 hemisphere's cortex: N = 10,166.
OVERRIDES: dict[str, dict[str, Any]] = {
  "dino": {"task.mask_frequency": 1.0},
  "encoding_seed": {"data.synthetic.num_images": 64, "data.synthetic.visual_fraction": 0.535},
}
# Backbone feature passes (no train step): the boldjax preset and the images per pass (the
# seed's batch 8 at 224 px; the token cache's 64 for the tiny synthetic-default backbone).
PASSES = {"vit_b16": ("clip_b16", 8), "vit_tiny": ("tiny", 64)}
LOSS_RTOL = 1e-4
TOKENS_RTOL = 1e-4  # feature passes: max |boldjax - torch| / max |torch|, local and global


# ---------------------------------------------------------------------------------------
# Compilation accounting (jax.monitoring events fire on every trace / compile).
# ---------------------------------------------------------------------------------------
class CompileLog:
  """Counts backend compilations and sums trace + lowering + compile seconds."""

  EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self) -> None:
    self.compiles = 0
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_: Any) -> None:
    if event in self.EVENTS:
      self.seconds += duration
      self.compiles += event == self.EVENTS[-1]


_LOG: CompileLog | None = None


def compile_log() -> CompileLog:
  global _LOG
  if _LOG is None:
    _LOG = CompileLog()
  return _LOG


# ---------------------------------------------------------------------------------------
# The boldjax side, as train.py builds it.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class JaxSide:
  config: Any
  info: Any
  task: Any
  state: Any
  step: Callable  # jitted (state, batch) -> (state, metrics), state donated
  batch: dict[str, jax.Array]
  host_batch: dict[str, np.ndarray]
  step_rng: jax.Array


def load_config(family: str, arg: str | None = None):
  """The family's config module's get_config(arg)."""
  import importlib

  if family not in CONFIGS:
    raise ValueError(f"benchmarks.run --family: expected one of {FAMILIES}, found {family!r}")
  config = importlib.import_module(CONFIGS[family]).get_config(arg or CONFIG_ARGS.get(family))
  for key, value in OVERRIDES.get(family, {}).items():
    *parents, field = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[field] = value
  if family == "fmri2img" and not config.task.decoder_from:
    with config.unlocked():
      config.task.decoder_from = bench_vae_workdir()
  return config


def bench_vae_file() -> str:
  """A seeded random diffusers AutoencoderKL of configs/vae.py's preset, as .safetensors
  (the weights both fmri2img sides decode with)."""
  import torch

  from benchmarks import torch_fmri2img
  from boldjax.convert import files
  from boldjax.tasks.vae import vae_config

  root = os.path.join(os.environ.get("BOLDJAX_CACHE", os.path.expanduser("~/.cache/boldjax")),
                      "bench")  # fmt: skip
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "diffusers_vae_small_seed0.safetensors")
  if not os.path.exists(path):
    torch.manual_seed(0)
    vae = torch_fmri2img.diffusers_vae(vae_config(load_config("vae").model))
    files.write_safetensors(path, {k: v.numpy() for k, v in vae.state_dict().items()})
  return path


def bench_vae_workdir() -> str:
  """bench_vae_file() through `python -m boldjax.convert sd_vae` (the decoder_from path a
  user takes with SD-1.5's weights)."""
  from boldjax.convert import cli

  path = bench_vae_file()
  workdir = path.replace(".safetensors", "_workdir")
  if not os.path.exists(os.path.join(workdir, cli.MARKER)):
    cli.main(["sd_vae", path, f"--config={CONFIGS['vae'].replace('.', '/')}.py",
              f"--workdir={workdir}", "--overwrite"])  # fmt: skip
  return workdir


def build_jax(config) -> JaxSide:
  """train.py's run (boldjax.build.build_run), initialised, and its first train batch."""
  from boldjax import build, sharding

  run = build.build_run(config)
  host_batch = next(iter(run.train_dataset()))
  with run.context():
    state = run.spec.init(run.init_rng)
    batch = sharding.to_global(host_batch, run.batch_sharding)
  return JaxSide(config, run.info, run.task, state, run.train_step, batch, host_batch, run.step_rng)


# ---------------------------------------------------------------------------------------
# The torch side: same architecture, weights, batch and optimizer.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TorchSide:
  model: Any
  loss: Callable[[], Any]  # draws what the step draws (CSM frame, BERT masks), returns the loss
  eval_loss: Callable[[], float]  # deterministic loss on the benchmark batch
  step: Callable[[], None]


class TorchSchedules:
  """LambdaLR (warmup + cosine) plus boldjax's weight-decay schedule (optim.weight_decay_end:
  cosine from weight_decay to it, set on the decay group before each optimizer step)."""

  def __init__(self, opt, lr_factor: Callable[[int], float], wd: Callable[[int], float]):
    import torch

    self.opt, self.wd, self.count = opt, wd, 0
    self.lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    self._set_wd()

  def _set_wd(self) -> None:
    self.opt.param_groups[0]["weight_decay"] = self.wd(self.count)

  def step(self) -> None:
    self.lr.step()
    self.count += 1
    self._set_wd()


def torch_optimizer(model, optim_cfg, total_steps: int):
  """AdamW + global-norm clipping + warmup/cosine with boldjax's decay mask rule (rank >=
  optim.decay_min_rank (default 2) and no path component named in optim.no_decay), on torch
  parameter names; parameters with requires_grad=False (an EMA teacher) are left out."""
  import re

  import torch

  patterns = [re.compile(f"^{n}$") for n in optim_cfg.no_decay]
  min_rank = int(optim_cfg.get("decay_min_rank", 2))
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    exempt = any(pat.match(part) for pat in patterns for part in name.split("."))
    (no_decay if exempt or p.ndim < min_rank else decay).append(p)
  opt = torch.optim.AdamW(
    [
      {"params": decay, "weight_decay": optim_cfg.weight_decay},
      {"params": no_decay, "weight_decay": 0.0},
    ],
    lr=optim_cfg.lr,
    betas=(optim_cfg.b1, optim_cfg.b2),
    eps=optim_cfg.eps,
  )
  warm = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))  # optim.make_schedule

  def factor(s: int) -> float:
    if s < warm:
      return optim_cfg.warmup_init + (1 - optim_cfg.warmup_init) * s / warm
    frac = min((s - warm) / max(total_steps - warm, 1), 1.0)
    lo = optim_cfg.min_lr_ratio
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))

  end = optim_cfg.get("weight_decay_end", None)
  start, n = float(optim_cfg.weight_decay), max(total_steps, 1)

  def weight_decay(s: int) -> float:  # optim.make_weight_decay
    if end is None:
      return start
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(s, n) / n))

  return opt, TorchSchedules(opt, factor, weight_decay)


def _torch_step(
  model, loss_fn, opt, sched, clip: float, after_step: Callable[[], None] | None = None
) -> Callable[[], None]:
  """zero_grad, loss, backward, clip, optimizer step, schedules, then `after_step` (the EMA
  teacher update of DINO, as the original runs it after optimizer.step())."""
  import torch

  params = [p for p in model.parameters() if p.requires_grad]

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if clip and clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    if after_step is not None:
      after_step()

  return step


def build_torch(family: str, side: JaxSide) -> TorchSide:
  import torch

  params = jax.device_get(nn.unbox(side.state.params))
  b = {k: torch.from_numpy(np.asarray(v)) for k, v in side.host_batch.items()}
  cfg = side.config
  if family == "patch_gpt":
    from benchmarks import torch_patch_gpt

    model = torch_patch_gpt.from_boldjax(side.task.model, params)
    b = {k: v.long() if v.dtype == torch.int32 else v for k, v in b.items()}
    categorical = side.task.categorical
    pmask = torch.from_numpy(np.asarray(side.task.patch_mask))

    def loss():
      return model.loss(b, categorical, pmask)

    eval_loss = loss
  elif family == "csm_gpt":
    from benchmarks import torch_lfb_gpt
    from boldjax.tasks.csm import draw_masking_i

    model = torch_lfb_gpt.from_boldjax(side.task.model, params)
    b["length"] = b["length"].long()
    b["mask"] = b["mask"].bool()
    # The frame boldjax's deterministic loss masks for rng=key(0) (see parity_losses).
    mask_rng = jax.random.split(jax.random.key(0))[0]
    fixed_i = np.array(draw_masking_i(mask_rng, jnp.asarray(b["length"].numpy())))
    fixed_i = torch.from_numpy(fixed_i).long()

    def loss():  # the original: i ~ U{1..len-1} per row, every step
      n = torch.clamp(b["length"] - 1, min=1)
      i = 1 + torch.minimum((torch.rand(n.shape) * n).long(), n - 1)
      return model.loss(b, i)

    def eval_loss():
      return model.loss(b, fixed_i)
  elif family in ("seq_bert", "net_bert"):
    from benchmarks import torch_lfb_bert

    model = torch_lfb_bert.from_boldjax(side.task.model, params)
    rate = side.task.masking_rate
    fixed_mask = torch.from_numpy(np.array(bert_parity_mask(side)))
    parcels = side.host_batch["bold"].shape[-1]

    def draw(attention_mask):  # the original's masks, drawn with torch.rand every step
      if family == "seq_bert":
        return torch_lfb_bert.draw_frame_mask(attention_mask, rate)
      return torch_lfb_bert.draw_parcel_mask(attention_mask, parcels, rate)

    def loss():
      packed = torch_lfb_bert.pack_pair(b)
      return model.loss(packed, draw(packed["attention_mask"]))

    def eval_loss():
      return model.loss(torch_lfb_bert.pack_pair(b), fixed_mask)
  elif family == "autoencoder":
    from benchmarks import torch_lfb_autoencoder

    model = torch_lfb_autoencoder.from_boldjax(side.task.model, params)
    ratio = side.task.teacher_forcing_ratio
    x, t, valid = b["bold"], b["t_sec"], b["mask"].bool()

    def loss():  # the original: one teacher-forcing coin per batch
      return model.loss(x, t, valid, teacher_forcing=bool(torch.rand(()) < ratio))

    def eval_loss():
      return model.loss(x, t, valid)
  elif family in ENCODING:
    from benchmarks import torch_factortopy

    model = torch_factortopy.from_boldjax(side.task, params)
    host = side.host_batch
    local, glob = torch_factortopy.tokens_from_batch(host["local"], host["global"])
    fmri = b["fmri"]

    def loss():  # the seed's training_step; its reg decay reads the steps taken
      return model.training_loss(local, glob, fmri)

    eval_loss = loss
  elif family == "vae":
    from benchmarks import torch_fmri2img
    from boldjax.convert import files
    from boldjax.convert.vae import convert_state_dict

    vae = torch_fmri2img.diffusers_vae(side.task.vae_config)
    sd = files.read_safetensors(bench_vae_file())
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    side.state = side.state.replace(
      params=_put_like(convert_state_dict(sd, side.task.vae_config)[0], side.state.params)
    )
    model = torch_fmri2img.VAETrain(vae, side.task.kl_weight)
    images = torch_fmri2img.nchw(side.host_batch["image"])

    def loss():  # a posterior sample every step, as training draws
      return model.loss(images)

    def eval_loss():
      return model.loss(images, sample=False)
  elif family == "fmri2img":
    from benchmarks import torch_fmri2img
    from boldjax.convert import files
    from boldjax.convert.fmri2img import params_to_torch

    vae = torch_fmri2img.diffusers_vae(side.task.vae_config)
    sd = files.read_safetensors(bench_vae_file())
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    from boldjax.models.fmri2img import reshape_grid

    m = side.task.model
    h, w, c = reshape_grid(m.hidden[-1], m.latent_hw)
    encoder = torch_fmri2img.FmriEncoder(m.input_dim, tuple(m.hidden), (c, h, w),
                                         m.latent_channels)  # fmt: skip
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_torch(params).items()})
    model = torch_fmri2img.Fmri2Image(encoder, vae)
    fmri, images = b["fmri"].float(), torch_fmri2img.nchw(side.host_batch["image"])

    def loss():
      return model.loss(fmri, images)

    eval_loss = loss
  elif family == "dino":
    from benchmarks import torch_semantoks

    extra = jax.device_get(side.state.extra)
    model = torch_semantoks.from_boldjax(side.task, params, extra)
    b = {"views": b["views"], "masks": b["masks"].bool()}

    def loss():  # masks on a random mask_frequency of the steps (1.0 here: OVERRIDES)
      return model.loss(b)

    def eval_loss():
      return model.loss(b, apply_masks=True)
  else:
    raise ValueError(f"benchmarks.run: no torch model for family {family!r}")
  opt, sched = torch_optimizer(model, cfg.optim, cfg.total_steps)
  after = model.update_teacher if family == "dino" else None
  if family in ENCODING:
    after = model.count_step  # Lightning's global_step, read by the reg decay
  return TorchSide(
    model, loss, eval_loss, _torch_step(model, loss, opt, sched, cfg.optim.clip_norm, after)
  )


def _put_like(tree: Any, like: Any) -> Any:
  """numpy `tree` onto the devices, dtypes and shardings of `like`'s arrays."""
  return jax.tree.map(lambda v, ref: jax.device_put(np.asarray(v, ref.dtype), ref.sharding),
                      tree, like)  # fmt: skip


def bert_parity_mask(side: JaxSide) -> jax.Array:
  """(B, Ta+Tb, R) mask boldjax's deterministic Seq-/Network-BERT loss draws for key(0)."""
  from boldjax.tasks.seq_bert import pack_pair

  task = side.task
  a, ta, _, la = task._frames(side.host_batch)
  b, tb, _, lb = task._frames(side.host_batch, "_next")
  x, _, am, _ = pack_pair(a, ta, la, b, tb, lb)
  mask_rng = jax.random.split(jax.random.key(0))[0]
  return task.draw_mask(mask_rng, am, x.shape[-1])


def parity_losses(side: JaxSide, tside: TorchSide) -> tuple[float, float]:
  """(boldjax, torch) deterministic losses of the same weights on the benchmark batch."""
  import torch

  jax_loss, _ = jax.jit(
    lambda p, batch: side.task.loss(p, side.state.extra, batch, jax.random.key(0), train=False)
  )(side.state.params, side.batch)
  tside.model.eval()
  with torch.no_grad():
    torch_loss = float(tside.eval_loss())
  tside.model.train()
  return float(jax_loss), torch_loss


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------
def load_average() -> float:
  return os.getloadavg()[0]


def wait_for_idle(threshold: float = 1.2, max_wait_s: float = 600.0, poll_s: float = 60.0):
  """Sleep until the 1-min load is below `threshold` (or give up); returns (load, waited)."""
  waited = 0.0
  while load_average() >= threshold and waited < max_wait_s:
    print(f"load {load_average():.2f} >= {threshold}: waiting {poll_s:.0f}s", file=sys.stderr)
    time.sleep(poll_s)
    waited += poll_s
  return load_average(), waited


def bench_family(
  family: str, repeats: int, steps_per_repeat: int, warmup: int, side: JaxSide | None = None
) -> dict:
  """Both steps timed alternately; `side`: an already built boldjax side of this family."""
  import torch

  log = compile_log()
  side = side if side is not None else build_jax(load_config(family))
  tside = build_torch(family, side)
  jl, tl = parity_losses(side, tside)
  if not math.isclose(jl, tl, rel_tol=LOSS_RTOL):
    raise AssertionError(
      f"benchmarks.run {family}: boldjax loss {jl!r} != torch loss {tl!r} (rtol {LOSS_RTOL}) "
      "on the same weights and batch; not timing different models"
    )

  c0, s0 = log.compiles, log.seconds
  t0 = time.perf_counter()
  state, metrics = side.step(side.state, side.batch)
  jax.block_until_ready((state, metrics))
  first_call = time.perf_counter() - t0
  compile_s = log.seconds - s0
  compiles_warmup = log.compiles - c0
  for _ in range(warmup):
    state, metrics = side.step(state, side.batch)
    tside.step()
  jax.block_until_ready(state)

  c1 = log.compiles
  jax_times, torch_times = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps_per_repeat):
      state, metrics = side.step(state, side.batch)
    jax.block_until_ready((state, metrics))
    jax_times.append((time.perf_counter() - t0) / steps_per_repeat)
    t0 = time.perf_counter()
    for _ in range(steps_per_repeat):
      tside.step()
    torch_times.append((time.perf_counter() - t0) / steps_per_repeat)
  recompiles = log.compiles - c1
  jax_step, torch_step = float(np.median(jax_times)), float(np.median(torch_times))

  shapes, count = shapes_and_flops(family, side)
  tokens = shapes["batch"] * shapes["tokens_per_row"]
  return {
    "family": family,
    "config": config_name(family),
    **shapes,
    "params": int(sum(x.size for x in jax.tree.leaves(side.state.params))),
    "loss_boldjax": jl,
    "loss_torch": tl,
    "step_s_boldjax": jax_step,
    "step_s_torch": torch_step,
    "step_s_boldjax_repeats": jax_times,
    "step_s_torch_repeats": torch_times,
    "tokens_per_s_boldjax": tokens / jax_step,
    "tokens_per_s_torch": tokens / torch_step,
    "ratio_boldjax_over_torch": torch_step / jax_step,
    "train_step_gflop": count.train_step / 1e9,
    "gflops_boldjax": count.train_step / jax_step / 1e9,
    "gflops_torch": count.train_step / torch_step / 1e9,
    "compile_s": compile_s,
    "first_call_s": first_call,
    "compiles_in_warmup": compiles_warmup,
    "recompiles_after_warmup": recompiles,
    "torch_threads": torch.get_num_threads(),
    "repeats": repeats,
    "steps_per_repeat": steps_per_repeat,
  }


# ---------------------------------------------------------------------------------------
# Backbone feature passes (no train step).
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class PassSides:
  config: Any  # the boldjax ViTConfig (open_clip layout)
  batch: int
  jax_pass: Callable[[], Any]  # -> (local, global) jax arrays
  torch_pass: Callable[[], Any]  # -> (local, global) torch tensors, under no_grad


def build_pass(name: str, batch: int | None = None, seed: int = 0) -> PassSides:
  """Both feature passes of PASSES[name]: a torch open_clip tower with torch's init (seeded),
  its state_dict converted by boldjax.convert.vision into the boldjax ViT, the token cache's
  jitted function (boldjax.data.token_cache.make_token_fn around vit.get_tokens, the
  encoding data's default grid and normalisation) and the seed's get_tokens + resize, on the
  same random uint8 images."""
  import torch

  from benchmarks import torch_vit
  from boldjax.convert.vision import convert_state_dict
  from boldjax.data import encoding_pipeline, token_cache
  from boldjax.models import vit

  if name not in PASSES:
    raise ValueError(f"benchmarks.run: expected a pass in {sorted(PASSES)}, found {name!r}")
  preset, default_batch = PASSES[name]
  batch = int(batch or default_batch)
  base = vit.PRESETS[preset]
  config = torch_vit.openclip_layout(base, act=base.act)  # tiny: its sizes and GELU
  torch.manual_seed(seed)
  net = torch_vit.from_config(config).eval()
  params, _ = convert_state_dict(torch_vit.state_dict_numpy(net), config, source=f"torch {name}")
  tok = encoding_pipeline.default_config().tokens
  grid, mean, std = tuple(tok.grid), tuple(tok.mean), tuple(tok.std)
  fn = token_cache.make_token_fn(
    lambda p, x: vit.get_tokens(p, x, config),
    image_size=config.image_size, grid=grid, mean=mean, std=std,
  )  # fmt: skip
  size = config.image_size
  images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  params, x = jax.device_put(params), jax.device_put(images)
  timages = torch.from_numpy(images)

  def torch_pass():
    with torch.no_grad():  # as the seed's PLModel.forward
      return torch_vit.feature_pass(net, timages, grid, mean, std)

  return PassSides(config, batch, lambda: fn(params, x), torch_pass)


def tokens_error(sides: PassSides) -> float:
  """max over local and global tokens of max |boldjax - torch| / max |torch|."""
  jl, jg = jax.device_get(sides.jax_pass())
  tl, tg = sides.torch_pass()
  errs = []
  for a, b in ((jl, tl.numpy()), (jg, tg.numpy())):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
      raise AssertionError(
        f"benchmarks.run: token shapes differ: boldjax {a.shape}, torch {b.shape}"
      )
    errs.append(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)))
  return max(errs)


def bench_pass(
  name: str, repeats: int, steps_per_repeat: int, warmup: int, batch: int | None = None
) -> dict:
  """A backbone feature pass, boldjax and torch timed alternately after the tokens agree."""
  import torch

  from boldjax.models import vit

  log = compile_log()
  sides = build_pass(name, batch)
  c0, s0 = log.compiles, log.seconds
  t0 = time.perf_counter()
  jax.block_until_ready(sides.jax_pass())
  first_call = time.perf_counter() - t0
  compile_s, compiles_warmup = log.seconds - s0, log.compiles - c0
  err = tokens_error(sides)
  if not err <= TOKENS_RTOL:
    raise AssertionError(
      f"benchmarks.run {name}: boldjax and torch tokens differ by {err:.3g} of their scale "
      f"(> {TOKENS_RTOL}) on the same weights and images; not timing different models"
    )
  for _ in range(warmup):
    jax.block_until_ready(sides.jax_pass())
    sides.torch_pass()
  c1 = log.compiles
  jax_times, torch_times = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps_per_repeat):
      out = sides.jax_pass()
    jax.block_until_ready(out)
    jax_times.append((time.perf_counter() - t0) / steps_per_repeat)
    t0 = time.perf_counter()
    for _ in range(steps_per_repeat):
      sides.torch_pass()
    torch_times.append((time.perf_counter() - t0) / steps_per_repeat)
  jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
  cfg, B = sides.config, sides.batch
  T = cfg.grid**2 + cfg.num_prefix
  count = vit_flops(cfg, B)
  return {
    "family": name,
    "config": f"boldjax.models.vit.PRESETS[{PASSES[name][0]!r}] in the open_clip layout",
    "batch": B,
    "tokens_per_row": T,
    "width": cfg.width,
    "depth": cfg.layers,
    "image_size": cfg.image_size,
    "params": int(sum(np.size(a) for a in jax.tree.leaves(vit.abstract_params(cfg)))),
    "tokens_rel_error": err,
    "step_s_boldjax": jax_s,
    "step_s_torch": torch_s,
    "step_s_boldjax_repeats": jax_times,
    "step_s_torch_repeats": torch_times,
    "images_per_s_boldjax": B / jax_s,
    "images_per_s_torch": B / torch_s,
    "tokens_per_s_boldjax": B * T / jax_s,
    "tokens_per_s_torch": B * T / torch_s,
    "ratio_boldjax_over_torch": torch_s / jax_s,
    "train_step_gflop": count.forward / 1e9,  # one forward pass (no backward)
    "gflops_boldjax": count.forward / jax_s / 1e9,
    "gflops_torch": count.forward / torch_s / 1e9,
    "compile_s": compile_s,
    "first_call_s": first_call,
    "compiles_in_warmup": compiles_warmup,
    "recompiles_after_warmup": log.compiles - c1,
    "torch_threads": torch.get_num_threads(),
    "repeats": repeats,
    "steps_per_repeat": steps_per_repeat,
  }


def config_name(family: str) -> str:
  """configs/x.py[:arg] plus the OVERRIDES the benchmark applies."""
  name = CONFIGS[family].replace(".", "/") + ".py"
  if family in CONFIG_ARGS:
    name += ":" + CONFIG_ARGS[family]
  sets = " ".join(f"--config.{k}={v}" for k, v in OVERRIDES.get(family, {}).items())
  return f"{name} {sets}" if sets else name


def factortopy_flops(model, batch: int, grid: tuple[int, int]) -> flops_lib.FlopCount:
  """FactorTopy forward on `batch` images: the bottlenecks (local at every grid pixel and
  global, per layer), the three selector MLPs on the N vertices, the 4 bilinear taps of every
  layer (weighted sums over the bottleneck channels), the global mix over layers and the
  readout. No attention; the train step is 3x (the selectors' input takes no gradient)."""
  N, L, bd, hid = model.num_vertices, model.num_layers, model.bottleneck, model.hidden
  dims = model.token_dim
  widths = [dims] * L if isinstance(dims, int) else list(dims)
  pixels = batch * int(grid[0]) * int(grid[1])
  dense = flops_lib.dense
  bottlenecks = sum(dense(pixels, c, bd) + dense(batch, c, bd) for c in widths)
  pe = 6 * model.num_freqs
  selectors = sum(dense(N, pe, hid) + dense(N, hid, hid) + dense(N, hid, k) for k in (2, L, 1))
  sampled = 2.0 * N * batch * bd * (4 * L + L + 1)  # taps, global mix, readout
  return flops_lib.FlopCount(bottlenecks + selectors + sampled, 0.0)


def vit_flops(config, batch: int) -> flops_lib.FlopCount:
  """ViT forward on `batch` images at config.image_size: patch embedding, the blocks on the
  prefix + patch tokens, the projection of the pooled token."""
  grid = config.grid
  T = grid * grid + config.num_prefix
  blocks = flops_lib.transformer_blocks(batch, T, config.width, config.layers, config.mlp_dim)
  patch = flops_lib.dense(batch * grid * grid, config.channels * config.patch_size**2, config.width)
  proj = flops_lib.dense(batch, config.width, config.output_dim) if config.output_dim else 0.0
  return flops_lib.FlopCount(patch + blocks.matmul + proj, blocks.attention)


def shapes_and_flops(family: str, side: JaxSide) -> tuple[dict, flops_lib.FlopCount]:
  """Batch, tokens per row (what tokens/s counts), width, depth, and the analytic FLOPs.

  Tokens per row: patch GPT N + 1 (subject token); CSM and the LSTM autoencoder the padded
  frames S; Seq- and
  Network-BERT the packed pair Ta + Tb + 3 (two SEPs and the CLS); DINO 2 views x (1 + N*P)
  student tokens.
  """
  task, host = side.task, side.host_batch
  if family in ENCODING:  # tokens per row: the vertices predicted per image
    m = task.model
    B, _, h, w, C = host["local"].shape
    shapes = dict(batch=B, tokens_per_row=m.num_vertices, width=C, depth=m.num_layers)
    return shapes, factortopy_flops(m, B, (h, w))
  if family == "dino":
    enc = task.encoder
    B = host["views"].shape[0]
    L = 1 + len(enc.network_rois) * enc.num_patches
    shapes = dict(batch=B, tokens_per_row=2 * L, width=enc.embed_dim, depth=enc.depth)
    return shapes, flops_lib.dino(enc, task.head, B)
  if family in ("vae", "fmri2img"):
    return conv_shapes_and_flops(family, side)
  model = task.model
  if family == "patch_gpt":
    B, N = host["patches"].shape[:2]
    shapes = dict(batch=B, tokens_per_row=N + 1, width=model.embed_dim, depth=model.depth)
    return shapes, flops_lib.patch_gpt(model, B)
  B, S = host["bold"].shape[:2]
  if family in ("seq_bert", "net_bert"):
    L = S + host["bold_next"].shape[1] + 3
    shapes = dict(batch=B, tokens_per_row=L, width=model.embed_dim, depth=model.num_layers)
    return shapes, flops_lib.seq_bert(model, B, L)
  shapes = dict(batch=B, tokens_per_row=S, width=model.embed_dim, depth=model.num_layers)
  if family == "autoencoder":
    return shapes, flops_lib.lstm_autoencoder(model, B, S)
  return shapes, flops_lib.csm_gpt(model, B, S)


def xla_flops(fn: Callable, *args: Any) -> float:
  """XLA's FLOP count of fn(*args) compiled (the convolutions included)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def conv_shapes_and_flops(family: str, side: JaxSide) -> tuple[dict, flops_lib.FlopCount]:
  """The VAE families: tokens per row = image pixels; FLOPs from XLA's count of the
  forward. fmri2img: encoder forward x3 (weights and input gradients) + frozen decoder x2
  (forward and input gradient, no weight gradient)."""
  from boldjax.models import vae as vae_lib

  task, host = side.task, side.host_batch
  cfg = task.vae_config
  B, H, W, _ = host["image"].shape
  shapes = dict(batch=B, tokens_per_row=H * W, width=max(cfg.block_out_channels),
                depth=len(cfg.block_out_channels))  # fmt: skip
  # Shapes only: the timed steps have donated side.state's buffers.
  spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
  params = spec(nn.unbox(side.state.params))
  apply = lambda p, x: task.model.apply({"params": p}, x)  # noqa: E731
  if family == "vae":
    return shapes, flops_lib.FlopCount(xla_flops(apply, params, host["image"]), 0.0)
  enc = xla_flops(apply, params, host["fmri"])
  latent = jax.eval_shape(apply, params, host["fmri"])["latent"]
  dec = xla_flops(lambda p, z: vae_lib.decode(p, z, cfg), spec(side.state.extra["vae"]), latent)
  return shapes, flops_lib.FlopCount(enc, 0.0, no_grad=2.0 * dec)


def machine() -> dict:
  import flax
  import torch

  cpu = ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
  except OSError:
    commit = ""
  return {
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "torch": torch.__version__,
    "commit": commit,
  }


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> dict:
  from boldjax import xla_flags

  xla_flags.apply_defaults()  # before the first jax computation, as every entry point
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--family", default="all", choices=(*FAMILIES, *PASSES, "all"))
  p.add_argument("--json", action="store_true", help="print one JSON document")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--no-wait", action="store_true", help="time even if the machine is busy")
  args = p.parse_args(argv)

  import torch

  # The cores this process may run on (taskset / cgroup pinning), not the machine's count:
  # torch with more threads than cores loses most of its time at barriers.
  torch.set_num_threads(len(os.sched_getaffinity(0)) or 1)
  families = (*FAMILIES, *PASSES) if args.family == "all" else (args.family,)
  load, waited = (load_average(), 0.0) if args.no_wait else wait_for_idle()
  result: dict[str, Any] = {
    "machine": machine(),
    "load_1min_before": load,
    "waited_for_idle_s": waited,
    "matmul_ceiling_gflops": flops_lib.matmul_ceiling(),
    "families": [],
  }
  for fam in families:
    # With --json, stdout carries the JSON only: progress (dataset builds) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
      if fam in PASSES:
        r = bench_pass(fam, args.repeats, args.steps, args.warmup)
      else:
        r = bench_family(fam, args.repeats, args.steps, args.warmup)
    r["peak_rss_mb_process"] = peak_rss_mb()
    r["fraction_of_ceiling_boldjax"] = r["gflops_boldjax"] / result["matmul_ceiling_gflops"]
    result["families"].append(r)
  result["load_1min_after"] = load_average()
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(format_table(result))
  return result


def format_table(result: dict) -> str:
  """Markdown table of a run's figures (also used for benchmarks/README.md)."""
  rows = [
    "| family | tokens/s boldjax | tokens/s torch | boldjax/torch | GFLOP/s boldjax | "
    "GFLOP/s torch | % of ceiling (jax) | compile s | recompiles | peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["families"]:
    rows.append(
      f"| {r['family']} | {r['tokens_per_s_boldjax']:.0f} | {r['tokens_per_s_torch']:.0f} | "
      f"{r['ratio_boldjax_over_torch']:.2f}x | {r['gflops_boldjax']:.1f} | "
      f"{r['gflops_torch']:.1f} | {100 * r['fraction_of_ceiling_boldjax']:.0f}% | "
      f"{r['compile_s']:.1f} | {r['recompiles_after_warmup']} | "
      f"{r['peak_rss_mb_process']:.0f} |"
    )
  m = result["machine"]
  rows.append("")
  rows.append(
    f"f32 matmul ceiling (jnp.dot 2048^3): {result['matmul_ceiling_gflops']:.1f} GFLOP/s; "
    f"1-min load before {result['load_1min_before']:.2f}, after "
    f"{result['load_1min_after']:.2f}; {m['nproc']} x {m['cpu']}; jax {m['jax']}, "
    f"torch {m['torch']}"
  )
  return "\n".join(rows)


if __name__ == "__main__":
  main()
