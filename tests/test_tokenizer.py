"""KMeansTokenizer: exact token parity with boldGPT's fixture, fit, round trips."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from boldjax.data.patching import PatchLayout
from boldjax.data.tokenizer import KMeansTokenizer
from tests import parity

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fixture(case: str) -> pathlib.Path:
  return parity.folder(case)


def test_fixture_tokens_exact():
  path = _fixture("boldgpt_categorical")
  sd, outputs = np.load(path / "state_dict.npz"), np.load(path / "outputs.npz")
  tok = KMeansTokenizer(sd["tokenizer.vocab"])
  tokens = tok.encode(outputs["patches"])
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, outputs["tokens"])
  np.testing.assert_array_equal(
    tok.encode(outputs["patches_random_order"]), outputs["tokens_random_order"]
  )


def test_decode_encode_vocab_identity_and_save(tmp_path):
  vocab = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
  tok = KMeansTokenizer(vocab)
  np.testing.assert_array_equal(tok.encode(vocab), np.arange(300))
  np.testing.assert_array_equal(tok.decode(tok.encode(vocab)), vocab)
  tok.save(tmp_path / "tok.npz")
  np.testing.assert_array_equal(KMeansTokenizer.load(tmp_path / "tok.npz").vocab, vocab)
  with pytest.raises(ValueError, match=r"tokens must be in \[0, 300\), found range \[0, 300\]"):
    tok.decode(np.array([0, 300]))
  with pytest.raises(ValueError, match="patches must end in dim 16"):
    tok.encode(np.zeros((2, 15)))


def test_encode_matches_brute_force():
  rng = np.random.default_rng(1)
  vocab = rng.normal(size=(64, 25)).astype(np.float32)
  x = rng.normal(size=(5, 2000, 25)).astype(np.float32)  # > one 8192-row chunk
  d = ((x.astype(np.float64)[..., None, :] - vocab.astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(KMeansTokenizer(vocab).encode(x), d.argmin(-1))


def test_fit_recovers_separated_clusters():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(8, 10)) * 10
  labels = np.repeat(np.arange(8), 250)
  x = (centres[labels] + rng.normal(size=(2000, 10)) * 0.1).astype(np.float32)
  tok = KMeansTokenizer.fit(x[rng.permutation(2000)], vocab_size=8, seed=0, batch_size=512)
  dist = np.linalg.norm(tok.vocab[:, None] - centres[None], axis=-1)
  assignment = dist.argmin(0)
  assert sorted(assignment.tolist()) == list(range(8))  # one fitted centroid per cluster
  assert dist.min(0).max() < 0.05
  np.testing.assert_array_equal(tok.encode(x), assignment[labels])
  again = KMeansTokenizer.fit(x[rng.permutation(2000)], vocab_size=8, seed=0, batch_size=512)
  assert np.abs(np.sort(again.vocab, 0) - np.sort(tok.vocab, 0)).max() < 0.05
  with pytest.raises(ValueError, match="need at least vocab_size=16 patches, found 10"):
    KMeansTokenizer.fit(x[:10], vocab_size=16)


def test_patchify_tokenize_decode_unpatchify_round_trip():
  mask = np.ones((40, 50), bool)  # every patch interior: vocab entries fit exactly
  layout = PatchLayout.from_mask(mask, 10, "radial")
  rng = np.random.default_rng(3)
  tok = KMeansTokenizer(rng.normal(size=(128, 100)).astype(np.float32))
  tokens = rng.integers(0, 128, size=(4, layout.num_patches))
  maps = layout.unpatchify(tok.decode(tokens))
  patches = layout.patchify(maps)
  np.testing.assert_array_equal(tok.encode(patches), tokens)
  np.testing.assert_array_equal(layout.unpatchify(tok.decode(tok.encode(patches))), maps)
