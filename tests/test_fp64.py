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


# --- against diffusers' guiders in float64 (scales such as 7.3 are not fp32 numbers: narrowing one to
# fp32 anywhere, on the float or the tensor path, leaves ~1e-7) ------------------------------------
def _guider(cls, step=1, **kw):
    from diffusers import guiders as dg

    g = getattr(dg, cls)(**kw)
    g.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(999))  # step 1: inside PAG's window
    g.prepare_inputs({})
    return g


SCALE = 7.3


@pytest.mark.parametrize("tensor_scale", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("cls,op,kw", [
    ("ClassifierFreeGuidance", "cfg", {}),
    ("ClassifierFreeGuidance", "cfg", {"guidance_rescale": 0.7, "use_original_formulation": True}),
    ("ClassifierFreeZeroStarGuidance", "cfg_zero_star", {"zero_init_steps": 0, "guidance_rescale": 0.3}),
    ("PerturbedAttentionGuidance", "pag", {"perturbed_guidance_scale": 2.9, "perturbed_guidance_layers": [0],
                                           "guidance_rescale": 0.1}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_guidance_fp64_equals_diffusers(cls, op, kw, tensor_scale):
    c, u, p = _inputs((2, 5, 9, 11))
    theirs = _guider(cls, guidance_scale=SCALE, **kw).forward(c, u, p) if op == "pag" else \
        _guider(cls, guidance_scale=SCALE, **kw).forward(c, u)
    s = torch.tensor(SCALE, dtype=torch.float64) if tensor_scale else SCALE
    args = (c, u, p, s, torch.tensor([2.9, 2.9], dtype=torch.float64) if tensor_scale else 2.9) if op == "pag" \
        else (c, u, s)
    rescale, original = kw.get("guidance_rescale", 0.0), kw.get("use_original_formulation", False)
    out = getattr(fastguide, op)(*args, rescale=rescale, original=original)
    assert out.dtype == torch.float64
    if op == "cfg_zero_star":
        # diffusers' cfg_zero_star_scale computes alpha in float32 even for float64 inputs (~1e-9 here);
        # ours is float64 throughout: equal to the float64 formula.
        assert rel_err(out, theirs.pred) < 1e-7
        assert rel_err(out, guide64(op, [c, u], SCALE, rescale=rescale, original=original)) < TOL
    else:
        assert rel_err(out, theirs.pred) < TOL


@pytest.mark.parametrize("tensor_scale", [False, True], ids=["float", "tensor"])
def test_apg_fp64_equals_diffusers_over_steps(tensor_scale):
    kw = dict(guidance_scale=SCALE, adaptive_projected_guidance_momentum=-0.55,
              adaptive_projected_guidance_rescale=11.1, eta=0.3, guidance_rescale=0.2)
    theirs = _guider("AdaptiveProjectedGuidance", step=0, **kw)  # (its momentum buffer starts at step 0)
    buf = fastguide.MomentumBuffer(-0.55)
    s = torch.tensor([SCALE, SCALE], dtype=torch.float64) if tensor_scale else SCALE
    for step in range(3):
        c, u, _ = _inputs((2, 4, 8, 8))
        if step:
            theirs.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(999 - step))
        ref = theirs.forward(c, u).pred
        out = fastguide.apg(c, u, s, eta=0.3, norm_threshold=11.1, momentum_buffer=buf, rescale=0.2)
        assert rel_err(out, ref) < TOL, step


def test_fdg_fp64_equals_diffusers():
    c, u, _ = _inputs((2, 4, 16, 16))
    for scales in ([10.3, 5.1], [9.1, 6.3, 2.2]):
        theirs = _guider("FrequencyDecoupledGuidance", guidance_scales=scales).forward(c, u).pred
        out = fastguide.fdg(c, u, [torch.tensor(s, dtype=torch.float64) for s in scales])
        assert rel_err(out, theirs) < TOL and rel_err(fastguide.fdg(c, u, scales), theirs) < TOL


def test_frequency_and_cfgpp_tensor_scales_fp64():
    """[B] float64 tensor scales reach the kernels unrounded (plain float64 math as the reference)."""
    c, u, x = _inputs((3, 2, 7, 10))
    sl, sh = torch.tensor([1.3, 0.7, 2.1], dtype=torch.float64), torch.tensor(6.1, dtype=torch.float64)
    out = fastguide.frequency_cfg(c, u, sl, sh, cutoff=2)
    ah, aw = operators("fft_box", 7, 10, 2, 2, c.device, torch.float64)
    low = sum(ah[t] @ (c - u) @ aw[t].T for t in range(ah.shape[0]))
    assert rel_err(out, u + sl.view(-1, 1, 1, 1) * low + 6.1 * ((c - u) - low)) < TOL
    lam = torch.tensor([0.37, 0.61, 0.13], dtype=torch.float64)
    g = u + lam.view(-1, 1, 1, 1) * (c - u)
    assert rel_err(fastguide.cfgpp_euler_step(x, c, u, lam, 3.7, 2.9), (x - 3.7 * g) + 2.9 * u) < TOL
