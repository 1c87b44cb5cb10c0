"""Triton launchers at their edges (TRITON_INTERPRET=1 on CPU, or CUDA): scale strides, per-row scales of
2-D frequency inputs, float64 end to end, empty tensors, small packed APG groups. Compared with the
plain-PyTorch ops (fastguide/_eager.py) evaluated in float64."""
import pytest
import torch

from fastguide import _eager, frequency
from fastguide.kernels import apg as tapg
from fastguide.kernels import cfgpp as tcfgpp
from fastguide.kernels import frequency as tfreq
from fastguide.kernels import guidance as tguide
from reference import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (3, 2, 5, 7)  # 70 elements per sample


def inputs(shape=SHAPE, dtype=torch.float32, n=3):
    xs = [torch.randn(shape, dtype=torch.float64) for _ in range(n)]
    return [x.to(dtype=dtype, device=DEV) for x in xs]


def tol(dtype):
    return {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2 * torch.finfo(dtype).eps)


def strided_scales(B):
    """Scales that are not a contiguous [B] tensor: every other element, and a 0-stride expand whose
    storage goes on (a launcher assuming stride 1 would read 99 for samples >= 1)."""
    base = torch.tensor([1.5, 99.0, -2.0, 99.0, 3.0, 99.0], dtype=torch.float32, device=DEV)
    every_other = base[: 2 * B : 2]
    expanded = torch.tensor([2.5, 99.0, 99.0, 99.0], device=DEV)[:1].expand(B)
    assert every_other.stride(0) == 2 and expanded.stride(0) == 0
    return [every_other, expanded]


def _ops(dtype):
    """(name, launcher(scale_t, ...) , eager(scale_t)) for each family, on fresh inputs of dtype."""
    c, u, p = inputs(dtype=dtype)
    d64 = [x.cpu().double() for x in (c, u, p)]
    B = SHAPE[0]
    K = SHAPE[-1]  # APG groups of 7 (norm_dim=-1): several groups per sample, packed into one tile row each
    ah, aw = frequency.operators("fft_box", SHAPE[-2], SHAPE[-1], 2, 2, DEV,
                                 torch.float64 if dtype == torch.float64 else torch.float32)
    ah64, aw64 = (m.cpu().double() for m in (ah, aw))

    def s64(t):
        return t.cpu().double().contiguous()

    return [
        ("cfg+rescale", lambda t: tguide.cfg(c, u, t, 0.0, 0.7, False),
         lambda t: _eager.cfg(d64[0], d64[1], s64(t), 0.0, 0.7, False)),
        ("pag", lambda t: tguide.pag(c, u, p, t, 0.0, t, 0.0, 0.0, False),
         lambda t: _eager.pag(d64[0], d64[1], d64[2], s64(t), 0.0, s64(t), 0.0, 0.0, False)),
        ("apg", lambda t: tapg.apg(c, u, t, 0.0, 0.5, 3.0, 0.0, None, K, False),
         lambda t: _eager.apg(d64[0], d64[1], s64(t), 0.0, 0.5, 3.0, 0.0, None, K, False)),
        ("cfgpp", lambda t: tcfgpp.cfgpp_step(p, c, u, 0.9, -0.3, 0.1, t, 0.0),
         lambda t: _eager.cfgpp_step(d64[2], d64[0], d64[1], 0.9, -0.3, 0.1, s64(t), 0.0)),
        ("frequency_cfg", lambda t: tfreq.frequency_cfg(c, u, ah, aw, t, 0.0, None, 1.25, False),
         lambda t: _eager.frequency_cfg(d64[0], d64[1], ah64, aw64, s64(t), 0.0, None, 1.25, False)),
    ]


@pytest.mark.parametrize("which", ["every_other", "expanded"])
def test_scale_tensor_strides(which):
    """Item 3: the launchers pass the scale's real stride (2 for scale[::2], 0 for an expanded scale)."""
    t = strided_scales(SHAPE[0])[["every_other", "expanded"].index(which)]
    for name, run, ref in _ops(torch.float32):
        assert rel_err(run(t).cpu(), ref(t)) <= 1e-6, name


@pytest.mark.parametrize("N,tiles", [(40, dict(bm=16, bk=16, bn=16)), (80, {})], ids=["bn16", "default-tiles"])
def test_frequency_2d_input_uses_each_rows_scale(N, tiles):
    """Item 4: a 2-D [B, N] input is one [B, N] plane whose row r is sample r: row r gets scale[r]
    (as the C++ kernel and the eager op do). N > BN, so the plane is cut into several column tiles."""
    B = 3
    c, u = inputs((B, N), n=2)
    ah, aw = frequency.operators("bilinear", B, N, 2, 9, DEV, torch.float32)
    sl = torch.tensor([1.5, -2.0, 4.0], device=DEV)
    sh = torch.tensor([0.5, 3.0, -1.0], device=DEV)
    out = tfreq.frequency_cfg(c, u, ah, aw, sl, 0.0, sh, 0.0, False, **tiles)
    ah64, aw64 = frequency.operators("bilinear", B, N, 2, 9, "cpu", torch.float64)
    ref = _eager.frequency_cfg(c.cpu().double(), u.cpu().double(), ah64, aw64, sl.cpu().double(), 0.0,
                               sh.cpu().double(), 0.0, False)
    assert rel_err(out.cpu(), ref) <= 1e-6


def test_float64_scales_and_sums():
    """Item 5: fp64 inputs get fp64 scales (tensor or float) and fp64 partial sums: results match the fp64
    eager ops to 1e-12 (fp32 scales or fp32 partials would give ~1e-8)."""
    t = torch.tensor([0.1, 0.7, 1.3], dtype=torch.float64, device=DEV)
    for name, run, ref in _ops(torch.float64):
        assert rel_err(run(t).cpu(), ref(t)) <= 1e-12, name
    c, u, p = inputs(dtype=torch.float64)
    c64, u64, p64 = (x.cpu() for x in (c, u, p))
    cases = [  # float scales: a Python float must reach the kernel unrounded
        (tguide.cfg_zero_star(c, u, None, 0.1, 0.3, True), _eager.cfg_zero_star(c64, u64, None, 0.1, 0.3, True)),
        (tguide.pag(c, u, p, None, 0.1, None, 0.3, 0.7, False), _eager.pag(c64, u64, p64, None, 0.1, None, 0.3, 0.7, False)),
        (tapg.apg(c, u, None, 0.1, 0.3, 2.0, -0.3, p.clone(), 70, False),
         _eager.apg(c64, u64, None, 0.1, 0.3, 2.0, -0.3, p64.clone(), 70, False)),
        (tcfgpp.cfgpp_step(p, c, u, 0.1, -0.3, 0.7, None, 0.1), _eager.cfgpp_step(p64, c64, u64, 0.1, -0.3, 0.7, None, 0.1)),
    ]
    ah, aw = frequency.operators("fft_box", 5, 7, 2, 2, DEV, torch.float64)
    cases.append((tfreq.frequency_cfg(c, u, ah, aw, None, 0.1, None, 0.3, False),
                  _eager.frequency_cfg(c64, u64, ah.cpu(), aw.cpu(), None, 0.1, None, 0.3, False)))
    for i, (out, ref) in enumerate(cases):
        assert out.dtype == torch.float64 and rel_err(out.cpu(), ref) <= 1e-12, i


def test_float64_guidance_stats_sums_cancel_across_chunks():
    """Item 5: guidance_stats of fp64 inputs adds its chunk partials in fp64. Here the chunks' <c,u> are
    +-32000 and cancel to a sum of ~30: fp32 partials would be off by ~1e-4 relative."""
    K, chunk = 1024, 32
    c = 1000.0 + torch.randn(2, K, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat_interleave(chunk).repeat(K // (2 * chunk))
    u = sign.expand(2, K).contiguous()
    res = tapg.guidance_stats(c.to(DEV), u.to(DEV), None, K, chunk=chunk)
    ref = _eager.guidance_stats(c, u, None, K)  # fp64 sums, rounded once to the op's fp32
    assert res.dtype == torch.float32
    torch.testing.assert_close(res.cpu(), ref, rtol=2e-7, atol=0.0)


def test_empty_tensors():
    """Item 7: empty inputs (no samples, or an empty feature dim) return empty outputs without launching;
    guidance_stats over empty groups returns zeros for the sums and 0 for the cosines (as
    F.cosine_similarity of empty vectors), with one row per group."""
    for shape in [(2, 0, 5), (0, 4, 3)]:
        c, u, p = inputs(shape)
        st = torch.ones(shape[0], device=DEV)
        assert tguide.cfg(c, u, st, 0.0, 0.7, False).shape == shape
        assert tguide.pag(c, u, p, None, 2.0, None, 1.0, 0.0, True).shape == shape
        assert tguide.cfg_zero_star(c, u, None, 2.0, 0.0, False).shape == shape
        assert tcfgpp.cfgpp_step(p, c, u, 1.0, -0.5, 0.5, st, 0.0).shape == shape
        assert tapg.apg(c, u, None, 2.0, 1.0, 0.0, 0.0, None, 5, False).shape == shape
        ah, aw = frequency.operators("fft_box", shape[-2], shape[-1], 1, 1, DEV, torch.float32) \
            if shape[-2] else (torch.zeros(1, 0, 0, device=DEV), torch.zeros(1, 5, 5, device=DEV))
        assert tfreq.frequency_cfg(c, u, ah, aw, None, 1.0, None, 2.0, False).shape == shape
    c, u, g = inputs((2, 0, 5))
    stats = tapg.guidance_stats(c, u, g, 0)  # norm_dim=None: one empty group per sample
    assert torch.equal(stats.cpu(), torch.zeros(2, 7))
    assert tapg.guidance_stats(c, u, g, 5).shape == (0, 7)  # norm_dim=-1: no groups at all


@pytest.mark.parametrize("K,G", [(12, 45), (64, 9)])
def test_small_groups_packed_per_program(K, G):
    """Item 6: groups smaller than a tile (Flux's norm_dim=-1, K = 64) are packed several per program
    (chunk=64 / 256 here: 4 groups per program), and G is not a multiple of 4: the last program is masked."""
    c, u = inputs((1, G, K), n=2)
    chunk = 4 * triton_next_pow2(K)
    buf = torch.randn(c.shape, dtype=torch.float32, device=DEV)
    st = torch.tensor([2.0], device=DEV)
    b64 = buf.cpu().double()
    out = tapg.apg(c, u, st, 0.0, 0.0, 1.5, -0.5, buf, K, False, chunk=chunk)
    ref = _eager.apg(c.cpu().double(), u.cpu().double(), st.cpu().double(), 0.0, 0.0, 1.5, -0.5, b64, K, False)
    assert rel_err(out.cpu(), ref) <= 1e-6
    assert rel_err(buf.cpu(), b64) <= 1e-6
    stats = tapg.guidance_stats(c, u, out, K, chunk=chunk)
    torch.testing.assert_close(stats.cpu().double(), _eager.guidance_stats(
        c.cpu().double(), u.cpu().double(), out.cpu().double(), K).double(), rtol=1e-5, atol=1e-5)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()
