"""Generate whole flat maps from a trained patch-GPT checkpoint.

  python -m boldjax.sample --workdir=runs/gpt_small --num=8 --out=maps.png

Patches are sampled one at a time with a KV cache in the layout's order (radial by
default), de-tokenised through the k-means vocabulary and stitched back into flat maps.
With --prefix=K the first K patches of real held-out maps are given and the rest is
generated, and the real maps are drawn next to the completions.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from boldjax import cli, generate, workdir
from boldjax.data import pipeline_for
from boldjax.geometry.plotting import plot_flat_maps

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run directory.", required=True)
_NUM = flags.DEFINE_integer("num", 8, "Number of maps to generate.")
_OUT = flags.DEFINE_string("out", "maps.png", "Output PNG path.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = argmax).")
_PREFIX = flags.DEFINE_integer("prefix", 0, "Observed patches taken from held-out maps.")
_SUBJECT = flags.DEFINE_integer("subject", None, "Subject id (default: cycle over subjects).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def to_maps(values: np.ndarray, order: np.ndarray, layout, tokenizer) -> np.ndarray:
  """Sequence-ordered tokens (num, N) or patches (num, N, D) -> flat maps (num, H, W)."""
  patches = tokenizer.decode(values) if values.ndim == 2 else np.asarray(values, np.float32)
  in_layout = np.zeros_like(patches)
  rows = np.arange(patches.shape[0])[:, None]
  in_layout[rows, order] = patches
  return layout.unpatchify(in_layout * layout.patch_mask)


def held_out_examples(run, num: int) -> dict[str, np.ndarray]:
  """The first `num` validation examples in the layout order (no shuffling)."""
  ds = pipeline_for(run.config.data).make_dataset(
    run.config.data, run.info, split="val", train=False, seed=0, batch_size=num
  )
  return next(iter(ds))


def main(argv) -> None:
  del argv
  run = workdir.load_run(_WORKDIR.value, _STEP.value)
  info, num, k = run.info, _NUM.value, _PREFIX.value
  n = info.layout.num_patches
  if not 0 <= k < n:
    raise app.UsageError(f"--prefix must be in [0, {n}), found {k}")
  order = np.arange(n, dtype=np.int32)
  real = held_out_examples(run, num) if k else None
  if _SUBJECT.value is not None:
    subjects = np.full((num,), _SUBJECT.value, np.int32)
  elif real is not None:
    subjects = np.asarray(real["subject_id"], np.int32)
  else:
    subjects = np.arange(num, dtype=np.int32) % max(info.num_subjects, 1)
  prefix = {}
  if k:
    prefix["prefix_patches"] = real["patches"][:, :k]
    if "tokens" in real and info.tokenizer is not None:
      prefix["prefix_tokens"] = real["tokens"][:, :k]
  print(f"sampling {num} maps of {n} patches from step {run.step} (prefix {k}) ...", flush=True)
  values = generate.sample(
    run.task,
    run.state.params,
    num=num,
    subject_id=subjects,
    order=order,
    rng=jax.random.key(_SEED.value),
    temperature=_TEMPERATURE.value,
    **prefix,
  )
  values = np.asarray(values)
  maps = to_maps(values, np.broadcast_to(order, (num, n)), info.layout, info.tokenizer)
  titles = [f"sample {i} (sub {s})" for i, s in enumerate(subjects)]
  if real is not None:
    real_maps = info.layout.unpatchify(real["patches"])
    maps = np.concatenate([real_maps, maps])
    titles = [f"held-out {i}" for i in range(num)] + [f"{t}, first {k} given" for t in titles]
  path = plot_flat_maps(maps, info.mask, _OUT.value, titles=titles, ncols=min(num, 4),
                        colorbar_label="activity (z)")  # fmt: skip
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run_absl("python -m boldjax.sample", main)
