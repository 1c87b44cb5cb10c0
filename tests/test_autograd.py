"""Autograd through every op: float64 gradcheck, gradients equal to independent references' in fp32,
torch.compile(fullgraph=True) forward + backward, and a clear error where an op has no formula."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DiffusersMomentumBuffer
from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

import fastguide
import reference
from fastguide import frequency, ops
from reference import guide64

SHAPE = (2, 3, 2, 4)


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def rand(shape=SHAPE, dtype=torch.float64, n=3):
    c = torch.randn(shape, dtype=torch.float64)
    xs = [c] + [c + 0.7 * torch.randn(shape, dtype=torch.float64) for _ in range(n - 1)]
    return leaves(*(x.to(dtype) for x in xs))


def gradcheck(fn, inputs, **kw):
    assert torch.autograd.gradcheck(fn, inputs, **kw)


# --- float64 gradcheck, every op ----------------------------------------------------------------------
GUIDE_CASES = [("cfg", 0.0, False), ("cfg", 0.7, True), ("pag", 0.0, True), ("pag", 0.5, False),
               ("cfg_zero_star", 0.0, False), ("cfg_zero_star", 0.6, True)]


@pytest.mark.parametrize("op,rescale,original", GUIDE_CASES, ids=str)
def test_gradcheck_guidance(op, rescale, original):
    """Through the raw op; scales are tensors that require grad too ([B] and 0-d)."""
    c, u, p = rand()
    s1, s2 = leaves(torch.tensor([3.1, -1.7], dtype=torch.float64), torch.tensor(2.3, dtype=torch.float64))
    f = getattr(torch.ops.fastguide, op).default
    if op == "pag":
        gradcheck(lambda c, u, p, s1, s2: f(c, u, p, s1, 0.0, s2, 0.0, rescale, original), (c, u, p, s1, s2))
    else:
        gradcheck(lambda c, u, s1: f(c, u, s1, 0.0, rescale, original), (c, u, s1))
        gradcheck(lambda c, u: f(c, u, None, 4.2, rescale, original), (c, u))  # a float scale


def test_gradcheck_rescale():
    pred, c = rand(n=2)
    gradcheck(lambda pred, c: fastguide.rescale(pred, c, 0.7), (pred, c))


@pytest.mark.parametrize("original", [False, True])
def test_gradcheck_frequency_ops(original):
    """Operators (the FFT box: two terms) included as differentiable inputs."""
    c, u = rand((2, 2, 6, 5), n=2)
    ah, aw = leaves(*frequency.operators("fft_box", 6, 5, 2, 2, "cpu", torch.float64))
    lo, hi = leaves(torch.tensor([1.3, -0.4], dtype=torch.float64), torch.tensor(5.2, dtype=torch.float64))
    f = torch.ops.fastguide.frequency_cfg.default
    gradcheck(lambda c, u, ah, aw, lo, hi: f(c, u, ah, aw, lo, 0.0, hi, 0.0, original), (c, u, ah, aw, lo, hi))
    gradcheck(lambda x, ah, aw: torch.ops.fastguide.frequency_split.default(x, ah, aw), (c, ah, aw))


def test_gradcheck_cfgpp_step():
    x, c, u = rand()
    lam, = leaves(torch.tensor([0.3, 0.8], dtype=torch.float64))
    f = torch.ops.fastguide.cfgpp_step.default
    gradcheck(lambda x, c, u, lam: f(x, c, u, 0.9, -1.3, 0.4, lam, 0.0), (x, c, u, lam))


@pytest.mark.parametrize("guided", [False, True])
def test_gradcheck_guidance_stats(guided):
    """The statistics are fp32 values: the finite differences need a larger step (the sums are quadratic,
    exact under central differences; the cosines smooth) and fp32-level tolerances."""
    c, u, g = rand()
    f = torch.ops.fastguide.guidance_stats.default
    gradcheck(lambda c, u, g: f(c, u, g if guided else None, 8), (c, u, g), eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("norm_dim,momentum", [(None, None), ((-2, -1), -0.5), (1, 0.3)], ids=str)
def test_gradcheck_apg(norm_dim, momentum):
    """fastguide.apg (the eager route when a gradient is needed), with a [B] scale, the norm clamp and a
    momentum buffer holding a previous step's average (a constant of this step)."""
    c, u = rand(n=2)
    s, = leaves(torch.tensor([4.1, 6.3], dtype=torch.float64))
    prev = torch.randn(SHAPE, dtype=torch.float64)

    def fn(c, u, s):
        buf = None
        if momentum is not None:
            buf = fastguide.MomentumBuffer(momentum)
            buf.running_average = prev.clone()
        return fastguide.apg(c, u, s, eta=0.4, norm_threshold=3.0, momentum_buffer=buf, norm_dim=norm_dim,
                             rescale=0.3)

    gradcheck(fn, (c, u, s))



SCALE_KINDS = ["per_sample", "0-d", "float"]
CHANNEL_SHAPES = [(2, 3, 2, 2), (2, 3)]  # [B, C, positions...]; 2-D: one position per sample


def _scale_arg(kind):
    """The scale as the raw op takes it (scale_t, scale) and the leaves to check (a tensor scale's)."""
    if kind == "float":
        return None, 0.8, ()
    t, = leaves(torch.tensor([0.8, 3.1], dtype=torch.float64) if kind == "per_sample"
                else torch.tensor(0.8, dtype=torch.float64))
    return t, 0.0, (t,)


def _second_order(kind):
    """gradgradcheck once per op (it costs several times gradcheck)."""
    return kind == "per_sample"


@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
def test_gradcheck_cfg_norm(shape, kind):
    """Both sides of the clamp: u = 0.5 c at sample 0's first position gives g = 0.9 c (its scale is 0.8):
    f = 1, r's gradient cut; u = 3 c at sample 1's last position gives g = 1.4 c or -3.2 c: f = |c| / |g|."""
    c, u = (x.detach() for x in rand(shape, n=2))
    cp, up = c.view(2, shape[1], -1), u.view(2, shape[1], -1)
    up[0, :, 0], up[1, :, -1] = 0.5 * cp[0, :, 0], 3.0 * cp[1, :, -1]
    st, s, extra = _scale_arg(kind)
    sv = (st.detach() if st is not None else torch.tensor(s, dtype=torch.float64)).expand(2).view(2, 1, 1)
    r = cp.norm(dim=1) / (up + sv * (cp - up)).norm(dim=1)
    assert r[0, 0] > 1 and r[1, -1] < 1
    c, u = leaves(c, u)
    f = torch.ops.fastguide.cfg_norm.default
    fn = lambda c, u, *t: f(c, u, t[0] if t else None, s, 0.7)  # noqa: E731
    gradcheck(fn, (c, u, *extra))
    if _second_order(kind):
        assert torch.autograd.gradgradcheck(fn, (c, u, *extra))


@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
def test_gradcheck_mahiro_sim(shape, kind):
    c, u = rand(shape, n=2)
    st, s, extra = _scale_arg(kind)
    fn = lambda c, u, *t: torch.ops.fastguide.mahiro_sim.default(c, u, t[0] if t else None, s)  # noqa: E731
    gradcheck(fn, (c, u, *extra))
    if _second_order(kind):
        assert torch.autograd.gradgradcheck(fn, (c, u, *extra))


@pytest.mark.parametrize("group_size", [6, 2])
def test_gradcheck_diff_stats(group_size):
    """One group per sample (Perp-Neg's use) and several; the sums are quadratic."""
    r, a, b = rand((2, 3, 2))
    fn = lambda r, a, b: torch.ops.fastguide.diff_stats.default(r, a, b, group_size)  # noqa: E731
    gradcheck(fn, (r, a, b))
    assert torch.autograd.gradgradcheck(fn, (r, a, b))

# --- fp32 gradients equal to the references' ----------------------------------------------------------
def grads(out, inputs, seed=0):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def assert_grads_close(ours, theirs, rtol=2e-5):
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("op,rescale,original", GUIDE_CASES, ids=str)
def test_fp32_grads_equal_reference(op, rescale, original):
    """Against tests/reference.py's formulas differentiated by PyTorch (float64 inside, fp32 leaves)."""
    c, u, p = rand((2, 4, 8, 8), torch.float32)
    s, = leaves(torch.tensor([5.5, 2.5]))
    inputs = [c, u, p, s] if op == "pag" else [c, u, s]
    args = (c, u, p, s, 1.7) if op == "pag" else (c, u, s)
    ours = grads(getattr(fastguide, op)(*args, rescale=rescale, original=original), inputs)
    theirs = grads(guide64(op, [c, u, p], s, pag_scale=1.7, rescale=rescale, original=original).float(), inputs)
    assert_grads_close(ours, theirs)


def test_fp32_apg_grads_equal_diffusers_over_steps():
    """Three steps with momentum: each step's gradients w.r.t. that step's inputs equal diffusers'
    normalized_guidance's, and the buffer equals diffusers' running average (values; no graph kept)."""
    buf, theirs_buf = fastguide.MomentumBuffer(-0.5), DiffusersMomentumBuffer(-0.5)
    for step in range(3):
        c, u = rand((2, 4, 8, 8), torch.float32, n=2)
        ours = fastguide.apg(c, u, 6.0, eta=0.3, norm_threshold=4.0, momentum_buffer=buf)
        ref = normalized_guidance(c, u, 6.0, theirs_buf, eta=0.3, norm_threshold=4.0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert_grads_close(grads(ours, [c, u], step), grads(ref, [c, u], step), rtol=1e-4)
        torch.testing.assert_close(buf.running_average, theirs_buf.running_average.detach())
        assert not buf.running_average.requires_grad
        theirs_buf.running_average = theirs_buf.running_average.detach()


def test_fp32_frequency_grads_equal_fresca_and_fdg():
    c, u = rand((2, 3, 16, 16), torch.float32, n=2)
    sl, sh = leaves(torch.tensor([1.0, 1.5]), torch.tensor(7.0))
    ours = grads(fastguide.frequency_cfg(c, u, sl, sh, cutoff=3), [c, u, sl, sh])
    d = c.double() - u.double()
    low = reference.fresca_fourier_filter(d, 1.0, 0.0, 3)
    ref = u.double() + sl.double().view(-1, 1, 1, 1) * low + sh.double() * (d - low)
    assert_grads_close(ours, grads(ref.float(), [c, u, sl, sh]))
    from diffusers.guiders import FrequencyDecoupledGuidance  # kornia's pyramid, differentiable

    for scales in ([9.0, 4.0], [9.0, 4.0, 2.0]):
        ours = grads(fastguide.fdg(c, u, scales), [c, u])
        theirs = grads(FrequencyDecoupledGuidance(guidance_scales=scales).forward(c, u).pred, [c, u])
        assert_grads_close(ours, theirs, rtol=1e-4)


def test_fp32_cfgpp_and_stats_grads_equal_plain_math():
    x, c, u = rand((2, 4, 8, 8), torch.float32)
    lam, = leaves(torch.tensor([0.4, 0.9]))
    g = u + lam.view(-1, 1, 1, 1) * (c - u)
    assert_grads_close(grads(fastguide.cfgpp_euler_step(x, c, u, lam, 2.5, 1.5), [x, c, u, lam]),
                       grads(x - 2.5 * g + 1.5 * u, [x, c, u, lam]))
    st = fastguide.guidance_stats(c, u, x)
    cf, uf, gf = (t.flatten(1) for t in (c, u, x))
    ref = torch.stack([(cf * uf).sum(1), (cf * cf).sum(1), (uf * uf).sum(1), (cf * gf).sum(1), (gf * gf).sum(1),
                       F.cosine_similarity(cf, uf, dim=1, eps=1e-8), F.cosine_similarity(cf, gf, dim=1, eps=1e-8)], 1)
    assert_grads_close(grads(st.raw, [c, u, x]), grads(ref, [c, u, x]), rtol=1e-4)


# --- ComfyUI's methods through the public wrappers: gradients of the node math in float64 -------------
PRECISIONS = [(torch.float64, 1e-10), (torch.float32, 1e-4)]  # (leaves' dtype, rtol against the fp64 node)


def _per_sample_refs(node, inputs, s, n):
    """The node applied to each sample alone (with that sample's scale), concatenated."""
    return torch.cat([node(*(x[i:i + 1].double() for x in inputs), s[i].double()) for i in range(n)])


@pytest.mark.parametrize("dtype,rtol", PRECISIONS, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_perp_neg_grads_equal_comfyui(dtype, rtol, per_sample):
    """Through diff_stats' formula and lincomb's; both scales tensors requiring grad."""
    c, u, e = rand((2, 4, 3, 3), dtype)
    s, ns = leaves(torch.tensor([5.5, 2.5], dtype=dtype), torch.tensor(1.3, dtype=dtype))
    ours = ops.perp_neg(c, u, e, s, ns, per_sample=per_sample)
    node = lambda c, u, e, s: reference.comfy_perp_neg(c, u, e, ns.double(), s)  # noqa: E731
    ref = (_per_sample_refs(node, (c, u, e), s, 2) if per_sample
           else node(c.double(), u.double(), e.double(), reference.per_sample(s, c)))
    inputs = [c, u, e, s, ns]
    assert_grads_close(grads(ours, inputs), grads(ref.to(dtype), inputs), rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", PRECISIONS, ids=str)
def test_cfg_norm_grads_equal_comfyui(dtype, rtol):
    """Positions on both sides of the clamp (sample 0's scale 0.6 leaves some |g| < |c|), a position with
    c = u = 0 and one with c = 0 (torch.norm's zero gradient at 0 on both sides)."""
    c, u = (x.detach() for x in rand((2, 4, 3, 3), dtype, n=2))
    c[:, :, 0, 0] = u[:, :, 0, 0] = 0.0
    c[:, :, 1, 1] = 0.0
    c, u = leaves(c, u)
    s, = leaves(torch.tensor([0.6, 4.0], dtype=dtype))
    ours = ops.cfg_norm(c, u, s, strength=0.7)
    cd, ud = c.double(), u.double()
    g = reference.comfy_cfg_function(cd, ud, reference.per_sample(s, c))
    r = cd.norm(dim=1) / (g.norm(dim=1) + 1e-8)
    assert (r > 1).any() and ((r < 1) & (r > 0)).any()
    ref = reference.comfy_cfg_norm(cd, g, 0.7)
    assert_grads_close(grads(ours, [c, u, s]), grads(ref.to(dtype), [c, u, s]), rtol=rtol)


def _comfy_mahiro(c, u, s):
    return reference.comfy_mahiro(c, u, s, reference.comfy_cfg_function(c, u, s))


@pytest.mark.parametrize("dtype,rtol", PRECISIONS, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (2, 5)], ids=str)
def test_mahiro_grads_equal_comfyui(shape, dtype, rtol, per_sample):
    c, u = rand(shape, dtype, n=2)
    s, = leaves(torch.tensor([3.5, 6.0], dtype=dtype))
    ours = ops.mahiro(c, u, s, per_sample=per_sample)
    ref = (_per_sample_refs(_comfy_mahiro, (c, u), s, 2) if per_sample
           else _comfy_mahiro(c.double(), u.double(), reference.per_sample(s, c)))
    assert_grads_close(grads(ours, [c, u, s]), grads(ref.to(dtype), [c, u, s]), rtol=rtol)


def test_mahiro_grads_finite_at_zero_inputs():
    """ssqrt(x) = sign(x) sqrt|x| has an infinite derivative at 0, where autograd of ComfyUI's formula gives
    NaN (for that element, and for the scale's sum). fastguide takes the derivative as 0 there: its gradients
    equal autograd of the node with an ssqrt whose derivative at 0 is 0, and are finite."""
    c, u = (x.detach() for x in rand(n=2))
    u[0, :, 0, 0] = 0.0
    u[1, 1] = 0.0
    c, u = leaves(c, u)
    s, = leaves(torch.tensor([3.5, 6.0], dtype=torch.float64))
    ours = grads(ops.mahiro(c, u, s), [c, u, s])
    node = grads(_comfy_mahiro(c, u, reference.per_sample(s, c)), [c, u, s])
    assert node[1].isnan().sum() == (u == 0).sum() and node[2].isnan().all()

    def ssqrt0(x):
        nz = x != 0
        return torch.where(nz, torch.where(nz, x, 1.0).abs().sqrt() * x.sign(), 0.0)

    def mahiro0(c, u, s):
        sv = s.view(-1, 1, 1, 1)
        g = u + sv * (c - u)
        sim = F.cosine_similarity(ssqrt0(sv * u), ssqrt0((sv * c + g) / 2), dim=1, eps=1e-8).mean()
        k = 2 * (sim + 1)
        return (k * g + (4 - k) * sv * c) / 4

    assert all(x.isfinite().all() for x in ours)
    assert_grads_close(ours, grads(mahiro0(c, u, s), [c, u, s]), rtol=1e-10)


def test_compile_fullgraph_backward_comfy_methods():
    torch._dynamo.reset()

    def step(c, u, e, s):
        return ops.perp_neg(c, u, e, s, 1.2) + ops.cfg_norm(c, u, s) + ops.mahiro(c, u, s)

    c, u, e = rand((2, 3, 4, 4), torch.float32)
    s, = leaves(torch.tensor([3.0, 5.0]))
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(c, u, e, s)
    ref = step(c, u, e, s)
    torch.testing.assert_close(out, ref)
    assert_grads_close(grads(out, [c, u, e, s]), grads(ref, [c, u, e, s]), rtol=1e-5)


# --- torch.compile, the dispatcher --------------------------------------------------------------------
def test_compile_fullgraph_backward():
    """AOTAutograd traces the registered formulas into the backward graph (and APG's eager route)."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(c, u, s, buf):
        a = fastguide.cfg(c, u, s, rescale=0.7)
        b = fastguide.frequency_cfg(c, u, 1.0, s, cutoff=2)
        return a + b + fastguide.apg(c, u, s, eta=0.5, norm_threshold=2.0, momentum_buffer=buf, momentum=-0.5)

    c, u = rand((2, 3, 8, 8), torch.float32, n=2)
    s, = leaves(torch.tensor([3.0, 5.0]))
    buf, ref_buf = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    out = step(c, u, s, buf)
    ref = (fastguide.cfg(c, u, s, rescale=0.7) + fastguide.frequency_cfg(c, u, 1.0, s, cutoff=2)
           + fastguide.apg(c, u, s, eta=0.5, norm_threshold=2.0, momentum_buffer=ref_buf, momentum=-0.5))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(buf, ref_buf)
    assert_grads_close(grads(out, [c, u, s]), grads(ref, [c, u, s]), rtol=1e-4)


def test_opcheck_with_grad():
    """opcheck's autograd-registration and AOT-dispatch (forward + backward) tests, inputs requiring grad."""
    c, u = rand((2, 3, 5, 6), torch.float32, n=2)
    s, = leaves(torch.tensor([2.0, 3.0]))
    torch.library.opcheck(torch.ops.fastguide.cfg.default, (c, u, s, 0.0, 0.7, False))
    torch.library.opcheck(torch.ops.fastguide.cfg_norm.default, (c, u, s, 0.0, 0.7))
    torch.library.opcheck(torch.ops.fastguide.mahiro_sim.default, (c, u, s, 0.0))
    torch.library.opcheck(torch.ops.fastguide.diff_stats.default, (c, u, *leaves(c * 0.5), 30))


def test_every_op_has_an_autograd_kernel_and_no_fallback_warning():
    for name in ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastguide::{name}", "Autograd"), name
    c, u = rand(n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "autograd kernel was not registered" fallback warns
        fastguide.cfg(c, u, 3.0).sum().backward()
    assert c.grad is not None and u.grad is not None


def test_raw_apg_op_with_grad_raises_and_leaves_the_buffer():
    c, u = rand(n=2)
    buf = torch.ones(SHAPE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"fastguide::apg has no autograd formula; call the public wrapper"):
        torch.ops.fastguide.apg.default(c, u, None, 2.0, 1.0, 0.0, 0.5, buf, 24, False)
    assert torch.equal(buf, torch.ones(SHAPE, dtype=torch.float64))
    with torch.no_grad():  # without a gradient the kernel runs
        torch.ops.fastguide.apg.default(c, u, None, 2.0, 1.0, 0.0, 0.5, buf, 24, False)
    assert not torch.equal(buf, torch.ones(SHAPE, dtype=torch.float64))


def test_wrappers_below_autograd_still_seen_by_dispatch_modes_and_grad_mode():
    """The wrappers' shortcut past the Autograd key (no gradient possible) keeps the dispatcher's other
    users: a TorchDispatchMode still sees the op; grad mode off means no graph even for requires_grad inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    c, u = rand(n=2)
    with Log() as log:
        fastguide.cfg(c.detach(), u.detach(), 2.0)
    assert "fastguide.cfg.default" in log.ops
    with torch.no_grad():
        assert fastguide.cfg(c, u, 2.0).grad_fn is None
    assert fastguide.cfg(c, u, 2.0).grad_fn is not None


def test_wrappers_show_the_op_to_the_profiler():
    from torch.profiler import profile

    c, u = rand(n=2)
    with profile() as prof:
        fastguide.cfg(c.detach(), u.detach(), 2.0)
    top = [e.name for e in prof.events() if e.cpu_parent is None]
    assert "fastguide::cfg" in top


@pytest.mark.parametrize("weights", ["per_sample", "per_branch", "floats"])
def test_lincomb_gradcheck(weights):
    """lincomb (dual CFG, Perp-Neg, RLG, two-model guidance) is linear in its predictions and weights."""
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(2, 3, 5, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]
    if weights == "floats":  # the public wrapper passes them as a tensor when a gradient is needed
        fn, args = (lambda *p: ops.lincomb(list(p), [0.5, 2.0, -1.0])), tuple(preds)
    else:
        shape = (2, 3) if weights == "per_sample" else (3,)
        w = torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()
        fn, args = (lambda *a: torch.ops.fastguide.lincomb(list(a[:3]), a[3], [])), (*preds, w)
    assert torch.autograd.gradcheck(fn, args)
    with pytest.raises(RuntimeError, match="float weights has no autograd formula"):
        torch.ops.fastguide.lincomb(preds, None, [0.5, 2.0, -1.0])
