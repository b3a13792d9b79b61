"""The sampled-distribution check of speculative decoding, shared by the torch and JAX tests (tests/ is on
sys.path while its conftest loads)."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def assert_samples_follow(out: list[list[int]], exact: np.ndarray, st, vocab: int) -> None:
    """Rows of n sampled tokens `out` against the exact joint probabilities `exact` [vocab ** n] (C order):
    both accept and resample paths taken, no sample in a cell of probability 0, and a chi-square test (cells
    expecting fewer than 5 pooled) at a 1e-4 false-failure rate (the callers fix their seeds, so the result
    is deterministic)."""
    assert 0.1 < st.acceptance_rate < 0.95  # both accept and resample paths are exercised
    n = len(out[0])
    counts = np.bincount([np.ravel_multi_index(o, (vocab,) * n) for o in out], minlength=exact.size)
    assert counts[exact == 0].sum() == 0
    keep = exact * len(out) >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(exact[keep], exact[~keep].sum()) * len(out)
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert sps.chisquare(obs, exp).pvalue > 1e-4
