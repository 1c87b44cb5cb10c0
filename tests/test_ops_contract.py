"""Op-level contract: opcheck, torch.compile without graph breaks or recompiles, and clear errors."""
import math

import pytest
import torch
import torch._dynamo.testing

import fastguide
from reference import guide64, rel_err
from test_guidance import NINPUTS, OPS, make_inputs, run


def op_args(op, inputs, scale_t, scale, rescale, original, pag_t=None, pag=1.5):
    if op == "pag":
        return (*inputs, scale_t, scale, pag_t, pag, rescale, original)
    return (*inputs, scale_t, scale, rescale, original)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    inputs = make_inputs(op, (2, 3, 5, 7))
    overload = getattr(torch.ops.fastguide, op).default
    for args in (op_args(op, inputs, None, 4.0, 0.0, False),
                 op_args(op, inputs, torch.tensor([2.0, 3.0]), 0.0, 0.7, True, pag_t=torch.tensor(1.0))):
        torch.library.opcheck(overload, args)


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_no_recompile_across_steps(op):
    """30 steps with a new scale tensor value each step: one graph, no recompile, no graph break."""
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda scale, *xs: run(op, list(xs), scale, rescale=0.5), backend=counter, fullgraph=True)
    inputs = make_inputs(op, (2, 4, 8, 8))
    scale = torch.empty(2)
    for step in range(30):
        scale.copy_(torch.tensor([1.0 + step, 7.5 - step / 10]))
        out = fn(scale, *inputs)
        assert rel_err(out, guide64(op, inputs, scale, pag_scale=1.5, rescale=0.5)) <= 1e-6
    assert counter.frame_count == 1


def test_compile_inductor_fullgraph():
    """A real inductor compile of a sampler-like function around the op (slow; once)."""
    torch._dynamo.reset()
    c, u = make_inputs("cfg", (2, 4, 16, 16))
    scale = torch.tensor(6.0)

    @torch.compile(fullgraph=True)
    def step(x, c, u, scale):
        return x - 0.1 * fastguide.cfg(c, u, scale, rescale=0.7)

    x = torch.randn_like(c)
    expected = x.double() - 0.1 * guide64("cfg", [c, u], 6.0, rescale=0.7)
    assert rel_err(step(x, c, u, scale), expected) <= 1e-6


# --- bad input -------------------------------------------------------------------------------
def _bad_cases():
    c = torch.randn(2, 3, 4)
    return [
        ("shape mismatch", lambda: fastguide.cfg(c, torch.randn(2, 3, 5), 2.0), ValueError, "uncond must have cond's shape"),
        ("no broadcast", lambda: fastguide.cfg(c, torch.randn(1, 3, 4), 2.0), ValueError, "nothing is broadcast"),
        ("batch mismatch pag", lambda: fastguide.pag(c, c, torch.randn(3, 3, 4), 2.0, 1.0), ValueError,
         "perturbed must have cond's shape"),
        ("dtype mismatch", lambda: fastguide.cfg(c, c.half(), 2.0), TypeError, "uncond must have cond's dtype"),
        ("integer dtype", lambda: fastguide.cfg(c.long(), c.long(), 2.0), TypeError, "floating tensor"),
        ("1-d input", lambda: fastguide.cfg(c[0, 0], c[0, 0], 2.0), ValueError, ">= 2 dims"),
        ("device mismatch", lambda: fastguide.cfg(c, c.to("meta"), 2.0), ValueError, "cond's device"),
        ("scale wrong length", lambda: fastguide.cfg(c, c, torch.ones(3)), ValueError, "shape [2]"),
        ("scale 2-d", lambda: fastguide.cfg(c, c, torch.ones(2, 1)), ValueError, "one per sample"),
        ("scale nan", lambda: fastguide.cfg(c, c, float("nan")), ValueError, "scale must be finite"),
        ("scale inf", lambda: fastguide.cfg_zero_star(c, c, math.inf), ValueError, "scale must be finite"),
        ("pag_scale inf", lambda: fastguide.pag(c, c, c, 1.0, -math.inf), ValueError, "pag_scale must be finite"),
        ("scale string", lambda: fastguide.cfg(c, c, "7.5"), TypeError, "float or a tensor"),
        ("rescale nan", lambda: fastguide.cfg(c, c, 2.0, rescale=float("nan")), ValueError, "rescale"),
        ("scale device", lambda: fastguide.cfg(c, c, torch.ones(2, device="meta")), ValueError, "cond's device"),
        ("float8", lambda: fastguide.cfg(c.to(torch.float8_e4m3fn), c.to(torch.float8_e4m3fn), 2.0), TypeError,
         "float32, float16, bfloat16 or float64, got torch.float8_e4m3fn"),
        ("complex", lambda: fastguide.pag(c.cfloat(), c.cfloat(), c.cfloat(), 2.0, 1.0), TypeError, "complex64"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_clear_error(name, call, exc, match):
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("op", OPS)
def test_raw_op_checks_in_cpp(op):
    """Calling torch.ops.fastguide.* directly (no wrapper) still fails cleanly in the C++ kernel."""
    if fastguide.ops.CPU_BACKEND is None:
        pytest.skip("C++ extension not built: " + str(fastguide.ops.CPU_ERROR))
    inputs = make_inputs(op, (2, 3, 4))
    bad = [inputs[0], inputs[1][:, :2]] + inputs[2:]
    with pytest.raises(RuntimeError, match="must have cond's shape"):
        getattr(torch.ops.fastguide, op)(*op_args(op, bad, None, 2.0, 0.0, False))
    with pytest.raises(RuntimeError, match="0-d or of shape"):
        getattr(torch.ops.fastguide, op)(*op_args(op, inputs, torch.ones(5), 2.0, 0.0, False))


@pytest.mark.parametrize("op", OPS)
def test_empty_feature_dim(op):
    inputs = [torch.randn(2, 0, 5) for _ in range(NINPUTS[op])]
    for rescale in (0.0, 0.7):
        out = run(op, inputs, 3.0, rescale=rescale)
        assert out.shape == (2, 0, 5) and out.dtype == torch.float32


def _eager_calls(layout):
    """Every eager op on inputs of the given layout, with the C++/dispatcher result on contiguous copies."""
    c, u = make_inputs("cfg", (2, 3, 6, 5))
    if layout == "channels_last":
        c, u = c.to(memory_format=torch.channels_last), u.to(memory_format=torch.channels_last)
    else:
        c, u = c.transpose(2, 3), u.transpose(2, 3)
    st = torch.tensor([2.0, 3.0])
    ah, aw = fastguide.frequency.operators("fft_box", c.shape[-2], c.shape[-1], 2, 2, "cpu", torch.float32)
    e, f = fastguide._eager, torch.ops.fastguide
    return [
        ("cfg", e.cfg, f.cfg, (c, u, st, 0.0, 0.5, False)),
        ("pag", e.pag, f.pag, (c, u, c * 0.9, None, 3.0, st, 0.0, 0.0, True)),
        ("cfg_zero_star", e.cfg_zero_star, f.cfg_zero_star, (c, u, None, 4.0, 0.0, False)),
        ("frequency_cfg", e.frequency_cfg, f.frequency_cfg, (c, u, ah, aw, st, 0.0, None, 5.0, False)),
        ("frequency_split", e.frequency_split, f.frequency_split, (c, ah, aw)),
        ("cfgpp_step", e.cfgpp_step, f.cfgpp_step, (c, c, u, 1.0, -0.5, 0.3, st, 0.0)),
    ]


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_eager_fallback_output_is_contiguous_like_the_fake(layout):
    """The eager fallback serves devices without a fused kernel; its outputs must have the layout the fake
    implementation promises (contiguous), or opcheck and torch.compile(fullgraph=True) fail there."""
    for name, eager, op, args in _eager_calls(layout):
        out = eager(*args)
        assert out.is_contiguous(), name
        fake = torch._subclasses.fake_tensor.FakeTensorMode()
        with fake:
            fargs = [fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            expected = op(*fargs)
        assert out.stride() == expected.stride(), name
        torch.testing.assert_close(out, op(*args), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("op", OPS + ("apg", "frequency_cfg", "cfgpp_euler_step"))
def test_python_float_scale_changing_under_fullgraph(op):
    """A Python float scale that changes every call: no graph break under fullgraph=True, and at most the one
    recompile dynamo itself makes when a float input first changes (it then treats it as symbolic)."""
    counter = torch._dynamo.testing.CompileCounter()
    c, u = make_inputs("cfg", (2, 4, 8, 8))
    p = c * 0.9
    calls = {
        "cfg": lambda s: fastguide.cfg(c, u, s, rescale=0.5),
        "pag": lambda s: fastguide.pag(c, u, p, s, s / 2),
        "cfg_zero_star": lambda s: fastguide.cfg_zero_star(c, u, s),
        "apg": lambda s: fastguide.apg(c, u, s, norm_threshold=3.0),
        "frequency_cfg": lambda s: fastguide.frequency_cfg(c, u, s, s + 1.0, cutoff=2),
        "cfgpp_euler_step": lambda s: fastguide.cfgpp_euler_step(c, c, u, s / 10.0, 1.5, 1.0),
    }
    call = calls[op]
    compiled = torch.compile(call, backend=counter, fullgraph=True)
    for s in (1.5, 2.5, 4.0, 7.5, 9.0):
        torch.testing.assert_close(compiled(s), call(s))
    assert counter.frame_count <= 2
