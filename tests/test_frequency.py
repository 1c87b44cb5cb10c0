"""Frequency-split guidance: FreSca (FFT box), FreCaS (bilinear) and diffusers' FDG, against their references."""
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from diffusers.guiders import FrequencyDecoupledGuidance

import fastguide
from fastguide import frequency
from fastguide.kernels import frequency as triton_frequency
import reference
from reference import rel_err


# --- literal transcriptions of the peers (float64) --------------------------------------------
def fresca_fourier_filter(x, scale_low, scale_high, freq_cutoff):
    """FreSca's official Fourier_filter (tests/reference.py) on each [H, W] plane of x (any leading dims)."""
    H, W = x.shape[-2:]
    return reference.fresca_fourier_filter(x.reshape(-1, 1, H, W), scale_low, scale_high, freq_cutoff).view(x.shape)


def fresca_cfg(cond, uncond, cfg, scale_low, scale_high, cutoff):
    """FreSca's filter as ComfyUI's node applies it (pre-CFG: filtered guidance + uncond), then CFG with scale
    `cfg` (the cutoffs used here are <= min(H, W) // 2, where ComfyUI's clamp equals the official one)."""
    filtered_cond = fresca_fourier_filter(cond - uncond, scale_low, scale_high, cutoff) + uncond
    return uncond + cfg * (filtered_cond - uncond)


def frecas_facfg(cond, uncond, tsize, gsw):
    """FreCaS facfg_wrapper: bands [high, low] of each prediction, weights gsw = (w_high, w_low)."""
    def decompose(x):
        low = F.interpolate(F.interpolate(x, size=tsize, mode="bilinear"), size=x.shape[-2:], mode="bilinear")
        return [x - low, low]
    return sum(u + w * (c - u) for u, c, w in zip(decompose(uncond), decompose(cond), gsw))


def pair(shape, dtype=torch.float32, device="cpu"):
    c = torch.randn(shape, dtype=torch.float64)
    u = c + 0.5 * torch.randn(shape, dtype=torch.float64)
    return c.to(dtype=dtype, device=device), u.to(dtype=dtype, device=device)


# --- frequency_split ---------------------------------------------------------------------------
FFT_CASES = [((2, 3, 16, 16), 4), ((1, 4, 15, 20), 3), ((2, 2, 9, 7), 0), ((2, 2, 9, 7), 5), ((2, 3, 32, 24), 8),
             ((1, 4, 3, 6, 10), 2), ((2, 2, 8, 8), 4)]  # odd, H != W, cutoff 0, large cutoff, batch 1, 5-D video


@pytest.mark.parametrize("shape,cutoff", FFT_CASES, ids=str)
def test_split_fft_box_matches_torch_fft(shape, cutoff):
    x = torch.randn(shape, dtype=torch.float64)
    low, high = fastguide.frequency_split(x.float(), method="fft_box", cutoff=cutoff)
    ref = fresca_fourier_filter(x, 1.0, 0.0, cutoff)
    assert rel_err(low, ref) <= 1e-6
    torch.testing.assert_close(low + high, x.float())
    if cutoff == 0:
        assert low.abs().max() == 0
    if shape[-1] == shape[-2] and shape[-1] % 2 == 0 and cutoff >= shape[-1] // 2:  # the box covers everything
        assert rel_err(low, x) <= 1e-6


# Even and odd sides, square and not; every cutoff from 0 to past the largest half side.
CUTOFF_SHAPES = [(6, 6), (7, 7), (6, 9), (9, 4), (5, 8), (8, 12)]


@pytest.mark.parametrize("clamp", ["fresca", "comfyui"])
@pytest.mark.parametrize("H,W", CUTOFF_SHAPES, ids=str)
def test_fft_box_cutoff_clamp_equals_official_code(H, W, clamp):
    """Every cutoff 0..max(H, W) // 2 + 2 against the transcriptions in tests/reference.py: FreSca's code (one
    cutoff clamped at min(H // 2, W // 2), the default) and ComfyUI's node (each axis at its own n // 2),
    on the fused-operator route and the direct torch.fft route, in float64."""
    ref_filter = reference.fresca_fourier_filter if clamp == "fresca" else reference.comfyui_fourier_filter
    c, u = pair((2, 3, H, W), torch.float64)
    d = c - u
    for cutoff in range(max(H, W) // 2 + 3):
        low, _ = fastguide.frequency_split(d, cutoff=cutoff, cutoff_clamp=clamp)
        assert rel_err(low, ref_filter(d, 1.0, 0.0, cutoff)) <= 1e-12, cutoff
        out = fastguide.frequency_cfg(c, u, 2.0, 7.0, cutoff=cutoff, cutoff_clamp=clamp)
        assert rel_err(out, u + ref_filter(d, 2.0, 7.0, cutoff)) <= 1e-12, cutoff
        direct = frequency._direct_lowpass(d, "fft_box", *frequency._params("t", d, "fft_box", cutoff, None,
                                                                            cutoff_clamp=clamp))
        assert rel_err(direct, ref_filter(d, 1.0, 0.0, cutoff)) <= 1e-12, cutoff
    differs = H // 2 != W // 2  # the two clamps give different boxes past min(H, W) // 2 only then
    big = max(H, W) // 2
    assert differs == (rel_err(fastguide.frequency_split(d, cutoff=big)[0],
                               reference.comfyui_fourier_filter(d, 1.0, 0.0, big)) > 1e-3)


@pytest.mark.parametrize("shape,size", [((2, 3, 16, 16), (8, 8)), ((1, 4, 15, 21), (7, 10)), ((2, 2, 12, 9), (12, 9)),
                                        ((1, 4, 3, 10, 14), (5, 7))], ids=str)
def test_split_bilinear_matches_interpolate(shape, size):
    x = torch.randn(shape, dtype=torch.float64)
    planes = x.reshape(-1, 1, *shape[-2:])
    ref = F.interpolate(F.interpolate(planes, size=size, mode="bilinear"), size=shape[-2:], mode="bilinear")
    low, high = fastguide.frequency_split(x.float(), method="bilinear", size=size)
    assert rel_err(low, ref.view(shape)) <= 1e-6
    torch.testing.assert_close(low + high, x.float())


# --- frequency_cfg -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape,cutoff", [((2, 4, 32, 32), 6), ((1, 4, 17, 12), 3)], ids=str)
def test_frequency_cfg_equals_fresca(shape, cutoff):
    c, u = pair(shape)
    # FreSca scales the guidance difference; CFG then multiplies by its scale.
    out = fastguide.frequency_cfg(c, u, 7.0 * 1.0, 7.0 * 1.25, method="fft_box", cutoff=cutoff)
    assert rel_err(out, fresca_cfg(c.double(), u.double(), 7.0, 1.0, 1.25, cutoff)) <= 1e-6


@pytest.mark.parametrize("shape,tsize", [((2, 4, 32, 32), (16, 16)), ((1, 4, 24, 18), (11, 9))], ids=str)
def test_frequency_cfg_equals_frecas(shape, tsize):
    c, u = pair(shape)
    out = fastguide.frequency_cfg(c, u, 5.0, 9.0, method="bilinear", size=tsize)
    assert rel_err(out, frecas_facfg(c.double(), u.double(), tsize, (9.0, 5.0))) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_frequency_cfg_scales_rescale_original(dtype):
    c, u = pair((3, 2, 12, 10), dtype)
    sl, sh = torch.tensor([1.0, 2.0, 3.0]), torch.tensor(6.0)
    out = fastguide.frequency_cfg(c, u, sl, sh, method="fft_box", cutoff=3, rescale=0.6, original=True)
    cd, ud = c.double(), u.double()
    d = cd - ud
    low = fresca_fourier_filter(d, 1.0, 0.0, 3)
    g = cd + sl.double().view(-1, 1, 1, 1) * low + 6.0 * (d - low)
    std_c, std_g = cd.std(dim=(1, 2, 3), keepdim=True), g.std(dim=(1, 2, 3), keepdim=True)
    ref = 0.6 * g * std_c / std_g + 0.4 * g
    tol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert out.dtype == dtype and rel_err(out, ref) <= tol


# --- FDG -----------------------------------------------------------------------------------------
FDG_SETTINGS = [
    dict(guidance_scales=[10.0, 5.0]),                                      # diffusers' default
    dict(guidance_scales=[10.0, 5.0], guidance_rescale=0.7),               # data-space rescale
    dict(guidance_scales=[10.0, 5.0], use_original_formulation=True),
    dict(guidance_scales=[12.0, 6.0, 3.0]),                                 # three levels
    dict(guidance_scales=[10.0, 5.0], parallel_weights=0.5),               # APG-style weighting
    dict(guidance_scales=[9.0, 6.0, 2.0], parallel_weights=[0.3, 0.6, 1.0], guidance_rescale=[0.5, 0.2, 0.0],
         guidance_rescale_space="freq"),
]


@pytest.mark.parametrize("settings", FDG_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_fdg_equals_diffusers_guider(settings):
    c, u = pair((2, 4, 32, 32))
    guider = FrequencyDecoupledGuidance(**settings)
    ref = guider.forward(c.double(), u.double()).pred  # diffusers + kornia in float64
    out = fastguide.fdg(c, u, settings["guidance_scales"], parallel_weights=settings.get("parallel_weights"),
                        rescale=settings.get("guidance_rescale", 0.0),
                        rescale_space=settings.get("guidance_rescale_space", "data"),
                        original=settings.get("use_original_formulation", False))
    assert rel_err(out, ref) <= 2e-6
    theirs32 = guider.forward(c, u).pred  # and within fp32 rounding of diffusers in fp32
    torch.testing.assert_close(out, theirs32, rtol=1e-5, atol=1e-5 * theirs32.abs().max().item())


# --- Triton ------------------------------------------------------------------------------------
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,param", [("fft_box", (5, 5)), ("bilinear", (9, 13))])
@pytest.mark.parametrize("original", [False, True])
def test_triton_frequency_cfg(dtype, method, param, original):
    """H=40 in row blocks of 16 (3 blocks, masked tail), W=24 padded to 32 in column blocks of 16."""
    c, u = pair((2, 3, 40, 24), dtype, TRITON_DEVICE)
    ah, aw = frequency.operators(method, 40, 24, *param, TRITON_DEVICE, torch.float32)
    sl = torch.tensor([1.5, -2.0], device=TRITON_DEVICE)
    out = triton_frequency.frequency_cfg(c, u, ah, aw, sl, 0.0, None, 6.0, original, bm=16, bk=16, bn=16)
    cd, ud = c.cpu().double(), u.cpu().double()
    d = cd - ud
    ah64, aw64 = frequency.operators(method, 40, 24, *param, "cpu", torch.float64)
    low = sum(ah64[t] @ d @ aw64[t].T for t in range(ah64.shape[0]))
    ref = (cd if original else ud) + sl.double().view(-1, 1, 1, 1) * low + 6.0 * (d - low)
    tol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert out.dtype == dtype and rel_err(out.cpu(), ref) <= tol


def test_triton_frequency_split():
    x = torch.randn(2, 3, 20, 12, device=TRITON_DEVICE)
    ah, aw = frequency.operators("fft_box", 20, 12, 4, 4, TRITON_DEVICE, torch.float32)
    low = triton_frequency.frequency_split(x, ah, aw, bm=16, bk=16, bn=16)
    assert rel_err(low.cpu(), fresca_fourier_filter(x.cpu().double(), 1.0, 0.0, 4)) <= 1e-6


@pytest.mark.parametrize("col_axis", [None, False], ids=["default", "2d-grid"])
def test_triton_frequency_default_tiles_and_grids(col_axis):
    """The launchers' own tiles ([16, 32] for a plane with a side < 64) on both grid layouts: 20x70 is 2 x 3
    tiles with masked tails on both axes; by default a grid of (planes, row tiles, column tiles), forced to
    (planes, row tiles * column tiles) as larger tiles launch. fp16 in, fp32 accumulation, two FFT-box terms."""
    c, u = pair((1, 2, 20, 70), torch.float16, TRITON_DEVICE)
    ah, aw = frequency.operators("fft_box", 20, 70, 4, 9, TRITON_DEVICE, torch.float32)
    out = torch.empty_like(c)
    (launch,) = triton_frequency._plan(c, u, ah, aw, out, None, 1.5, None, 4.0, False, False, col_axis=col_axis)
    assert (launch.constexprs["BM"], launch.constexprs["BN"]) == (16, 32)
    assert launch.grid == ((2, 2, 3) if col_axis is None else (2, 6))
    launch()
    cd, ud = c.cpu().double(), u.cpu().double()
    d = cd - ud
    ah64, aw64 = frequency.operators("fft_box", 20, 70, 4, 9, "cpu", torch.float64)
    low = sum(ah64[t] @ d @ aw64[t].T for t in range(ah64.shape[0]))
    assert rel_err(out.cpu(), ud + 1.5 * low + 4.0 * (d - low)) <= 2 * torch.finfo(torch.float16).eps
    if col_axis is None:  # the public launcher takes the same plan
        out2 = triton_frequency.frequency_cfg(c, u, ah, aw, None, 1.5, None, 4.0, False)
        assert torch.equal(out2, out)


# --- contract ----------------------------------------------------------------------------------
def test_opcheck():
    c, u = pair((2, 3, 10, 12))
    ah, aw = frequency.operators("fft_box", 10, 12, 3, 3, "cpu", torch.float32)
    torch.library.opcheck(torch.ops.fastguide.frequency_cfg.default,
                          (c, u, ah, aw, torch.tensor([1.0, 2.0]), 0.0, None, 5.0, False))
    torch.library.opcheck(torch.ops.fastguide.frequency_split.default, (c, ah[:1], aw[:1]))


def test_compile_fullgraph_no_recompile():
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(c, u, sl, sh):
        return fastguide.frequency_cfg(c, u, sl, sh, method="bilinear", size=(8, 8), rescale=0.5)

    frequency._cache.clear()  # the first compiled call fills the operator cache
    c, u = pair((2, 4, 16, 16))
    sl, sh = torch.empty(()), torch.empty(2)
    for i in range(10):
        sl.fill_(1.0 + i)
        sh.copy_(torch.tensor([4.0, 8.0 - i]))
        ref = fastguide.frequency_cfg(c, u, 1.0 + i, torch.tensor([4.0, 8.0 - i]), method="bilinear", size=(8, 8),
                                      rescale=0.5)
        torch.testing.assert_close(step(c, u, sl, sh), ref)
    assert counter.frame_count == 1


def test_operator_cache_is_bounded():
    frequency._cache.clear()
    for n in range(4, 4 + frequency._CACHE_SIZE + 10):
        frequency.operators("bilinear", n, n, 2, 2, "cpu", torch.float32)
    assert len(frequency._cache) == frequency._CACHE_SIZE


@pytest.mark.parametrize("call,match", [
    (lambda x: fastguide.frequency_split(x, method="fft_box", cutoff=-1), "cutoff= an int >= 0"),
    (lambda x: fastguide.frequency_split(x, method="fft_box"), "cutoff= an int >= 0"),
    (lambda x: fastguide.frequency_split(x, method="bilinear", size=(9, 4)), "larger than the input"),
    (lambda x: fastguide.frequency_split(x, method="bilinear", size=4), r"size=\(h, w\)"),
    (lambda x: fastguide.frequency_split(x[..., :1], method="fft_box", cutoff=1), "H and W must be >= 2"),
    (lambda x: fastguide.frequency_split(x, method="wavelet", cutoff=1), "method must be one of"),
    (lambda x: fastguide.frequency_cfg(x, x, 1.0, 2.0, cutoff=1, cutoff_clamp="x"), "cutoff_clamp must be one of"),
    (lambda x: fastguide.frequency_cfg(x, x[:1], 1.0, 2.0, cutoff=1), "uncond must have cond's shape"),
    (lambda x: fastguide.frequency_cfg(x, x, float("nan"), 2.0, cutoff=1), "scale_low must be finite"),
    (lambda x: fastguide.fdg(torch.randn(1, 4, 12, 12), torch.randn(1, 4, 12, 12), [3.0, 2.0]), "reflect-padded"),
    (lambda x: fastguide.fdg(x, x, [3.0, 2.0], levels=3), "one scale per level"),
    (lambda x: fastguide.frequency_cfg(x[:, 0, 0], x[:, 0, 0], torch.ones(2), 2.0, cutoff=1), ">= 3 dims"),
    (lambda x: fastguide.fdg(x, x, [float("nan"), 2.0, 1.0]), r"scales\[0\] must be finite"),
    (lambda x: fastguide.fdg(x, x, [3.0, torch.ones(3), 1.0]), r"scales\[1\] must be a float, a 0-d tensor"),
    (lambda x: fastguide.fdg(x, x, [3.0, 2.0, 1.0], parallel_weights=[1.0, float("inf"), 1.0]),
     r"parallel_weights\[1\] must be a finite"),
    (lambda x: fastguide.fdg(x, x, [3.0, 2.0, 1.0], rescale=[0.0, 0.5]), "rescale needs one value per level"),
    (lambda x: fastguide.fdg(x, x, 3.0), "scales must be a list"),
], ids=["cutoff<0", "no cutoff", "size too big", "size not pair", "W<2", "method", "clamp", "shape", "nan scale",
        "fdg padding", "fdg levels", "2-d input", "fdg nan scale 3 levels", "fdg scale shape",
        "fdg inf weight", "fdg rescale length", "fdg scalar scales"])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("method", ["fft_box", "bilinear"])
def test_large_planes_take_the_direct_route(method):
    """H + W > MATRIX_MAX_SIDE_SUM (e.g. Flux's packed [1, 4096, 64] tokens): torch.fft / interpolate."""
    shape = (2, 300, 260)
    assert sum(shape[-2:]) > frequency.MATRIX_MAX_SIDE_SUM
    c, u = pair(shape)
    frequency._cache.clear()
    if method == "fft_box":
        out = fastguide.frequency_cfg(c, u, 2.0, 6.0, cutoff=20)
        d = (c - u).double()
        low = fresca_fourier_filter(d, 1.0, 0.0, 20)
    else:
        out = fastguide.frequency_cfg(c, u, 2.0, 6.0, method="bilinear", size=(150, 130))
        d = (c - u).double()
        planes = d.reshape(-1, 1, 300, 260)
        low = F.interpolate(F.interpolate(planes, size=(150, 130), mode="bilinear"), size=(300, 260),
                            mode="bilinear").view(shape)
    ref = u.double() + 2.0 * low + 6.0 * (d - low)
    assert rel_err(out, ref) <= 1e-6
    assert not any(k[0] in METHODS_WITH_MATRICES for k in frequency._cache)  # no 300x300 operator was built
    low_split, high_split = fastguide.frequency_split(c, method=method, cutoff=20, size=(150, 130))
    torch.testing.assert_close(low_split + high_split, c)


METHODS_WITH_MATRICES = ("fft_box", "bilinear", "laplacian")


@pytest.mark.parametrize("levels", [2, 3])
def test_fdg_tensor_scales_per_sample_without_host_sync(levels, monkeypatch):
    """A [B] or 0-d tensor scale per level equals the float-scale result sample by sample, on the fused
    2-level path and the explicit pyramid alike, and is never read on the host."""
    c, u = pair((2, 4, 16, 16))
    floats = [[7.0, 3.0, 2.0][:levels], [4.0, 1.5, 1.0][:levels]]  # per sample
    scales = [torch.tensor([floats[0][i], floats[1][i]]) for i in range(levels)]
    scales[-1] = torch.tensor(floats[0][-1])  # the lowest band shared: a 0-d tensor
    floats[1][-1] = floats[0][-1]
    expected = [fastguide.fdg(c[b:b + 1], u[b:b + 1], floats[b], parallel_weights=0.7 if levels == 3 else None)
                for b in range(2)]

    def no_sync(*args):
        raise AssertionError("a scale tensor was read on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__float__", no_sync)
    out = fastguide.fdg(c, u, scales, parallel_weights=0.7 if levels == 3 else None)
    monkeypatch.undo()
    torch.testing.assert_close(out, torch.cat(expected))


def test_operator_cache_is_thread_safe():
    """Samplers run in threads: concurrent lookups with evictions (more keys than the cache holds)."""
    import threading

    frequency._cache.clear()
    errors = []

    def worker(seed):
        try:
            for i in range(300):
                n = 4 + (seed * 7 + i * 13) % (frequency._CACHE_SIZE + 20)
                ah, aw = frequency.operators("bilinear", n, n, 2, 2, "cpu", torch.float32)
                assert ah.shape == (1, n, n)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(frequency._cache) <= frequency._CACHE_SIZE
