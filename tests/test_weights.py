"""guide_weights: the per-sample coefficients of MAG, TCFG, Perp-Neg, Mahiro and RenormCFG in one op (C++, Triton,
plain-PyTorch reference), checked against the float64 formulas the wrappers used before (torch.linalg.svd for TCFG)."""
import pytest
import torch

from fastguide import _eager, methods, ops
from fastguide.kernels import weights as tw

M = ops.WEIGHT_METHODS


def gram64(c, u):
    c, u = c.double().flatten(1), u.double().flatten(1)
    return (c * u).sum(1), (c * c).sum(1), (u * u).sum(1)


def formulas64(name, cu, cc, uu, s, s2=None, param=0.0):
    """The coefficient math as the wrappers spelled it out (float64, one torch op at a time)."""
    if name.startswith("mag"):
        e = torch.exp(-param * (cc - 2 * cu + uu).clamp_min(0).sqrt() / uu.sqrt())
        return [s * e] if name == "mag_original" else [1.0 + (s - 1.0) * e]
    if name.startswith("tcfg"):
        gram = torch.stack([torch.stack([cc, cu], -1), torch.stack([cu, uu], -1)], -2)
        U, S, _ = torch.linalg.svd(gram)
        e0, e1, lam = U[:, 0, 0], U[:, 1, 0], S[:, 0]
        k = torch.where(lam > 0, (e0 * cu + e1 * uu) / lam, 0.0)
        p, q = k * e0, k * e1
        a, b = (1.0 + s - s * p, -s * q) if name == "tcfg_original" else (s + (1.0 - s) * p, (1.0 - s) * q)
        return [a + b, a]
    if name.startswith("perp_neg"):
        pn, pp = (cu.sum(), cc.sum()) if name == "perp_neg_batch" else (cu, cc)
        alpha = torch.where(pp > 0, pn / pp, 0.0)
        return [torch.ones_like(s), s * (1 + s2 * alpha), -s * s2]
    if name.startswith("mahiro"):
        sim = cu.mean() if name == "mahiro_batch" else cu
        k = 2 * (sim + 1)
        return [s + k * (1 - s) / 4, s]
    gg = ((1 - s) ** 2 * uu + 2 * s * (1 - s) * cu + s * s * cc).clamp_min(0)
    ng, nmax = gg.sqrt(), param * cc.sqrt()
    f = torch.where((ng >= nmax) & (ng > 0), nmax / ng, 1.0)
    return [f, f * s]


def stats_for(name, B, dtype):
    c = torch.randn(B, 40, dtype=torch.float64)
    u = 0.7 * c + 0.4 * torch.randn(B, 40, dtype=torch.float64)
    if name.startswith("mahiro"):  # mahiro_sim's [B] mean cosines
        return (torch.rand(B, dtype=torch.float64) * 2 - 1).to(dtype)
    raw = torch.cat([torch.stack(gram64(c, u), 1), torch.randn(B, 4, dtype=torch.float64)], 1)  # [B, 7] like stats
    return raw.to(dtype)


@pytest.mark.parametrize("name", list(M))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_backend_equals_the_float64_formulas(name, dtype):
    B = 3
    stats = stats_for(name, B, dtype)
    x = stats.double()
    cu, cc, uu = (x, None, None) if x.dim() == 1 else (x[:, 0], x[:, 1], x[:, 2])
    for st, sv in ((None, 5.5), (torch.tensor([2.0, 3.0, 0.5]), 0.0), (torch.tensor(1.5, dtype=torch.float64), 0.0)):
        s = torch.full((B,), sv, dtype=torch.float64) if st is None else st.double().expand(B)
        s2t = torch.tensor([0.5, 1.0, 2.0])
        ref = torch.stack(formulas64(name, cu, cc, uu, s, s2t.double(), 0.7), 1)
        outs = {"eager": _eager.guide_weights(stats, M[name], st, sv, s2t, 0.0, 0.7),
                "op (C++ on CPU)": torch.ops.fastguide.guide_weights(stats, M[name], st, sv, s2t, 0.0, 0.7),
                "triton": tw.guide_weights(stats, M[name], st, sv, s2t, 0.0, 0.7)}
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        for which, out in outs.items():
            assert out.dtype == dtype and out.shape == ref.shape, which
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, msg=f"{which} {name}")


def test_tcfg_degenerate_gram_matrices():
    """c and u parallel, one of them zero, both zero: the closed form picks SVD's vector (or the same u')."""
    c = torch.randn(2, 30, dtype=torch.float64)
    cases = [(c, 2 * c), (c, torch.zeros_like(c)), (torch.zeros_like(c), c), (torch.zeros_like(c),) * 2,
             (c, torch.zeros_like(c) + torch.where(c > 0, 0.0, c))]  # the last: c, u with <c,u> = |u|^2
    for cond, uncond in cases:
        cu, cc, uu = gram64(cond, uncond)
        s = torch.full((2,), 4.0, dtype=torch.float64)
        ref = torch.stack(formulas64("tcfg", cu, cc, uu, s), 1)
        out = torch.ops.fastguide.guide_weights(torch.stack([cu, cc, uu], 1), M["tcfg"], None, 4.0, None, 0.0, 0.0)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_opcheck_and_no_autograd_formula():
    stats = torch.rand(2, 7)
    for name, m in M.items():
        st = stats[:, 0] if name.startswith("mahiro") else stats
        torch.library.opcheck(torch.ops.fastguide.guide_weights.default, (st, m, torch.tensor([2.0, 3.0]), 0.0, None,
                                                                         1.5, 0.5))
    leaf = stats.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="fastguide::guide_weights has no autograd formula"):
        torch.ops.fastguide.guide_weights.default(leaf, M["mag"], None, 3.0, None, 0.0, 1.0)
    with pytest.raises((ValueError, RuntimeError), match="method must be in 0..8"):
        torch.ops.fastguide.guide_weights.default(stats, 9, None, 3.0, None, 0.0, 1.0)


def test_wrappers_stay_differentiable_through_the_reference_math():
    """A gradient through MAG / TCFG / RenormCFG (guidance_stats has a formula) takes the eager coefficients."""
    c = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    c32, u32 = (x.detach().float().requires_grad_() for x in (c, u))
    for fn in (lambda c, u: methods.mag(c, u, 5.0, 2.0), lambda c, u: methods.tcfg(c, u, 5.0),
               lambda c, u: ops.renorm_cfg(c, u, 5.0, 1.0)):
        assert torch.autograd.gradcheck(fn, (c, u))
        fn(c32, u32).sum().backward()
        assert torch.isfinite(c32.grad).all() and torch.isfinite(u32.grad).all()
