"""Ahead-of-time compile check of every Triton specialisation fastguide launches, without a GPU.

    python bench/aot.py [--subset ci | --full] [--arch 80,90] [--jobs N]

For a fixed set of realistic shapes (SD1.5, SDXL, SD3, Flux packed tokens, a video latent, the
frequency planes the matrix route takes), each launcher's `_plan_*` function is run on `meta` tensors
(nothing is allocated) and yields the exact launches the real call would make: kernel, argument
types and divisibility (through Triton's own binder), constexprs, num_warps, num_stages, grid.
Each distinct specialisation is compiled with `triton.compile` for sm_80 and sm_90 (the wheel's
ptxas), and the script fails (exit code 1) on a compile error, any register spill, shared memory over
the target's per-block limit, or a grid over CUDA's limits. It prints one row per (case, kernel,
arch): registers, spill bytes (stores + loads), shared memory, widest global load/store vector from
the PTX, grid. Shape-only grid checks on tensors too large to allocate (a [1, 16, 128, 256, 256] video
latent, [1, 3, 8192, 8192], 2^31 + elements) run on every subset.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

# Triton 3.9's default (FMA fusion on), set to silence its warning that the default will change in 3.10.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Max dynamic shared memory per block (bytes): sm_80 163 KiB, sm_90 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

MODELS = {  # name -> [B, ...] latent of one prediction
    "sd15": (2, 4, 64, 64),
    "sdxl": (2, 4, 128, 128),
    "sd3": (2, 16, 128, 128),
    "flux": (1, 4096, 64),
    "video": (1, 16, 21, 60, 104),
}
# Frequency planes: SD1.5 / SDXL / 256^2 latents, the video frame, the matrix route's extremes
# (H + W = 512: square, tall, wide), a 2-D [B, N] input (per-row scales), the Laplacian (FDG) operator.
FREQ_PLANES = {
    "64x64": (2, 4, 64, 64), "128x128": (2, 4, 128, 128), "256x256": (2, 4, 256, 256), "60x104": (1, 16, 21, 60, 104),
    "496x16": (1, 4, 496, 16), "16x496": (1, 4, 16, 496), "2x510": (1, 4, 2, 510), "255x257": (1, 2, 255, 257),
    "2d-2x300": (2, 300),
}


def plane_classes(dtype):
    """One (H, W) per distinct frequency-kernel specialisation on the matrix route (H, W >= 2, H + W <= 512):
    the tiles (BM, BN, BK, num_warps, num_stages), whether H and W are multiples of 16 (Triton specialises
    on it), the grid layout (_col_axis) and, on the 2-D grid, whether the plane has a single column tile (the
    col_tiles argument equal to 1 becomes a constant)."""
    from fastguide.kernels import frequency as f
    seen = {}
    for H in range(2, 511):
        for W in range(2, 513 - H):
            tiles = f._tiles(H, W, dtype)
            col_axis = f._col_axis(H, W, tiles[0], tiles[1])
            one_col = not col_axis and -(-W // tiles[1]) == 1
            seen.setdefault((tiles, H % 16 == 0, W % 16 == 0, col_axis, one_col), (H, W))
    return sorted(seen.values())


# Shape-only grid checks: sizes where a [B, cdiv(N, 2048)] grid would pass CUDA's 65535 cap on axis y.
HUGE = {"video-256": (1, 16, 128, 256, 256), "img-8192": (1, 3, 8192, 8192), "2^31+": (2, 3, 2**15, 2**15 + 16)}


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def scale_t(B):
    return torch.empty((B,), dtype=torch.float32, device="meta")


def guidance_cases(shape, dtype):
    from fastguide.kernels import guidance as g
    c, u, p = (meta(shape, dtype) for _ in range(3))
    out = meta(shape, dtype)
    st = scale_t(shape[0])
    yield "cfg", g._plan_guide(c, u, None, out, st, 0.0, None, 0.0, 0.0, False, False)
    yield "cfg+rescale", g._plan_guide(c, u, None, out, None, 7.5, None, 0.0, 0.7, False, False)
    yield "pag+rescale", g._plan_guide(c, u, p, out, st, 0.0, st, 0.0, 0.7, True, False)
    yield "cfg_zero_star", g._plan_guide(c, u, None, out, st, 0.0, None, 0.0, 0.0, False, True)
    yield "cfg_momentum", g._plan_guide(c, u, None, out, None, 3.5, None, 0.0, 0.0, False, False, buf=p, momentum=-0.5)


def apg_cases(shape, dtype):
    from fastguide.kernels import apg as a
    c, u, buf, out = (meta(shape, dtype) for _ in range(4))
    per_sample = c.numel() // shape[0]
    groups = {"K=sample": per_sample, f"K={shape[-1]}": shape[-1]}
    for name, K in groups.items():
        yield f"apg {name}", a._plan_apg(c, u, buf, out, scale_t(shape[0]), 0.0, 0.0, 15.0, -0.5, K, False)
        yield f"apg nomom {name}", a._plan_apg(c, u, None, out, None, 7.5, 1.0, 0.0, 0.0, K, True)
        res = torch.empty((c.numel() // K, 7), device="meta")
        yield f"stats {name}", a._plan_stats(c, u, meta(shape, dtype), res, K)


def cfgpp_cases(shape, dtype):
    from fastguide.kernels import cfgpp as k
    x, c, u, out = (meta(shape, dtype) for _ in range(4))
    yield "cfgpp", k._plan_cfgpp(x, c, u, out, 1.0, -0.5, 0.3, scale_t(shape[0]), 0.0)


def multibranch_cases(shape, dtype):
    """lincomb (K = 2..4, per-sample weight tensor or floats), diff_stats, the channel kernels (CFGNorm, Mahiro)
    and guide_weights (each method)."""
    from fastguide import ops
    from fastguide.kernels import channel as ch
    from fastguide.kernels import lincomb as lc
    preds = [meta(shape, dtype) for _ in range(4)]
    out = meta(shape, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for K in (2, 3, 4):
        w = torch.empty((shape[0], K), dtype=acc, device="meta")
        yield f"lincomb K={K}", lc._plan_lincomb(preds[:K], out, w, [])
    yield "lincomb K=3 floats", lc._plan_lincomb(preds[:3], out, None, [1.0, -6.5, 7.5])
    K = preds[0].numel() // shape[0]
    yield "diff_stats", lc._plan_dstats(*preds[:3], torch.empty((shape[0], 3), dtype=acc, device="meta"), K)
    yield "cfg_norm", ch._plan_cfg_norm(preds[0], preds[1], out, scale_t(shape[0]), 0.0, 1.0)
    yield "mahiro_sim", ch._plan_mahiro(preds[0], preds[1], torch.empty((shape[0],), dtype=acc, device="meta"),
                                        None, 5.0)
    from fastguide.kernels import weights as wk
    for name, m in ops.WEIGHT_METHODS.items():  # the coefficients between the stats pass and the combine
        stats = torch.empty((shape[0],) if name.startswith("mahiro") else (shape[0], 7), dtype=acc, device="meta")
        w = torch.empty((shape[0], wk.COLS[m]), dtype=acc, device="meta")
        yield f"guide_weights {name}", wk._plan_weights(stats, w, m, scale_t(shape[0]), 0.0, None, -1.5, 8.0)


def frequency_cases(shape, dtype, nterms=(1, 2)):
    from fastguide.kernels import frequency as f
    H, W = shape[-2:]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c, u, out = (meta(shape, dtype) for _ in range(3))
    for t in nterms:
        ah, aw = meta((t, H, H), acc), meta((t, W, W), acc)
        yield f"frequency_cfg T={t}", f._plan(c, u, ah, aw, out, scale_t(shape[0]), 0.0, None, 1.25, False, False)
    yield f"frequency_split T={nterms[-1]}", f._plan(c, None, ah, aw, out, None, 0.0, None, 0.0, False, True)


def cases(subset):
    """(case name, shape, dtype, list of Launch) for the subset: 'ci' or 'full'.

    ci: the elementwise / reduction families in fp32 on SDXL (APG and stats also on Flux's K = 64
    groups) and fp64 (its own fp64 sums and scalars); fp16 / bf16 only change the loads and stores.
    The frequency kernel on the planes with the largest register footprint (two FFT-box terms,
    fp32 and fp64; an unaligned width; the tall, wide and 2-D extremes of the matrix route).
    """
    full = subset == "full"
    if full:
        elementwise = [(m, s, dt) for m, s in MODELS.items() for dt in ALL_DTYPES]
    else:
        elementwise = [("sdxl", MODELS["sdxl"], torch.float32), ("flux", MODELS["flux"], torch.float32),
                       ("sdxl", MODELS["sdxl"], torch.float64)]
    for model, shape, dt in elementwise:
        for gen in (guidance_cases, apg_cases, cfgpp_cases, multibranch_cases):
            for name, plans in gen(shape, dt):
                if full or model == "sdxl" or name.startswith(("apg K=64", "stats K=64")):
                    yield f"{name} {model}", shape, dt, plans
    if full:
        freq = [(p, s, dt, (1, 2)) for p, s in FREQ_PLANES.items() for dt in ALL_DTYPES]
    else:
        freq = [(p, FREQ_PLANES[p], dt, (2,)) for p in ("256x256", "60x104") for dt in (torch.float32, torch.float64)]
        freq += [(p, FREQ_PLANES[p], torch.float32, (2,)) for p in ("16x496", "496x16", "2d-2x300")]
    if full:  # and one plane of every other specialisation the matrix route can produce
        freq += [(f"sweep {H}x{W}", (2, 3, H, W), dt, (1, 2)) for dt in ALL_DTYPES for H, W in plane_classes(dt)]
    for plane, shape, dt, nterms in freq:
        for name, plans in frequency_cases(shape, dt, nterms):
            if full or name.startswith("frequency_cfg"):
                yield f"{name} {plane}", shape, dt, plans


def huge_grid_checks():
    """Plans for tensors too large to allocate (meta only): the grid check runs in Launch itself."""
    rows = []
    for name, shape in HUGE.items():
        for dt in (torch.float32, torch.bfloat16):
            for gen in (guidance_cases, apg_cases, cfgpp_cases, multibranch_cases):
                for case, plans in gen(shape, dt):
                    rows += [(f"{case} {name}", shape, dt, p) for p in plans]
    return rows


def specialisation(launch, arch):
    """(signature, constexprs, attrs, options) exactly as triton's JIT launcher derives them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = k._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, {"num_warps": launch.num_warps, "num_stages": launch.num_stages}


def _compile(job):
    """Worker: compile one specialisation for one arch; returns its resources or the error."""
    module, name, signature, constexprs, attrs, options, arch = job
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    knobs.nvidia.dump_ptxas_log = True   # ptxas -v output (registers, spills), printed by triton
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options)
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    vec = [int(v) * int(b) for v, b in re.findall(r"(?:ld|st)\.global[\w.:]*?\.v(\d)\.[bfu](\d+)", ck.asm["ptx"])]
    return {"regs": int(regs.group(1)) if regs else -1,
            "spills": int(spills.group(1)) + int(spills.group(2)) if spills else -1,
            "shared": ck.metadata.shared, "vec_bits": max(vec, default=0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--subset", choices=("ci", "full"), default="ci")
    g.add_argument("--full", action="store_const", const="full", dest="subset")
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--match", default="", help="only the cases whose name matches this regular expression")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    t0 = time.time()
    failures = []

    try:
        huge = huge_grid_checks()
    except ValueError as exc:  # raised by Launch for a grid over CUDA's limits
        huge = []
        failures.append(f"grid: {exc}")
    print(f"grid check, shapes only: {len(huge)} launches")
    widest = {}
    for case, shape, dt, p in huge:
        key = (case.rsplit(" ", 1)[1], p.kernel.__name__)
        widest[key] = max(widest.get(key, (0,)), p.grid)
    for (name, kernel), grid in sorted(widest.items()):
        print(f"  {name:10s} {kernel:14s} grid {grid}")

    jobs, rows = {}, []
    for case, shape, dt, plans in cases(args.subset):
        if not re.search(args.match, f"{case} {DT[dt]}"):
            continue
        for p in plans:
            for arch in archs:
                sig, const, attrs, opts = specialisation(p, arch)
                key = (p.kernel.fn.__module__, p.kernel.__name__, tuple(sorted(sig.items())),
                       repr(sorted(const.items())), repr(sorted(attrs.items())), tuple(sorted(opts.items())), arch)
                jobs.setdefault(key, (p.kernel.fn.__module__, p.kernel.__name__, sig, const, attrs, opts, arch))
                rows.append((case, shape, dt, p, arch, key))
    keys = list(jobs)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(keys, pool.map(_compile, [jobs[k] for k in keys])))

    print(f"\n{len(rows)} launches, {len(keys)} distinct specialisations compiled in {time.time() - t0:.0f} s")
    head = f"{'case':34s} {'dtype':5s} {'kernel':14s} {'sm':>3s} {'warps/st':>8s} {'regs':>4s} {'spill':>5s} " \
           f"{'shared':>7s} {'vec':>4s}  grid"
    print(head)
    print("-" * len(head))
    seen, failing = set(), {}
    for case, shape, dt, p, arch, key in rows:
        r = results[key]
        bad = []
        if "error" in r:
            bad.append(r["error"])
        else:
            if r["spills"] != 0:
                bad.append(f"spills {r['spills']} B")
            if r["shared"] > SHARED_LIMIT[arch]:
                bad.append(f"shared {r['shared']} B > {SHARED_LIMIT[arch]}")
        line = (f"{case:34s} {DT[dt]:5s} {p.kernel.__name__:14s} {arch:3d} {p.num_warps:>4d}/{p.num_stages:<3d} "
                + (f"{'-':>4s} {'-':>5s} {'-':>7s} {'-':>4s}" if "error" in r else
                   f"{r['regs']:4d} {r['spills']:5d} {r['shared']:7d} {r['vec_bits']:4d}") + f"  {p.grid}")
        if line not in seen:
            seen.add(line)
            print(line + ("   FAIL: " + "; ".join(bad) if bad else ""))
        if bad:
            failures.append(f"{case} {DT[dt]} {p.kernel.__name__} sm_{arch}: {'; '.join(bad)}")
            failing[arch] = failing.get(arch, 0) + 1
    for arch in archs:  # per arch: distinct specialisations, how many spill, fail to compile, or exceed shared memory
        res = [results[k] for k in keys if k[-1] == arch]
        print(f"sm_{arch}: {len(res)} specialisations, {sum(r.get('spills', 0) != 0 for r in res)} spilling, "
              f"{sum('error' in r for r in res)} compile errors, "
              f"{sum(r.get('shared', 0) > SHARED_LIMIT[arch] for r in res)} over shared memory, "
              f"{failing.get(arch, 0)} failing launches")
    print(f"\n{len(failures)} failures, {time.time() - t0:.0f} s")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
