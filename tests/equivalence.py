"""One named tolerance for comparing two *different but mathematically equal* float32 computations.

Examples: batched vs one-by-one decoder calls (parallel decoding), cached sampling at stride 1 vs
plain sampling, the encoder/decoder split vs ``unet.forward``, the same model at 1 vs 2 torch
threads. Such pairs sum in another order, so they differ by rounding only: a few units of float32
roundoff (eps = 2**-24 * 2 ≈ 1.19e-7) per operation, relative to the size of the values summed.
Measured here: after 10 DDIM / DPM-Solver++ / Euler steps with guidance the largest difference
between parallel and sequential decoding is 3-4e-7 of the latents' largest magnitude (~45), i.e.
2-3 eps. An *absolute* tolerance ignores that scale: 1e-5 on latents of size 45 is 1.9 eps, which
another CPU's kernels exceed (issue #10).

``FLOAT32_EQUIV_RTOL`` = 1e-5 ≈ 84 eps of the compared tensor's largest magnitude: ~25x headroom
over the rounding seen, and still ~700x below the smallest real bug we injected (decoding with a
time embedding one *training* timestep off changes the latents by 7e-3 of their magnitude; see
``tests/test_sampler.py::test_equivalence_tolerance_catches_a_timestep_off_by_one``).
Comparisons of the *same* computation (same seed twice, resumed vs uninterrupted) stay exact.
"""

from __future__ import annotations

import torch

FLOAT32_EQUIV_RTOL = 1e-5


def assert_float32_equivalent(actual: torch.Tensor, expected: torch.Tensor, rtol: float = FLOAT32_EQUIV_RTOL) -> None:
    """Every element of ``actual`` within ``rtol * max|expected|`` of ``expected`` (same shape, finite)."""
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), "non-finite values"
    actual, expected = actual.double(), expected.double()
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, (
        f"max |difference| {err:.3e} exceeds {rtol:g} x max |expected| ({scale:.3e}): "
        f"{err / scale if scale else float('inf'):.2e} of the scale, more than float32 rounding explains"
    )
