"""Reconstruction metrics, baselines, the evaluator and the gallery CLI (fmri2img, issue 18
item 7): values on constructed cases, ridge exact on a linear forward model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cli_helpers import check_refusal, command_refuses

from boldjax import registry, sharding
from boldjax.evals import reconstruction as rec

SIZE = 16  # image side of the fakes (SSIM's Gaussian window needs >= 11)


def smooth_images(rng: np.random.Generator, n: int, size: int = SIZE, factors: int = 12):
  """(n, size, size, 3) images in [-1, 1] from `factors` smooth patterns, and the factor
  loadings (n, factors): a linear image of `factors` numbers."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  basis = []
  for k in range(factors):
    fx, fy, ph = 1 + k % 3, 1 + k // 4, k * 0.7
    pattern = np.cos(2 * np.pi * (fx * xx + fy * yy) + ph)
    basis.append(np.stack([pattern * c for c in (1.0, 0.6, -0.8)], -1))
  basis = np.stack(basis).reshape(factors, -1)
  z = rng.uniform(-1, 1, (n, factors))
  images = (z @ basis) * (1.5 / factors)  # linear in z: no clipping needed
  assert np.abs(images).max() <= 1.0
  return images.reshape(n, size, size, 3).astype(np.float32), z


# --------------------------------------------------------------------------------- metrics


def test_identical_images_score_one():
  images, _ = smooth_images(np.random.default_rng(0), 8)
  np.testing.assert_allclose(rec.pixel_correlation(images, images), 1.0, atol=1e-6)
  np.testing.assert_allclose(rec.ssim(images, images), 1.0, atol=1e-6)
  assert rec.two_way_identification(images, images) == 1.0


def test_shuffled_reconstructions_are_at_chance():
  rng = np.random.default_rng(1)
  truth = rng.normal(size=(500, 8, 8, 3))
  shuffled = truth[rng.permutation(500)]
  # Per row the win rate is the rank of its own correlation (uniform): sd 0.29 / sqrt(500).
  assert rec.two_way_identification(shuffled, truth) == pytest.approx(0.5, abs=0.04)
  assert abs(np.mean(rec.pixel_correlation(shuffled, truth))) < 0.02
  # The mean image is the same for every row: exactly half the pairs (ties count half).
  mean = np.broadcast_to(truth.mean(0), truth.shape)
  assert rec.two_way_identification(mean, truth) == pytest.approx(0.5, abs=1e-12)


def test_two_way_by_hand_on_three_images():
  true = np.array([[1, 2, 3], [3, 2, 1], [1, 3, 2]], float)
  pred = np.array([[1, 2, 3], [1, 3, 2], [2, 1, 3]], float)
  # corr(pred_i, true_j): row 0 = [1, -1, 0.5] (wins both), row 1 = [0.5, -0.5, 1] (own
  # -0.5 loses both), row 2 = [0.5, -0.5, -0.5] (own -0.5: loses to 0.5, ties -0.5).
  np.testing.assert_allclose(
    rec.correlation_matrix(pred, true),
    [[1, -1, 0.5], [0.5, -0.5, 1], [0.5, -0.5, -0.5]],
    atol=1e-12,
  )
  assert rec.two_way_identification(pred, true) == pytest.approx(2.5 / 6)


def test_pixel_correlation_and_ssim_values():
  rng = np.random.default_rng(2)
  truth, _ = smooth_images(rng, 4)
  # Correlation is invariant to gain and offset; SSIM is not.
  scaled = 0.5 * truth + 0.1
  np.testing.assert_allclose(rec.pixel_correlation(scaled, truth), 1.0, atol=1e-6)
  assert np.all(rec.ssim(scaled, truth) < 0.99)
  flipped = -truth
  np.testing.assert_allclose(rec.pixel_correlation(flipped, truth), -1.0, atol=1e-6)
  from skimage.metrics import structural_similarity

  one = structural_similarity(
    scaled[0].astype(np.float64), truth[0].astype(np.float64), channel_axis=-1,
    data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  )  # fmt: skip
  assert rec.ssim(scaled[:1], truth[:1])[0] == pytest.approx(one)
  # Images smaller than the Gaussian window still score (uniform window that fits).
  assert rec.ssim(truth[:, :6, :6], truth[:, :6, :6]) == pytest.approx(np.ones(4))


def test_two_way_needs_two_images():
  with pytest.raises(ValueError, match="at least 2"):
    rec.two_way_identification(np.zeros((1, 4)), np.zeros((1, 4)))


# ----------------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("n_train", [60, 20])  # more images than voxels, and fewer
def test_ridge_matches_sklearn_and_picks_alpha_on_val(n_train):
  from sklearn.linear_model import Ridge

  rng = np.random.default_rng(3)
  x = rng.normal(size=(n_train + 30, 30))
  y = x @ rng.normal(size=(30, 7)) + rng.normal(scale=3.0, size=(n_train + 30, 7)) + 2.0
  tr, va = slice(0, n_train), slice(n_train, None)
  fit = rec.fit_ridge(x[tr], y[tr], x[va], y[va], alphas=(0.1, 10.0, 1000.0))
  assert fit.alpha == min(fit.val_mse, key=fit.val_mse.get)
  for alpha in (0.1, 10.0, 1000.0):
    ref = Ridge(alpha=alpha).fit(x[tr], y[tr])
    mse = np.mean((ref.predict(x[va]) - y[va]) ** 2)
    assert fit.val_mse[alpha] == pytest.approx(mse, rel=1e-4)
  ref = Ridge(alpha=fit.alpha).fit(x[tr], y[tr])
  np.testing.assert_allclose(fit.predict(x[va]), ref.predict(x[va]), rtol=1e-4, atol=1e-4)


def test_ridge_pixels_exact_on_a_linear_forward_model():
  """voxels = pixels @ A with A injective on the images: ridge recovers the pixels."""
  rng = np.random.default_rng(4)
  images, _ = smooth_images(rng, 160)
  a = rng.normal(size=(SIZE * SIZE * 3, 40)).astype(np.float32)
  voxels = images.reshape(160, -1) @ a
  split = [rec.SplitData(voxels[s], images[s], np.arange(160)[s]) for s in
           (slice(0, 100), slice(100, 130), slice(130, 160))]  # fmt: skip
  base = rec.fit_baselines(*split, vae=None, alphas=(1e-6, 1e-3, 1.0, 1e3))
  assert base.alphas["ridge_pixels"] <= 1e-3
  np.testing.assert_allclose(base.recon["ridge_pixels"], split[2].image, atol=1e-3)
  m = rec.score(base.recon["ridge_pixels"], split[2].image)
  assert m["pixel_corr"] > 0.9999 and m["ssim"] > 0.999 and m["twoway_pixel"] == 1.0
  np.testing.assert_allclose(base.recon["mean_image"][0], split[0].image.mean(0), atol=1e-6)


# ---------------------------------------------------------- the evaluator, on fakes
# A perfect "model" (features return the seen image), a linear "VAE" (2x2 average pooling,
# decoded by repetition), and a pipeline serving the linear forward model's splits.

N_SPLIT = {"train": 96, "val": 32, "test": 24}


def fake_data():
  rng = np.random.default_rng(5)
  n = sum(N_SPLIT.values())
  images, _ = smooth_images(rng, n)
  voxels = images.reshape(n, -1) @ rng.normal(size=(SIZE * SIZE * 3, 48)).astype(np.float32)
  voxels = voxels + rng.normal(scale=0.5, size=voxels.shape)
  out, start = {}, 0
  for split, k in N_SPLIT.items():
    out[split] = (voxels[start : start + k].astype(np.float32), images[start : start + k])
    start += k
  return out


@registry.register("pipeline", "test_fake_fmri2img")
class FakePipeline:
  data = fake_data()

  @staticmethod
  def make_dataset(data_cfg, info, *, split, train, seed, batch_size, shard_index, shard_count):
    assert not train
    fmri, image = FakePipeline.data[split]
    ids = np.arange(len(fmri)) + {"train": 0, "val": 1000, "test": 2000}[split]
    batches = []
    for i in range(0, len(fmri), batch_size):
      k = min(batch_size, len(fmri) - i)
      pad = batch_size - k

      def padded(x, pad=pad):
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])

      batches.append({
        "fmri": padded(fmri[i : i + k]), "image": padded(image[i : i + k]),
        "image_id": padded(ids[i : i + k]), "valid": np.arange(batch_size) < k,
      })  # fmt: skip
    return batches


class FakeTask:
  def feature_params(self, params, extra):
    return params

  def features(self, params, batch):
    return {"recon": batch["image"] * params["gain"], "latent": batch["fmri"]}

  def encode_images(self, extra, images):
    b, h, w, c = images.shape
    return images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4)) * extra["scale"]

  def decode_latents(self, extra, z):
    return jnp.repeat(jnp.repeat(z / extra["scale"], 2, 1), 2, 2)


def fake_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict({"source": "test_fake_fmri2img", "eval_batch_size": 16})
  return c


class State:
  def __init__(self, gain):
    self.params = {"gain": jnp.float32(gain)}
    self.extra = {"scale": jnp.float32(2.0)}


def make_evaluator(**cfg):
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
  ev_cfg = ml_collections.ConfigDict({"type": "reconstruction", "every_steps": 1, **cfg})
  cls = registry.get("evaluator", "reconstruction")
  return cls("reconstruction", ev_cfg, task=FakeTask(), info=None, config=fake_config(),
             mesh=mesh, rules=())  # fmt: skip


def test_evaluator_scores_model_and_baselines():
  ev = make_evaluator()
  out = dict(ev.run(State(1.0), 1))
  p = "reconstruction/test"
  for metric in ("pixel_corr", "ssim", "twoway_pixel", "twoway_latent"):
    assert out[f"{p}/model/{metric}"] == pytest.approx(1.0, abs=1e-5), metric
  assert f"{p}/model/twoway_backbone" not in out  # no backbone weights: skipped
  assert out[f"{p}/mean_image/twoway_pixel"] == pytest.approx(0.5, abs=1e-9)
  # The linear forward model is decodable: ridge is well above chance, below the truth.
  for base in ("ridge_pixels", "ridge_latent"):
    assert 0.9 < out[f"{p}/{base}/twoway_pixel"] <= 1.0, (base, out)
    assert 0.5 < out[f"{p}/{base}/pixel_corr"] < 1.0, (base, out)
  # The baselines are cached; a different model changes only the model's row.
  again = dict(ev.run(State(0.5), 2))
  assert again[f"{p}/ridge_pixels/ssim"] == out[f"{p}/ridge_pixels/ssim"]
  assert again[f"{p}/model/pixel_corr"] == pytest.approx(1.0, abs=1e-5)
  assert again[f"{p}/model/ssim"] < 0.99
  res = ev.reconstructor.run(State(1.0).params, State(1.0).extra)
  assert list(res.image_id) == list(range(2000, 2000 + N_SPLIT["test"]))
  table = rec.format_table(res)
  assert "ridge_latent" in table and "twoway_backbone: skipped" in table


def test_evaluator_backbone_space_with_random_weights_when_allowed():
  cfg = rec.default_config(every_steps=1)
  cfg.baselines = False
  cfg.backbone.update({"name": "tiny", "allow_random": True, "image_size": 32})
  ev = make_evaluator(**cfg)
  out = dict(ev.run(State(1.0), 1))
  assert out["reconstruction/test/model/twoway_backbone"] == 1.0
  assert "reconstruction/test/ridge_pixels/ssim" not in out
  assert rec.backbone_wanted(rec.default_config(1).backbone).startswith("no backbone configured")
  assert rec.backbone_wanted({"name": "tiny"}).startswith("no backbone weights")
  assert rec.backbone_wanted({}).startswith("no backbone configured")
  from boldjax.cli import InputError

  with pytest.raises(InputError, match=r"backbone.name: expected the ViT preset"):
    rec.backbone_wanted({"weights": "vit.safetensors"})


def test_gallery_draws_every_row(tmp_path):
  from boldjax import reconstruct

  ev = make_evaluator()
  res = ev.reconstructor.run(State(1.0).params, State(1.0).extra)
  out = reconstruct.draw_gallery(res, str(tmp_path / "g.png"), n=6)
  from PIL import Image

  im = np.asarray(Image.open(out))
  assert im.shape[0] > 300 and im.shape[1] > 500
  np.testing.assert_array_equal(reconstruct.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])),
                                [0, 128, 255, 255])  # fmt: skip


# ----------------------------------------------------------------------- gallery CLI errors


def refuses(capsys, argv: list[str], match: str, out) -> str:
  """`python -m boldjax.reconstruct ARGV` in-process: one-line error, exit 2, no output."""
  from boldjax import cli, reconstruct

  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run_argparse(reconstruct.PROG, reconstruct.main, [str(a) for a in argv])
  err = capsys.readouterr().err
  return check_refusal(exit_info.value.code, err, reconstruct.PROG, match, out)


def test_gallery_cli_refuses_bad_input(tmp_path, capsys):
  out = tmp_path / "g.png"
  # One run as from a shell; the others in-process.
  command_refuses("boldjax.reconstruct", [f"--workdir={tmp_path / 'none'}", f"--out={out}"],
                  r"config\.json: not found", out)  # fmt: skip
  other = tmp_path / "enc"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"task": {"name": "encoding"}}))
  refuses(capsys, [f"--workdir={other}", f"--out={out}"],
          r"field 'task.name' expected 'fmri2img', found 'encoding'", out)  # fmt: skip
  refuses(capsys, [f"--workdir={other}", f"--out={out}", "--n=0"], r"--n: expected a positive", out)
  refuses(capsys, [f"--workdir={other}", "--out=g.jpg"], r"--out: expected a \.png", None)
  (other / "config.json").write_text(json.dumps({"task": {"name": "fmri2img"}}))
  refuses(capsys, [f"--workdir={other}", f"--out={out}", "--split=dev"],
          r"--split: expected one of", out)  # fmt: skip


def test_jax_devices_are_faked():
  assert jax.device_count() == 8  # the evaluator's batches are sharded over them


# ------------------------------------------- with the real task, VAE and synthetic data


def test_reconstructor_on_the_fmri2img_task_and_synthetic_data():
  """The fmri2img task (a tiny random VAE) on a small synthetic default: the evaluator's
  model row equals metrics recomputed from task.features on the eval rows, and the ridge ->
  latent baseline goes through the task's frozen encoder and decoder."""
  from boldjax.data import fmri2img_pipeline
  from boldjax.models import vae as vae_lib
  from boldjax.tasks.fmri2img import Fmri2ImgTask

  vcfg = vae_lib.preset("small", block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)
  rng = np.random.default_rng(1)

  def leaf(path, a):
    scale = jax.tree_util.keystr(path).endswith("['scale']")
    return (scale + rng.normal(0, 0.2, a.shape)).astype(np.float32)

  vae_params = jax.tree_util.tree_map_with_path(leaf, vae_lib.abstract_params(vcfg))
  config = ml_collections.ConfigDict({
    "seed": 0, "data": fmri2img_pipeline.default_config(),
    "task": {"name": "fmri2img", "decoder_from": "", "objective": "pixel", "latent_weight": 0.5},
    "model": {"name": "fmri2img", "hidden": (32, 64), "latent_size": 8, "dtype": "float32"},
  })  # fmt: skip
  config.data.synthetic.update(
    {"num_images": 96, "image_size": 16, "num_voxels": 40, "val_images": 16, "test_images": 16}
  )
  config.data.eval_batch_size = 16
  info = fmri2img_pipeline.prepare(config.data)
  task = Fmri2ImgTask(config, info, vae=(vcfg, vae_params))
  test = rec.collect_split(config, info, "test")
  params, extra = task.init(
    jax.random.key(0),
    {"fmri": test.fmri[:8], "image": test.image[:8], "valid": np.ones(8, bool)},
  )
  params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                        is_leaf=lambda a: hasattr(a, "value"))  # fmt: skip
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
  res = rec.Reconstructor(task, config, info, mesh, ()).run(params, extra)
  assert len(res.truth) == 16 and set(res.recon) == set(rec.METHODS)
  direct = task.features(
    task.feature_params(params, extra),
    {"fmri": test.fmri, "image": test.image, "valid": np.ones(16, bool)},
  )["recon"]
  np.testing.assert_allclose(res.recon["model"], np.asarray(direct), atol=1e-5)
  want = np.mean(rec.pixel_correlation(np.asarray(direct), test.image))
  assert res.metrics["model"]["pixel_corr"] == pytest.approx(want, abs=1e-5)
  latents = np.asarray(task.encode_images(extra, test.image))
  assert latents.shape == (16, 8, 8, 4)
  for method in rec.METHODS:
    m = res.metrics[method]
    assert set(m) == {"pixel_corr", "ssim", "twoway_pixel", "twoway_latent"}, method
    assert all(np.isfinite(v) for v in m.values()), (method, m)
  assert res.metrics["mean_image"]["twoway_pixel"] == pytest.approx(0.5)
  assert res.recon["ridge_latent"].min() >= -1 and res.recon["ridge_latent"].max() <= 1


# ------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def fmri2img_run(tmp_path_factory):
  """configs/vae.py:runlocal, then configs/fmri2img.py:runlocal decoding through it."""
  from run_helpers import with_overrides

  from boldjax import train

  vae_config = pytest.importorskip("configs.vae")
  fmri2img_config = pytest.importorskip("configs.fmri2img")
  root = tmp_path_factory.mktemp("fmri2img")
  train.run(vae_config.get_config("runlocal"), str(root / "vae"))
  config = with_overrides(fmri2img_config.get_config("runlocal"), **{
    "task.decoder_from": str(root / "vae"),
  })  # fmt: skip
  final = train.run(config, str(root / "run"))
  return str(root / "run"), final


@pytest.mark.slow
def test_reconstruct_cli_writes_the_gallery_and_the_run_metrics(fmri2img_run, tmp_path, capsys):
  from boldjax import reconstruct

  workdir, final = fmri2img_run
  out = tmp_path / "gallery.png"
  reconstruct.main([f"--workdir={workdir}", f"--out={out}", "--n=6"])
  assert out.stat().st_size > 10_000
  printed = capsys.readouterr().out
  rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
  for method in rec.METHODS:
    assert method in rows, printed
  # The same numbers as the run's own final evaluation (when its config has the evaluator).
  key = "reconstruction/test/model/twoway_pixel"
  if key in final:
    cols = rows["method"]
    got = float(rows["model"][cols.index("twoway_pixel")])
    assert got == pytest.approx(final[key], abs=1e-4), (got, final[key])


@pytest.mark.slow
def test_reconstruction_colab_executes(fmri2img_run, tmp_path, monkeypatch):
  import os
  from pathlib import Path

  import nbformat
  from nbclient import NotebookClient

  repo = Path(__file__).resolve().parents[1]
  workdir, _ = fmri2img_run
  monkeypatch.setenv("BOLDJAX_WORKDIR", workdir)
  monkeypatch.setenv("BOLDJAX_COLAB_OUT", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  nb = nbformat.read(repo / "colabs" / "reconstruction.ipynb", as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(repo)}}
  ).execute()
  outputs = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "ridge_pixels" in outputs and "model beats" in outputs, outputs[-2000:]
  assert (tmp_path / "reconstructions.png").stat().st_size > 10_000
