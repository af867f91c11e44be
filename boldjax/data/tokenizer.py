"""k-means patch tokenizer (boldGPT's KMeansTokenizer) in numpy.

Tokens are the nearest vocabulary entry by squared Euclidean distance. Distances are
computed in float64 with the expansion ||x||^2 - 2 x.v + ||v||^2, so near-ties resolve like
an exact computation (boldGPT's torch.cdist is float32; the parity fixture certifies its
margins are far above float32 error, so both agree there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import BinaryIO

import numpy as np

_CHUNK = 8192  # rows per distance block: bounds memory at CHUNK x V float64


@dataclasses.dataclass(frozen=True, eq=False)
class KMeansTokenizer:
  """A (V, D) float32 codebook; encode = nearest centroid, decode = centroid lookup."""

  vocab: np.ndarray  # (V, D) float32

  def __post_init__(self):
    vocab = np.asarray(self.vocab)
    if vocab.ndim != 2 or vocab.shape[0] < 1:
      raise ValueError(f"KMeansTokenizer: vocab must be (V, D) with V >= 1, found {vocab.shape}")
    if not np.all(np.isfinite(vocab)):
      raise ValueError("KMeansTokenizer: vocab has non-finite entries")
    object.__setattr__(self, "vocab", vocab.astype(np.float32))

  @property
  def vocab_size(self) -> int:
    return self.vocab.shape[0]

  @property
  def dim(self) -> int:
    return self.vocab.shape[1]

  @classmethod
  def fit(
    cls,
    patches: np.ndarray,
    vocab_size: int = 1024,
    seed: int = 42,
    batch_size: int = 4096,
    max_iter: int = 100,
  ) -> KMeansTokenizer:
    """MiniBatchKMeans(n_init="auto") like boldGPT's scripts/fit_vocab.py.

    Pass interior patches only (boldGPT does), so no token is spent on the boundary.
    """
    from sklearn.cluster import MiniBatchKMeans

    x = np.asarray(patches, np.float32)
    x = x.reshape(-1, x.shape[-1])
    if len(x) < vocab_size:
      raise ValueError(
        f"KMeansTokenizer.fit: need at least vocab_size={vocab_size} patches, found {len(x)}"
      )
    km = MiniBatchKMeans(
      n_clusters=vocab_size,
      n_init="auto",
      random_state=seed,
      batch_size=batch_size,
      max_iter=max_iter,
    )
    km.fit(x)
    return cls(km.cluster_centers_.astype(np.float32))

  def encode(self, patches: np.ndarray) -> np.ndarray:
    """(..., D) -> (...,) int32 index of the nearest vocab entry (first one on exact ties)."""
    x = np.asarray(patches)
    if x.shape[-1] != self.dim:
      raise ValueError(f"encode: patches must end in dim {self.dim}, found shape {x.shape}")
    lead = x.shape[:-1]
    x = x.reshape(-1, self.dim)
    v = self.vocab.astype(np.float64)
    v_sq = np.einsum("vd,vd->v", v, v)
    out = np.empty(len(x), np.int32)
    for start in range(0, len(x), _CHUNK):
      xc = x[start : start + _CHUNK].astype(np.float64)
      d = np.einsum("nd,nd->n", xc, xc)[:, None] - 2.0 * (xc @ v.T) + v_sq[None, :]
      out[start : start + _CHUNK] = np.argmin(d, axis=-1)
    return out.reshape(lead)

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """(...,) token ids -> (..., D) float32 centroids."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
      raise ValueError(
        f"decode: tokens must be in [0, {self.vocab_size}), found range "
        f"[{tokens.min()}, {tokens.max()}]"
      )
    return self.vocab[tokens]

  def save(self, path: str | os.PathLike | BinaryIO) -> None:
    """Write an .npz (to a path, used verbatim, or an open binary file)."""
    with _open_for_write(path) as f:
      np.savez(f, vocab=self.vocab)

  @classmethod
  def load(cls, path: str | os.PathLike) -> KMeansTokenizer:
    with np.load(path) as z:
      if "vocab" not in z.files:
        raise ValueError(f"{path}: field 'vocab' missing; found fields {z.files}")
      return cls(z["vocab"])


@contextlib.contextmanager
def _open_for_write(path):
  if hasattr(path, "write"):
    yield path
  else:
    with open(path, "wb") as f:
      yield f
