"""The vectorisable exp used inside the kernels, over its whole range."""

from __future__ import annotations

import numpy as np

from kernels._fastmath import exp_fast
from kernels._jit import numba


@numba.njit(cache=False)  # a test helper: nothing to cache
def _exp_array(x, out):
    for i in range(x.size):
        out[i] = exp_fast(x[i])


def test_exp_fast_is_within_two_ulp_and_handles_the_edges(dtype):
    x = np.concatenate([np.linspace(-800, 800, 40001), np.linspace(-3, 3, 10001),
                        [np.nan, np.inf, -np.inf, 0.0]]).astype(dtype)
    out = np.empty_like(x)
    _exp_array(x, out)
    with np.errstate(all="ignore"):
        ref = np.exp(x.astype(np.float64))
        normal = (ref > np.finfo(dtype).tiny) & (ref < np.finfo(dtype).max)
        rel = np.abs(out[normal] - ref[normal]) / ref[normal]
        assert rel.max() <= 2 * np.finfo(dtype).eps
        over = x.astype(np.float64) > np.log(np.finfo(dtype).max) + 1e-3
        assert np.all(np.isinf(out[over]))
        assert np.all(out[x.astype(np.float64) < np.log(np.finfo(dtype).smallest_subnormal) - 1] == 0)
    assert np.isnan(out[-4]) and out[-3] == np.inf and out[-2] == 0 and out[-1] == 1
