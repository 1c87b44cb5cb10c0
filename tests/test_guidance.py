"""CFG, PAG and CFG-Zero* (the guidance-combine family) on every backend this machine has."""
import math

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance, PerturbedAttentionGuidance

import fastguide
from fastguide.kernels import guidance as triton_guidance
from reference import guide64, rel_err

OPS = ("cfg", "pag", "cfg_zero_star")
NINPUTS = {"cfg": 2, "pag": 3, "cfg_zero_star": 2}
# Odd sizes, batch 1, 3-D/4-D/5-D; (2, 3, 67, 71) has 14271 elements per sample: several 4096-element
# moment chunks and a ragged tail in the C++ kernel.
SHAPES = [(1, 4, 7, 9), (3, 5, 11), (2, 3, 4, 5, 6), (2, 3, 67, 71)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(op, shape, dtype=torch.float32, device="cpu"):
    # uncond ~ cond + guidance-sized difference, as in a sampler; never zeros.
    c = torch.randn(shape, dtype=torch.float64)
    u = c + 0.5 * torch.randn(shape, dtype=torch.float64)
    p = c + 0.3 * torch.randn(shape, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (c, u, p)[: NINPUTS[op]]]


def run(op, inputs, scale, pag_scale=1.5, rescale=0.0, original=False):
    if op == "pag":
        return fastguide.pag(*inputs, scale, pag_scale, rescale=rescale, original=original)
    return getattr(fastguide, op)(*inputs, scale, rescale=rescale, original=original)


def diffusers_pred(op, inputs, scale, pag_scale=1.5, rescale=0.0, original=False):
    kw = dict(guidance_scale=scale, guidance_rescale=rescale, use_original_formulation=original)
    if op == "cfg":
        guider = ClassifierFreeGuidance(**kw)
    elif op == "cfg_zero_star":
        guider = ClassifierFreeZeroStarGuidance(zero_init_steps=1, **kw)
    else:
        guider = PerturbedAttentionGuidance(perturbed_guidance_scale=pag_scale, perturbed_guidance_layers=[0],
                                            perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0, **kw)
    guider.set_state(step=5, num_inference_steps=10, timestep=None)  # past zero-init, inside every window
    return guider.forward(*inputs).pred


def low_precision_tol(op, inputs, scale, **kw):
    """Twice PyTorch's own error: diffusers' guider evaluated in the inputs' dtype vs float64."""
    ref = guide64(op, inputs, scale, **kw)
    own = rel_err(diffusers_pred(op, inputs, scale, **kw), ref)
    return 2 * own


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_float64_reference(op, shape, dtype, rescale, original):
    inputs = make_inputs(op, shape, dtype)
    out = run(op, inputs, 5.5, rescale=rescale, original=original)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.is_contiguous()
    ref = guide64(op, inputs, 5.5, pag_scale=1.5, rescale=rescale, original=original)
    tol = 1e-6 if dtype == torch.float32 else low_precision_tol(op, inputs, 5.5, pag_scale=1.5, rescale=rescale,
                                                                original=original)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("kind", ["float", "0-d", "per-sample"])
@pytest.mark.parametrize("op", OPS)
def test_scale_kinds(op, kind):
    inputs = make_inputs(op, (3, 4, 9, 7))
    values = torch.tensor([2.0, 7.5, -1.25])
    scale = {"float": 4.0, "0-d": torch.tensor(4.0), "per-sample": values}[kind]
    pag_scale = {"float": 1.5, "0-d": torch.tensor(1.5), "per-sample": values.flip(0)}[kind]
    for rescale in (0.0, 0.5):
        out = run(op, inputs, scale, pag_scale=pag_scale, rescale=rescale)
        ref = guide64(op, inputs, scale, pag_scale=pag_scale, rescale=rescale)
        assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op):
    base = make_inputs(op, (5, 3, 12, 10))
    views = [x.transpose(2, 3)[1:4, :, ::2] for x in base]  # permuted and strided, storage offset
    assert not views[0].is_contiguous()
    out = run(op, views, 6.0, rescale=0.3)
    assert out.shape == views[0].shape
    assert rel_err(out, guide64(op, views, 6.0, pag_scale=1.5, rescale=0.3)) <= 1e-6


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("op", OPS)
def test_equals_diffusers_guider(op, rescale, original):
    inputs = make_inputs(op, (2, 4, 32, 40))
    ours = run(op, inputs, 7.5, rescale=rescale, original=original)
    theirs = diffusers_pred(op, inputs, 7.5, rescale=rescale, original=original)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6 * theirs.abs().max().item())


@pytest.mark.parametrize("op", OPS)
def test_rescale_zero_std_stays_finite_where_diffusers_gives_nan(op):
    """diffusers issue #13425: rescale_noise_cfg divides by std(g) = 0 and returns NaN.

    fastguide leaves a constant guided prediction unrescaled: the result is the guided prediction itself.
    """
    c = torch.full((2, 4, 5, 5), 0.25)
    inputs = [c, c.clone(), c.clone()][: NINPUTS[op]]
    theirs = diffusers_pred(op, inputs, 7.5, rescale=0.7)
    assert torch.isnan(theirs).all()
    ours = run(op, inputs, 7.5, rescale=0.7)
    torch.testing.assert_close(ours, run(op, inputs, 7.5, rescale=0.0))
    torch.testing.assert_close(ours, c)


@pytest.mark.parametrize("backend", ["dispatcher", "eager", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_rescale_non_finite_sample_propagates_like_diffusers(op, backend):
    """A NaN in one sample makes its std NaN: diffusers' rescale then returns that whole sample NaN, and so
    does fastguide (guarding it like a zero std would skip the requested rescale and hide the bad value).
    The other sample is rescaled normally."""
    inputs = make_inputs(op, (2, 4, 8, 8))
    inputs[0][0, 1, 2, 3] = float("nan")
    if backend == "dispatcher":
        out = run(op, inputs, 7.5, rescale=0.7)
    elif backend == "eager":
        out = fastguide._eager.guide(inputs[0], inputs[1], inputs[2] if op == "pag" else None, None, 7.5, None, 1.5,
                                     0.7, False, op == "cfg_zero_star")
    else:
        out = triton_guidance.guide(*[x.to(TRITON_DEVICE) for x in inputs[:2]],
                                    inputs[2].to(TRITON_DEVICE) if op == "pag" else None, None, 7.5, None, 1.5, 0.7,
                                    False, op == "cfg_zero_star").cpu()
    theirs = diffusers_pred(op, inputs, 7.5, rescale=0.7)
    assert torch.isnan(theirs[0]).all() and torch.isnan(out[0]).all()
    torch.testing.assert_close(out[1], theirs[1], rtol=2e-6, atol=2e-6 * theirs[1].abs().max().item())


def test_cfg_zero_star_zero_uncond_matches_diffusers_eps():
    """uncond = 0: alpha = 0 / (0 + 1e-8) = 0 in diffusers; the result is scale * cond."""
    c = torch.randn(2, 3, 4, 4)
    u = torch.zeros_like(c)
    torch.testing.assert_close(fastguide.cfg_zero_star(c, u, 3.0), diffusers_pred("cfg_zero_star", [c, u], 3.0))


# --- Triton kernels under the interpreter (on a GPU machine: on CUDA) ---------------------------
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_triton_kernel(op, dtype, rescale, original):
    # block=32 / chunk=16 on 3 x 5 x 11 (55 per sample): several blocks and chunks with masked tails.
    inputs = make_inputs(op, (3, 5, 11), dtype, TRITON_DEVICE)
    scale = torch.tensor([5.5, 2.0, -3.0], device=TRITON_DEVICE)
    pag_t, pag = (None, 1.5) if op != "pag" else (torch.tensor([0.5, 1.5, 2.5], device=TRITON_DEVICE), 0.0)
    out = triton_guidance.guide(inputs[0], inputs[1], inputs[2] if op == "pag" else None, scale, 0.0, pag_t, pag,
                                rescale, original, op == "cfg_zero_star", block=32, chunk=16)
    ref = guide64(op, [x.cpu() for x in inputs], scale.cpu(), pag_scale=pag_t.cpu() if pag_t is not None else pag,
                  rescale=rescale, original=original)
    tol = 1e-6 if dtype == torch.float32 else low_precision_tol(op, [x.cpu() for x in inputs], 5.5, rescale=rescale,
                                                                original=original)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert rel_err(out.cpu(), ref) <= max(tol, 1e-6)


@pytest.mark.parametrize("op", OPS)
def test_triton_kernel_float_scale_and_one_block(op):
    inputs = make_inputs(op, (2, 3, 7), device=TRITON_DEVICE)
    out = triton_guidance.guide(inputs[0], inputs[1], inputs[2] if op == "pag" else None, None, 4.0, None, 1.5,
                                0.5, False, op == "cfg_zero_star")
    ref = guide64(op, [x.cpu() for x in inputs], 4.0, pag_scale=1.5, rescale=0.5)
    assert rel_err(out.cpu(), ref) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton path is covered "
                    "under TRITON_INTERPRET=1 by test_triton_kernel)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_dispatch_and_compile(op):
    inputs = make_inputs(op, (2, 4, 64, 64), device="cuda")
    scale = torch.tensor(5.0, device="cuda")
    fn = torch.compile(lambda *a: run(op, list(a), scale, rescale=0.7), fullgraph=True)
    ref = guide64(op, [x.cpu() for x in inputs], 5.0, pag_scale=1.5, rescale=0.7)
    assert rel_err(run(op, inputs, scale, rescale=0.7).cpu(), ref) <= 1e-6
    assert rel_err(fn(*inputs).cpu(), ref) <= 1e-6
