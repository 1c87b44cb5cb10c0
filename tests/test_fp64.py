"""float64 inputs get float64 arithmetic on the CPU: scales, coefficients and sums (moments, norms,
dots) in double, so every op agrees with a float64 reference to ~1e-12 (fp32 scales or fp32 partial
sums leave ~1e-7). guidance_stats keeps its fp32 output: its values are the float64 ones rounded once.
"""
import pytest
import torch

import fastguide
from fastguide import _eager
from fastguide.frequency import operators
from reference import guide64, rel_err

SHAPES = ((3, 17, 59), (2, 7, 1201))
TOL = 1e-12


def _inputs(shape, n=3):
    return [torch.randn(shape, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op,kw", [("cfg", {}), ("cfg", {"rescale": 0.7, "original": True}),
                                   ("pag", {}), ("pag", {"rescale": 0.7}),
                                   ("cfg_zero_star", {}), ("cfg_zero_star", {"rescale": 0.5})])
def test_guidance_fp64(op, kw, shape):
    c, u, p = _inputs(shape)
    scale = torch.tensor([7.3, 2.1, 4.7][:shape[0]], dtype=torch.float64)
    args = (c, u, p, scale, 2.9) if op == "pag" else (c, u, scale)
    out = getattr(fastguide, op)(*args, **kw)
    ref = guide64(op, [c, u, p], scale, pag_scale=2.9, **kw)
    assert out.dtype == torch.float64 and rel_err(out, ref) < TOL


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("original", [False, True])
def test_apg_fp64(shape, original):
    c, u, _ = _inputs(shape)
    buf, ref_buf = fastguide.MomentumBuffer(-0.55), torch.zeros_like(c)
    for step in range(2):
        uu = u * (1 + 0.3 * step)
        out = fastguide.apg(c, uu, 5.3, eta=0.3, norm_threshold=11.1, momentum_buffer=buf, original=original)
        ref = _eager.apg(c, uu, None, 5.3, 0.3, 11.1, -0.55, ref_buf, c[0].numel(), original)
        assert rel_err(out, ref) < TOL, step
        assert rel_err(buf.running_average, ref_buf) < TOL, step


@pytest.mark.parametrize("shape,norm_dim", [((3, 17, 59), None), ((4, 5, 20011), -1)], ids=str)
def test_guidance_stats_fp64_is_the_float64_value_rounded_once(shape, norm_dim):
    c, u, g = _inputs(shape)
    raw = fastguide.guidance_stats(c, u, g, norm_dim=norm_dim).raw.flatten(0, -2)
    cf, uf, gf = (x.flatten(1) if norm_dim is None else x.flatten(0, -2) for x in (c, u, g))
    cols = [(cf * uf).sum(1), (cf * cf).sum(1), (uf * uf).sum(1), (cf * gf).sum(1), (gf * gf).sum(1)]
    nc = cols[1].sqrt().clamp_min(1e-8)
    cols += [cols[0] / (nc * cols[2].sqrt().clamp_min(1e-8)), cols[3] / (nc * cols[4].sqrt().clamp_min(1e-8))]
    ref = torch.stack(cols, 1)
    assert raw.dtype == torch.float32
    # Within half a unit in the last place of fp32 (plus a hair for a float64 value on a rounding tie).
    assert ((raw.double() - ref).abs() <= 2.0 ** -24 * ref.abs() * (1 + 1e-9)).all()


@pytest.mark.parametrize("method,kw", [("fft_box", {"cutoff": 3}), ("bilinear", {"size": (5, 9)})])
@pytest.mark.parametrize("original", [False, True])
def test_frequency_fp64(method, kw, original):
    c, u, _ = _inputs((3, 17, 59))
    out = fastguide.frequency_cfg(c, u, 1.3, 6.1, method=method, original=original, **kw)
    ph, pw = kw.get("size", (kw.get("cutoff"), kw.get("cutoff")))
    ah, aw = operators(method, 17, 59, ph, pw, c.device, torch.float64)
    ref = _eager.frequency_cfg(c, u, ah, aw, None, 1.3, None, 6.1, original)
    assert rel_err(out, ref) < TOL
    low, high = fastguide.frequency_split(c, method=method, **kw)
    assert rel_err(low, _eager.frequency_split(c, ah, aw)) < TOL and rel_err(low + high, c) < TOL


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cfgpp_fp64(shape):
    x, c, u = _inputs(shape)
    g = u + 0.37 * (c - u)
    out = fastguide.cfgpp_euler_step(x, c, u, 0.37, 3.7, 2.9)
    assert rel_err(out, (x - 3.7 * g) + 2.9 * u) < TOL
    a_t, a_prev = 0.3, 0.61
    out = fastguide.cfgpp_ddim_step(x, c, u, 0.37, a_t, a_prev)
    x0 = (x - (1 - a_t) ** 0.5 * g) / a_t ** 0.5
    assert rel_err(out, a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * u) < TOL
