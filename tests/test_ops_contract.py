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
