"""Runtime CPU ISA dispatch (csrc/isa.cpp): every op on the baseline copy of the C++ kernels against
the wider copies this CPU supports, the fp16/bf16 conversions against c10's, FASTGUIDE_CPU_ISA, and
the C++ ops on empty inputs.

Element-wise results must be bitwise equal on every copy (same operation order, no FMA contraction);
reductions sum in SIMD lanes of the copy's width, so they agree to rounding.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastguide
from fastguide import _isa, ops

if ops.CPU_BACKEND is None:
    pytest.skip(f"C++ extension unavailable: {ops.CPU_ERROR}", allow_module_level=True)

from fastguide import _C  # noqa: E402

ALL = ("baseline", "avx2", "avx512")
WIDE = [isa for isa in _C.supported_cpu_isas() if isa != "baseline"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Odd sizes: 3 x 1003 (17 x 59 planes), and 2 x 8407 (several kernel blocks, two APG chunks per sample).
SHAPES = ((3, 17, 59), (2, 7, 1201))


def _inputs(shape, dtype, n=3):
    return [torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(n)]


def _apg(c, u, *, original=False):
    buf = fastguide.MomentumBuffer(-0.5)
    outs = []
    for step in range(2):  # the second step reads the buffer the first one wrote
        outs.append(fastguide.apg(c, u * (1 + step), 5.5, eta=0.3, norm_threshold=9.0, momentum_buffer=buf,
                                  original=original))
    return outs + [buf.running_average]


def _cfg_momentum(c, u, *, original=False):
    buf = (c.double() * 0.25 - u.double()).to(c.dtype)  # the running average of earlier steps
    out = torch.ops.fastguide.cfg_momentum(c, u, None, 6.1, original, -0.5, buf)
    return [out, buf]


# name -> (function of (cond, uncond, third input) returning a tensor or a list, bitwise on every copy)
CASES = {
    "cfg": (lambda c, u, p: fastguide.cfg(c, u, 7.3), True),
    "cfg_original": (lambda c, u, p: fastguide.cfg(c, u, torch.tensor([7.3, 2.0, 4.1][:c.shape[0]]), original=True),
                     True),
    "cfg_rescale": (lambda c, u, p: fastguide.cfg(c, u, 7.3, rescale=0.7), False),
    "pag": (lambda c, u, p: fastguide.pag(c, u, p, 7.3, 2.9), True),
    "pag_rescale": (lambda c, u, p: fastguide.pag(c, u, p, 7.3, 2.9, rescale=0.7, original=True), False),
    "cfg_zero_star": (lambda c, u, p: fastguide.cfg_zero_star(c, u, 4.2), False),
    "cfg_zero_star_rescale": (lambda c, u, p: fastguide.cfg_zero_star(c, u, 4.2, rescale=0.5), False),
    "cfg_momentum": (lambda c, u, p: _cfg_momentum(c, u), True),
    "cfg_momentum_original": (lambda c, u, p: _cfg_momentum(c, u, original=True), True),
    "apg_momentum_threshold": (lambda c, u, p: _apg(c, u), False),
    "apg_original": (lambda c, u, p: _apg(c, u, original=True), False),
    "apg_norm_dim": (lambda c, u, p: fastguide.apg(c, u, 3.0, eta=0.0, norm_dim=-1), False),
    # [G, 7] columns one by one: sums and cosines each relative to their own size
    "guidance_stats": (lambda c, u, p: list(fastguide.guidance_stats(c, u, p).raw.unbind(-1)), False),
    "guidance_stats_norm_dim": (lambda c, u, p: list(fastguide.guidance_stats(c, u, norm_dim=-1).raw.unbind(-1)),
                                False),
    "frequency_cfg_fft_box": (lambda c, u, p: fastguide.frequency_cfg(c, u, 1.3, 6.1, method="fft_box", cutoff=3),
                              True),
    "frequency_cfg_bilinear": (lambda c, u, p: fastguide.frequency_cfg(c, u, 2.0, 5.0, method="bilinear", size=(5, 9),
                                                                       original=True), True),
    "frequency_split": (lambda c, u, p: list(fastguide.frequency_split(c, method="fft_box", cutoff=4)), True),
    "cfgpp_euler": (lambda c, u, p: fastguide.cfgpp_euler_step(p, c, u, 0.6, 3.7, 2.9), True),
    "cfgpp_ddim": (lambda c, u, p: fastguide.cfgpp_ddim_step(p, c, u, torch.tensor(0.45), 0.3, 0.6), True),
}


def _run(isa, fn, inputs):
    with _isa.use(isa):
        assert _C.get_cpu_isa() == isa
        out = fn(*[x.clone() for x in inputs])
    return out if isinstance(out, list) else [out]


def _bits(x):
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])


@pytest.mark.skipif(not WIDE, reason="this CPU runs the baseline copy only")
@pytest.mark.parametrize("isa", WIDE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_wide_copy_matches_baseline(case, shape, dtype, isa):
    fn, bitwise = CASES[case]
    inputs = _inputs(shape, dtype)
    base, wide = _run("baseline", fn, inputs), _run(isa, fn, inputs)
    for b, w in zip(base, wide):
        assert b.dtype == w.dtype and b.shape == w.shape
        assert torch.isfinite(b.double()).all()
        if bitwise:
            assert torch.equal(_bits(w), _bits(b)), f"{case}: not bitwise equal on {isa}"
        else:
            # Sums in other lane orders: fp32 (fp64) rounding of the statistics, which can move a
            # fp16/bf16 output by one unit in its last place.
            tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(b.dtype, 2 * torch.finfo(b.dtype).eps)
            err = ((w.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
            assert err <= tol, f"{case}: {isa} differs from baseline by {err:.3g} (tolerance {tol:.1g})"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_every_16_bit_pattern_converts_like_c10_on_every_copy(dtype):
    """Load: all 65536 bit patterns, read back exactly through <c, 1> (one-element groups; the sum
    starts at +0, so -0 reads back as +0)."""
    c = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    u = torch.ones_like(c)
    ref = c.float().flatten()  # exact for every non-NaN pattern
    results = []
    for isa in _C.supported_cpu_isas():
        with _isa.use(isa):
            got = fastguide.guidance_stats(c, u).raw[:, 0]
        nan = ref.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan], ref[~nan]), isa
        results.append(_bits(got))
    for r in results[1:]:
        assert torch.equal(r, results[0])  # NaN payloads too


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_rounding_to_16_bits_is_c10s_on_every_copy(dtype):
    """Store: fp32 results rounded to nearest even, overflow to inf, subnormals, and c10's NaN
    (fp16: 0x7E00 with the sign, bf16: 0x7FC0), whichever copy runs."""
    n = 4099
    mag = torch.logspace(-9, 5.2, n, dtype=torch.float64)  # fp16 subnormals .. fp16 overflow after * 7.3
    c = (mag * torch.randn(n, dtype=torch.float64).sign()).to(dtype)
    u = (mag * torch.randn(n, dtype=torch.float64)).to(dtype)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1.0], dtype=dtype)
    c[:36] = specials.repeat(6)
    u[:36] = specials.repeat_interleave(6)
    c, u = c.reshape(1, -1), u.reshape(1, -1)
    ref = (u.float() + 7.3 * (c.float() - u.float())).to(dtype)  # torch: fp32 ops, then RNE
    nan_bits = {torch.float16: (0x7E00, -0x0200), torch.bfloat16: (0x7FC0,)}[dtype]  # 0xFE00 as int16
    for isa in _C.supported_cpu_isas():
        with _isa.use(isa):
            out = fastguide.cfg(c, u, 7.3)
        nan = ref.isnan()
        assert torch.equal(out.isnan(), nan), isa
        assert torch.equal(_bits(out[~nan]), _bits(ref[~nan])), isa
        assert all(b in nan_bits for b in _bits(out[nan]).tolist()), isa


def test_widest_supported_is_the_default_and_switching_is_checked():
    supported = _C.supported_cpu_isas()
    assert supported[0] == "baseline" and set(supported) <= set(ALL)
    assert list(supported) == [isa for isa in ALL if isa in supported]  # narrowest first
    env = {k: v for k, v in os.environ.items() if k != "FASTGUIDE_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", "from fastguide import _C; print(_C.get_cpu_isa())"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == supported[-1]
    with pytest.raises(ValueError, match="'sse9' is invalid: it is not one of baseline, avx2, avx512"):
        _C.set_cpu_isa("sse9")
    for isa in ALL:
        if isa not in supported:
            with pytest.raises(ValueError, match=f"'{isa}' is invalid: this CPU .*does not support it"):
                _C.set_cpu_isa(isa)
    assert _C.get_cpu_isa() in supported
    assert _isa.describe().startswith(_C.get_cpu_isa())


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux")
def test_detection_agrees_with_proc_cpuinfo():
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    expected = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            expected.append("avx512")
    assert _C.supported_cpu_isas() == expected


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="x86-64 with objdump")
def test_only_the_wide_copies_contain_wide_instructions():
    """The ODR trap: a header function instantiated in an AVX2 translation unit could be the copy the
    linker keeps for baseline callers. Every function of the library that uses AVX registers (or FMA,
    F16C) must be one of the fastguide::avx2 / fastguide::avx512 kernels."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    wide, fn = set(), None
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
        elif fn and re.search(r"%[yz]mm|\bvfn?m(add|sub)|\bvcvtp[hs]2p[hs]", line):
            wide.add(fn)
    assert wide, "no AVX code found: the wide copies were not built"
    assert [f for f in wide if not re.search(r"fastguide::(avx2|avx512)::", f)] == []


ENV_SCRIPT = r"""
import torch, fastguide
from fastguide import _C, _isa
c = torch.randn(2, 3)
try:
    fastguide.cfg(c, c, 2.0)
    print("op ok", _C.get_cpu_isa())
except ValueError as exc:
    print("op ValueError:", exc)
    try:
        _C.get_cpu_isa()
    except ValueError as exc2:
        print("get ValueError:", exc2)
    print("info:", _isa.describe())
    _C.set_cpu_isa("baseline")  # an explicit choice replaces the bad variable
    print("after set:", _C.get_cpu_isa(), fastguide.cfg(c, c, 2.0).shape)
"""


def _with_env(value):
    env = {**os.environ, "FASTGUIDE_CPU_ISA": value}
    return subprocess.run([sys.executable, "-c", ENV_SCRIPT], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_env_var_forces_a_supported_copy():
    assert _with_env("baseline").strip() == "op ok baseline"  # (the widest is the default, tested above)


@pytest.mark.parametrize("value", ["bogus", *[isa for isa in ALL if isa not in _C.supported_cpu_isas()]])
def test_env_var_unknown_or_unsupported_is_a_clear_error(value):
    out = _with_env(value)
    supported = ", ".join(_C.supported_cpu_isas())
    why = "it is not one of baseline, avx2, avx512" if value not in ALL else "this CPU (or this build) does not support it"
    msg = f"FASTGUIDE_CPU_ISA='{value}' is invalid: {why}. This CPU supports: {supported}"
    assert f"op ValueError: fastguide: {msg}" in out
    assert f"get ValueError: fastguide: {msg}" in out
    assert "info: none, CPU ops raise:" in out
    assert "after set: baseline torch.Size([2, 3])" in out


# --- the C++ ops on empty inputs (called directly: the Python wrappers have their own checks) ------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_ops_accept_empty_inputs(dtype):
    c = torch.empty(2, 0, 5, dtype=dtype)
    op = torch.ops.fastguide
    buf = torch.empty_like(c)
    for mom in (None, buf):
        out = op.apg(c, c, None, 3.0, 1.0, 2.0, -0.5 if mom is not None else 0.0, mom, 0, False)
        assert out.shape == c.shape and out.dtype == dtype
    assert op.apg(c, c, None, 3.0, 1.0, 0.0, 0.0, None, 5, False).shape == c.shape  # groups of 5, none of them
    # group_size 0: one empty group per sample; zero sums, cosines 0 (F.cosine_similarity of empty vectors).
    for guided in (None, c):
        stats = op.guidance_stats(c, c, guided, 0)
        assert stats.shape == (2, 7) and stats.dtype == torch.float32 and not stats.any()
    assert op.guidance_stats(c, c, None, 5).shape == (0, 7)
    for out in (op.cfg(c, c, None, 2.0, 0.7, False), op.cfg_zero_star(c, c, None, 2.0, 0.0, False),
                op.pag(c, c, c, None, 2.0, None, 1.0, 0.5, False), op.cfgpp_step(c, c, c, 1.0, 2.0, 3.0, None, 0.5),
                op.cfg_momentum(c, c, None, 2.0, False, 0.5, buf)):
        assert out.shape == c.shape
    with pytest.raises(RuntimeError, match="group_size must divide 6 elements"):
        op.guidance_stats(torch.ones(2, 3), torch.ones(2, 3), None, 0)
