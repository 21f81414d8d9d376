"""Helpers the analysis tests share (testonly)."""

import numpy as np


def random_symmetric(spectrum, seed=0):
  """Q diag(spectrum) Q^T for a random orthogonal Q."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((len(spectrum), len(spectrum))))
  return (q * spectrum) @ q.T
