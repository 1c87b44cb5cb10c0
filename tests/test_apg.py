"""APG (fused projection, norm clamp, momentum) and the per-group statistics, against diffusers."""
import pytest
import torch
import torch._dynamo.testing
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DiffusersMomentum
from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

import fastguide
from fastguide import _eager, methods
from fastguide.kernels import apg as triton_apg
from fastguide.kernels import guidance as triton_guidance
from reference import rel_err

SHAPE = (2, 4, 9, 11)
NORM_DIMS = [None, 1, (-2, -1), (1, 3)]  # whole sample, one channel dim (permuted), trailing tuple, non-trailing


def step_inputs(shape, dtype=torch.float32, device="cpu"):
    c = torch.randn(shape, dtype=torch.float64)
    u = c + 0.5 * torch.randn(shape, dtype=torch.float64)
    return c.to(dtype=dtype, device=device), u.to(dtype=dtype, device=device)


@pytest.mark.parametrize("norm_dim", NORM_DIMS, ids=str)
@pytest.mark.parametrize("threshold,momentum,eta", [(0.0, None, 1.0), (5.0, None, 0.0), (0.0, -0.5, 1.0),
                                                    (4.0, 0.75, 0.3)])
def test_30_steps_match_diffusers(norm_dim, threshold, momentum, eta):
    """fp32 within 1e-5 relative of diffusers' fp64 projection over a trajectory, state carried."""
    theirs_buf = DiffusersMomentum(momentum) if momentum is not None else None
    ours_buf = fastguide.MomentumBuffer(momentum) if momentum is not None else None
    for step in range(30):
        c, u = step_inputs(SHAPE)
        theirs = normalized_guidance(c, u, 7.5, theirs_buf, eta, threshold, False, norm_dim)
        ours = fastguide.apg(c, u, 7.5, eta=eta, norm_threshold=threshold, momentum_buffer=ours_buf, norm_dim=norm_dim)
        assert rel_err(ours, theirs.double()) <= 1e-6, step
        if momentum is not None:
            assert rel_err(ours_buf.running_average, theirs_buf.running_average.double()) <= 1e-6


@pytest.mark.parametrize("rescale,original", [(0.0, True), (0.7, False), (0.5, True)])
def test_equals_diffusers_guider_forward(rescale, original):
    theirs = AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=8.0, eta=0.5, guidance_rescale=rescale,
                                       use_original_formulation=original)
    buf = fastguide.MomentumBuffer(-0.5)
    for step in range(10):
        theirs.set_state(step=step, num_inference_steps=10, timestep=None)
        theirs.prepare_inputs({})  # creates diffusers' momentum buffer at step 0
        c, u = step_inputs((1, 4, 16, 12))
        ref = theirs.forward(c, u).pred
        ours = fastguide.apg(c, u, 6.0, eta=0.5, norm_threshold=8.0, momentum_buffer=buf, rescale=rescale,
                             original=original)
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_low_precision_within_twice_pytorch_error(dtype, momentum):
    ref_buf = DiffusersMomentum(momentum) if momentum is not None else None       # fp64 trajectory
    lowp_buf = DiffusersMomentum(momentum) if momentum is not None else None      # diffusers in dtype
    ours_buf = fastguide.MomentumBuffer(momentum) if momentum is not None else None
    for step in range(10):
        c, u = step_inputs(SHAPE, dtype)
        ref = normalized_guidance(c.double(), u.double(), 5.0, ref_buf, 1.0, 6.0, False, None)
        own = rel_err(normalized_guidance(c, u, 5.0, lowp_buf, 1.0, 6.0, False, None), ref)
        ours = fastguide.apg(c, u, 5.0, norm_threshold=6.0, momentum_buffer=ours_buf)
        assert ours.dtype == dtype
        assert rel_err(ours, ref) <= 2 * own


def test_zero_norm_cond_and_zero_diff_match_diffusers():
    """normalize's eps (|cond| = 0) and the clamp's min(1, thr / 0) = 1 (cond == uncond): finite, equal."""
    c = torch.zeros(2, 3, 4, 4)
    u = torch.randn(2, 3, 4, 4)
    for cond, uncond in ((c, u), (u, u.clone())):
        ref = normalized_guidance(cond, uncond, 7.5, None, 0.4, 3.0, False, None)
        ours = fastguide.apg(cond, uncond, 7.5, eta=0.4, norm_threshold=3.0)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref)


def test_per_sample_scale_and_tensor_buffer():
    c, u = step_inputs((3, 2, 5, 5))
    scale = torch.tensor([1.0, 4.0, 9.0])
    buf = torch.zeros(3, 2, 5, 5)
    out = fastguide.apg(c, u, scale, momentum=0.5, momentum_buffer=buf, norm_threshold=2.0)
    for b in range(3):
        ref = normalized_guidance(c[b:b + 1], u[b:b + 1], scale[b].item(), DiffusersMomentum(0.5), 1.0, 2.0)
        assert rel_err(out[b:b + 1], ref.double()) <= 1e-6
    torch.testing.assert_close(buf, c - u)  # first step: running average = diff


# --- Triton ------------------------------------------------------------------------------------
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows_reference(c, u, scale, buf, momentum, group_size, dtype):
    """diffusers' normalized_guidance on [groups, group_size] rows (norm_dim=1), evaluated in `dtype`."""
    cg, ug = (x.cpu().to(dtype).reshape(-1, group_size) for x in (c, u))
    rows_per_sample = cg.shape[0] // scale.shape[0]
    s = scale.cpu().to(dtype).repeat_interleave(rows_per_sample).view(-1, 1)
    rb = None
    if momentum is not None:
        rb = DiffusersMomentum(momentum)
        rb.running_average = buf.cpu().to(dtype).reshape(cg.shape)
    return normalized_guidance(cg, ug, s, rb, 0.3, 2.0, False, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size,chunk", [(99, 32), (9, 16), (396, 4096)])
@pytest.mark.parametrize("momentum", [None, -0.5])
def test_triton_apg(dtype, group_size, chunk, momentum):
    """Groups of 99 (4 tiles of 32 with a masked tail), 9 (one padded tile), 396 (whole sample, one tile)."""
    c, u = step_inputs(SHAPE, dtype, TRITON_DEVICE)
    scale = torch.tensor([3.0, 7.5], device=TRITON_DEVICE)
    buf = torch.randn(SHAPE, dtype=dtype, device=TRITON_DEVICE) if momentum is not None else None
    ref = rows_reference(c, u, scale, buf, momentum, group_size, torch.float64)
    tol = 1e-6
    if dtype != torch.float32:  # twice PyTorch's own error (diffusers' function evaluated in dtype)
        tol = 2 * rel_err(rows_reference(c, u, scale, buf, momentum, group_size, dtype), ref)
    old = buf.cpu().double() if buf is not None else None
    out = triton_apg.apg(c, u, scale, 0.0, 0.3, 2.0, momentum or 0.0, buf, group_size, False, chunk=chunk)
    assert out.dtype == dtype
    assert rel_err(out.cpu().reshape(-1, group_size), ref) <= tol
    if momentum is not None:  # updated in place: running = diff + momentum * running, stored in dtype
        expected = c.cpu().double() - u.cpu().double() + momentum * old
        assert rel_err(buf.cpu(), expected) <= (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)


@pytest.mark.parametrize("with_guided", [False, True])
def test_triton_stats(with_guided):
    c, u = step_inputs(SHAPE, device=TRITON_DEVICE)
    g = c + 2.0 * torch.randn_like(c) if with_guided else None
    raw = triton_apg.guidance_stats(c, u, g, 99, chunk=32)
    assert raw.shape == (8, 7)
    expected = fastguide._eager.guidance_stats(c.cpu().double(), u.cpu().double(),
                                               g.cpu().double() if with_guided else None, 99)
    torch.testing.assert_close(raw.cpu().double(), expected.double(), rtol=1e-6, atol=1e-5)


# --- statistics --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_dim", NORM_DIMS, ids=str)
def test_guidance_stats(norm_dim):
    c, u = step_inputs(SHAPE)
    g = fastguide.cfg(c, u, 7.5)
    s = fastguide.guidance_stats(c, u, g, norm_dim=norm_dim)
    dims = list(range(1, 4)) if norm_dim is None else norm_dim
    cd, ud, gd = c.double(), u.double(), g.double()
    torch.testing.assert_close(s.cond_dot_uncond.double(), (cd * ud).sum(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.uncond_sq.double(), (ud * ud).sum(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.guided_sq.double(), (gd * gd).sum(dims), rtol=1e-6, atol=1e-6)
    cos = (cd * gd).sum(dims) / ((cd * cd).sum(dims).sqrt() * (gd * gd).sum(dims).sqrt())
    torch.testing.assert_close(s.cos_cond_guided.double(), cos, rtol=1e-6, atol=1e-6)
    assert s.cos_cond_uncond.dtype == torch.float32 and s.cos_cond_uncond.shape == cos.shape
    nog = fastguide.guidance_stats(c, u, norm_dim=norm_dim)
    assert nog.cos_cond_guided is None
    torch.testing.assert_close(nog.cos_cond_uncond, s.cos_cond_uncond)


def test_stats_cos_matches_torch_cosine_similarity():
    c, u = step_inputs((3, 4, 8, 8))
    torch.testing.assert_close(fastguide.guidance_stats(c, u).cos_cond_uncond,
                               torch.nn.functional.cosine_similarity(c.flatten(1), u.flatten(1)))


# --- contract ----------------------------------------------------------------------------------
def test_opcheck():
    c, u = step_inputs((2, 3, 5, 7))
    torch.library.opcheck(torch.ops.fastguide.apg.default,
                          (c, u, torch.tensor([2.0, 3.0]), 0.0, 0.5, 2.0, 0.3, torch.randn(2, 3, 5, 7), 105, False))
    torch.library.opcheck(torch.ops.fastguide.apg.default, (c, u, None, 4.0, 1.0, 0.0, 0.0, None, 35, True))
    torch.library.opcheck(torch.ops.fastguide.guidance_stats.default, (c, u, c * 2, 105))
    torch.library.opcheck(torch.ops.fastguide.guidance_stats.default, (c, u, None, 7))


def test_compile_no_recompile_with_buffer_and_scale_tensor():
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(c, u, scale, buf):
        return fastguide.apg(c, u, scale, momentum=-0.5, momentum_buffer=buf, norm_threshold=5.0, rescale=0.5)

    buf = torch.zeros(SHAPE)
    theirs = AdaptiveProjectedGuidance(guidance_scale=1.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=5.0, guidance_rescale=0.5)
    theirs.set_state(step=0, num_inference_steps=30, timestep=None)
    theirs.prepare_inputs({})
    scale = torch.empty(())
    for i in range(30):
        c, u = step_inputs(SHAPE)
        scale.fill_(2.0 + i / 3)
        theirs.guidance_scale = 2.0 + i / 3
        ref = theirs.forward(c, u).pred
        assert rel_err(step(c, u, scale, buf), ref.double()) <= 1e-6
    assert counter.frame_count == 1


def _bad_apg_calls():
    c, u = step_inputs((2, 3, 4, 4))
    return [
        ("buffer shape", dict(momentum=0.5, momentum_buffer=torch.zeros(2, 3, 4, 5)), ValueError, "must match cond"),
        ("buffer dtype", dict(momentum=0.5, momentum_buffer=torch.zeros(2, 3, 4, 4, dtype=torch.float64)),
         ValueError, "must match cond"),
        ("buffer device", dict(momentum=0.5, momentum_buffer=torch.zeros(2, 3, 4, 4, device="meta")), ValueError,
         "must match cond"),
        ("buffer not contiguous", dict(momentum=0.5, momentum_buffer=torch.zeros(2, 3, 4, 4).transpose(2, 3)),
         ValueError, "contiguous"),
        ("tensor buffer without momentum", dict(momentum_buffer=torch.zeros(2, 3, 4, 4)), ValueError, "needs momentum="),
        ("momentum without buffer", dict(momentum=0.5), ValueError, "needs momentum_buffer="),
        ("norm_dim out of range", dict(norm_dim=4), ValueError, "out of range"),
        ("norm_dim repeated", dict(norm_dim=(1, -3)), ValueError, "twice"),
        ("norm_dim empty", dict(norm_dim=()), ValueError, "non-empty"),
        ("negative threshold", dict(norm_threshold=-1.0), ValueError, "norm_threshold must be >= 0"),
        ("nan eta", dict(eta=float("nan")), ValueError, "eta must be a finite"),
        ("per-sample scale over batch", dict(norm_dim=(0, 1)), ValueError, "reduces over the batch dim"),
    ], c, u


@pytest.mark.parametrize("case", range(12))
def test_bad_input_raises_and_leaves_buffer_untouched(case):
    cases, c, u = _bad_apg_calls()
    name, kw, exc, match = cases[case]
    scale = torch.tensor([2.0, 3.0]) if name == "per-sample scale over batch" else 2.0
    buf = kw.get("momentum_buffer")
    before = buf.clone() if isinstance(buf, torch.Tensor) and buf.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        fastguide.apg(c, u, scale, **kw)
    if before is not None:
        assert torch.equal(buf, before)


def test_momentum_buffer_object_is_not_silently_reset():
    buf = fastguide.MomentumBuffer(0.5)
    c, u = step_inputs((2, 3, 4, 4))
    fastguide.apg(c, u, 2.0, momentum_buffer=buf)
    state = buf.running_average.clone()
    with pytest.raises(ValueError, match="must match cond"):
        fastguide.apg(*step_inputs((1, 3, 4, 4)), 2.0, momentum_buffer=buf)
    with pytest.raises(ValueError, match="disagrees"):
        fastguide.apg(c, u, 2.0, momentum=0.9, momentum_buffer=buf)
    assert torch.equal(buf.running_average, state)
    ptr = buf.running_average.data_ptr()
    buf.reset()
    assert buf.running_average.data_ptr() == ptr and not buf.running_average.any()


def test_failed_first_call_leaves_momentum_buffer_unbound(monkeypatch):
    """The buffer's tensor is bound only after the op succeeded: a first call that fails inside the op
    must not tie the buffer to that call's shape (the next valid call, of another shape, works)."""
    buf = fastguide.MomentumBuffer(-0.5)

    def fail(*args):
        raise RuntimeError("kernel failed")

    with monkeypatch.context() as m:
        m.setitem(fastguide.ops._op, "apg", fail)
        with pytest.raises(RuntimeError, match="kernel failed"):
            fastguide.apg(*step_inputs((2, 3, 4, 4)), 2.0, momentum_buffer=buf)
    assert buf.running_average is None
    c, u = step_inputs((1, 5, 6))
    out = fastguide.apg(c, u, 2.0, momentum_buffer=buf)
    assert buf.running_average.shape == (1, 5, 6)
    theirs = DiffusersMomentum(-0.5)
    assert rel_err(out, normalized_guidance(c, u, 2.0, theirs).double()) <= 1e-6


@pytest.mark.parametrize("norm_dim", [None, -1, 1])
def test_empty_feature_dim(norm_dim):
    """[2, 0, 5]: no elements. apg returns an empty prediction and leaves the buffer unbound; the
    statistics are zeros (cosines 0, as F.cosine_similarity gives for empty vectors)."""
    c, u = torch.randn(2, 0, 5), torch.randn(2, 0, 5)
    buf = fastguide.MomentumBuffer(0.5)
    out = fastguide.apg(c, u, 3.0, momentum_buffer=buf, norm_threshold=1.0, norm_dim=norm_dim)
    assert out.shape == c.shape and buf.running_average is None
    stats = fastguide.guidance_stats(c, u, c, norm_dim=norm_dim)
    kept = {None: (2,), -1: (2, 0), 1: (2, 5)}[norm_dim]
    assert stats.raw.shape == kept + (7,) and not stats.raw.any()
    if norm_dim is None:
        assert torch.equal(stats.cos_cond_uncond, torch.nn.functional.cosine_similarity(c.flatten(1), u.flatten(1)))


def test_inductor_fullgraph_with_and_without_momentum():
    """Without a buffer the op's optional mutable argument is None, which inductor cannot lower; the
    wrapper gives it a scratch buffer under compile. Real inductor compiles (slow; once)."""
    torch._dynamo.reset()
    c, u = step_inputs((2, 4, 8, 8))

    @torch.compile(fullgraph=True)
    def plain(c, u):
        return fastguide.apg(c, u, 5.0, norm_threshold=2.0, eta=0.5)

    ref = normalized_guidance(c, u, 5.0, None, eta=0.5, norm_threshold=2.0)
    assert rel_err(plain(c, u), ref.double()) <= 1e-6

    buf, theirs = fastguide.MomentumBuffer(-0.5), DiffusersMomentum(-0.5)

    @torch.compile(fullgraph=True)
    def with_momentum(c, u):
        return fastguide.apg(c, u, 5.0, momentum_buffer=buf)

    for _ in range(3):
        c, u = step_inputs((2, 4, 8, 8))
        assert rel_err(with_momentum(c, u), normalized_guidance(c, u, 5.0, theirs).double()) <= 1e-6


# --- APMix's CFG phase: cfg's output and the momentum update in one pass (cfg_momentum) ------------------------
def _cfg_phase(c, u, scale, buf, **kw):
    return methods.apg_mix(c, u, scale, 10.0, False, momentum_buffer=buf, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (3, 2, 4099)], ids=str)  # batch 1, odd sizes, > one 2048 slice
@pytest.mark.parametrize("original", [False, True])
def test_apg_mix_cfg_phase_is_cfg_plus_diffusers_momentum(dtype, shape, original):
    """Output bitwise fastguide.cfg's; the buffer diffusers' MomentumBuffer.update (bitwise in fp32 / fp64, within
    one rounding of the float64 reference in fp16 / bf16), over steps with a per-sample scale tensor on one."""
    ours, theirs = fastguide.MomentumBuffer(-0.5), DiffusersMomentum(-0.5)
    ref = torch.zeros(shape, dtype=torch.float64)
    for step in range(3):
        c, u = step_inputs(shape, dtype)
        scale = torch.linspace(2.0, 4.0, shape[0], dtype=_eager._acc(c)) if step == 1 else 3.5
        out = _cfg_phase(c, u, scale, ours, original=original)
        assert torch.equal(out, fastguide.cfg(c, u, scale, original=original))
        s64 = scale.double().view(-1, *[1] * (len(shape) - 1)) if torch.is_tensor(scale) else scale
        out64 = (c.double() if original else u.double()) + s64 * (c.double() - u.double())
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
        torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol * out64.abs().max().item())
        theirs.update(c - u)
        ref = (c.double() - u.double()) + -0.5 * ref.to(dtype).double()
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(ours.running_average, theirs.running_average)
        else:  # rounded once from fp32 math (diffusers rounds each of its three ops to the half type)
            torch.testing.assert_close(ours.running_average.double(), ref, rtol=tol, atol=tol)
        assert ours.running_average.dtype == dtype


def test_apg_mix_cfg_phase_non_contiguous_grad_and_rescale_paths_agree():
    base_c, base_u = step_inputs((4, 2, 6, 9))
    c, u = base_c.transpose(0, 1)[:, :3], base_u.transpose(0, 1)[:, :3]  # [2, 3, 6, 9] views, not contiguous
    assert not c.is_contiguous()
    fused, packed, graded, rescaled = (fastguide.MomentumBuffer(0.75) for _ in range(4))
    for buf in (fused, packed, graded, rescaled):
        buf.running_average = torch.full(c.shape, 0.25)
    out = _cfg_phase(c, u, 5.0, fused)
    assert torch.equal(out, _cfg_phase(c.contiguous(), u.contiguous(), 5.0, packed))
    assert torch.equal(fused.running_average, packed.running_average)
    cg = c.clone().requires_grad_()
    g_out = _cfg_phase(cg, u, 5.0, graded)  # the differentiable ops, the same values
    g_out.sum().backward()
    assert torch.equal(g_out.detach(), out) and cg.grad is not None
    assert torch.equal(graded.running_average, fused.running_average)
    r_out = _cfg_phase(c, u, 5.0, rescaled, rescale=0.7)  # rescale: cfg's two-pass op, then the momentum update
    assert torch.equal(r_out, fastguide.cfg(c, u, 5.0, rescale=0.7))
    assert torch.equal(rescaled.running_average, fused.running_average)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_cfg_momentum_triton_matches_cpp(dtype):
    """The Triton kernel (interpreted) against the C++ one, blocks of 32 so samples span several blocks + a tail."""
    c, u = step_inputs((3, 5, 11), dtype)
    st = torch.tensor([2.0, 3.0, 4.5], dtype=_eager._acc(c))
    b_cpp, b_tri = torch.randn(c.shape).to(dtype), None
    b_tri = b_cpp.clone()
    for original, scale_t in ((False, None), (True, st)):
        out_cpp = torch.ops.fastguide.cfg_momentum(c, u, scale_t, 6.0, original, -0.5, b_cpp)
        out_tri = triton_guidance.cfg_momentum(c, u, scale_t, 6.0, original, -0.5, b_tri, block=32)
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)
        torch.testing.assert_close(out_tri, out_cpp, rtol=tol, atol=tol)
        torch.testing.assert_close(b_tri, b_cpp, rtol=tol, atol=tol)


def test_cfg_momentum_failed_call_leaves_the_buffer():
    c, u = step_inputs((2, 3, 5))
    buf = torch.ones(c.shape)
    for args, match in [((c, u[:1], None, 2.0, False, 0.5, buf), "uncond"),
                        ((c, u, None, 2.0, False, 0.5, torch.ones(2, 3, 4)), "momentum_buffer"),
                        ((c, u, None, 2.0, False, 0.5, torch.ones(2, 5, 3).transpose(1, 2)), "contiguous"),
                        ((c, u, torch.ones(3), 2.0, False, 0.5, buf), "scale")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastguide.cfg_momentum(*args)
    assert torch.equal(buf, torch.ones(c.shape))
    mb = fastguide.MomentumBuffer(0.5)
    with pytest.raises(ValueError, match="scale"):
        _cfg_phase(c, u, float("inf"), mb)
    assert mb.running_average is None  # a failed first call binds nothing


def test_cfg_momentum_opcheck():
    c, u = step_inputs((2, 3, 5, 7))
    torch.library.opcheck(torch.ops.fastguide.cfg_momentum.default,
                          (c, u, None, 4.0, False, -0.5, torch.zeros(c.shape)))
    torch.library.opcheck(torch.ops.fastguide.cfg_momentum.default,
                          (c, u, torch.tensor([2.0, 3.0]), 0.0, True, 0.75, torch.ones(c.shape)))


def test_apg_mix_cfg_phase_inductor_fullgraph():
    """The in-place update survives functionalisation: compiled steps equal eager steps (buffer included)."""
    torch._dynamo.reset()
    compiled_buf, eager_buf = fastguide.MomentumBuffer(-0.5), fastguide.MomentumBuffer(-0.5)
    compiled_buf.running_average, eager_buf.running_average = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)

    @torch.compile(fullgraph=True)
    def step(c, u):
        return _cfg_phase(c, u, 4.0, compiled_buf)

    for _ in range(3):
        c, u = step_inputs((2, 4, 8, 8))
        torch.testing.assert_close(step(c, u), _cfg_phase(c, u, 4.0, eager_buf), rtol=1e-6, atol=1e-6)
        assert torch.equal(compiled_buf.running_average, eager_buf.running_average)
