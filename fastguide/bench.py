"""`fastguide bench`: each op against its peers and the memory floor, on the current device.

Columns (median time per call, microseconds):
    fastguide   the fused op
    diffusers   the diffusers guider doing the same job (its `forward(...).pred`)
    eager       the same math in plain PyTorch (fastguide/_eager.py, fp32 arithmetic)
    compile     that math under torch.compile (dynamic=False, default inductor mode)
    floor       a memcpy moving the bytes the op must move: each input read once, the output
                written once (a copy of (read + written) / 2 bytes moves that much traffic)
%floor = floor / fastguide (100% = at the memory floor); xdiff = diffusers / fastguide.
"""
import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _eager, ops

SHAPES = {
    "sdxl": (2, 4, 128, 128),
    "sd15": (2, 4, 64, 64),
    "flux": (1, 4096, 64),
    "sd3": (2, 16, 128, 128),
    "video": (1, 16, 21, 60, 104),
}
DEFAULT_SHAPES = ("sdxl", "flux", "video")
QUICK_SHAPES = ("sdxl",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("fastguide", "diffusers", "eager", "compile", "floor")


@dataclass
class Case:
    """One benchmarked job: its full-size inputs, the full-size tensors it must move, and each implementation.

    Each implementation is a builder `(inputs) -> callable` run once per shape, so that state
    (momentum buffers, guider objects) is set up outside the timed call.
    """
    name: str
    n_inputs: int
    fastguide: Callable
    eager: Callable
    diffusers: Optional[Callable]  # None: no diffusers peer for this job
    traffic: int = 0  # full-size tensors read + written at the least; default: inputs read, one output written

    def bytes_moved(self, numel, element_size):
        """Bytes the op must move at the least (the floor): every input read once, the outputs written once."""
        return (self.traffic or self.n_inputs + 1) * numel * element_size


def _diffusers_guider(kind, **kw):
    from diffusers.guiders import (ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
                                   PerturbedAttentionGuidance)
    if kind == "cfg":
        g = ClassifierFreeGuidance(**kw)
    elif kind == "cfg_zero_star":
        g = ClassifierFreeZeroStarGuidance(zero_init_steps=0, **kw)
    else:
        g = PerturbedAttentionGuidance(perturbed_guidance_layers=[0], perturbed_guidance_start=0.0,
                                       perturbed_guidance_stop=1.0, **kw)
    g.set_state(step=1, num_inference_steps=10, timestep=None)
    return g


def _guider_call(kind, **kw):
    def build(inputs):
        g = _diffusers_guider(kind, **kw)
        return lambda: g.forward(*inputs).pred
    return build


def _call(fn):
    return lambda inputs: (lambda: fn(*inputs))


def _apg_fastguide(inputs):
    buf = ops.MomentumBuffer(-0.5)
    return lambda: ops.apg(*inputs, 7.5, momentum_buffer=buf, norm_threshold=15.0)


def _apg_eager(inputs):
    buf = torch.zeros_like(inputs[0])
    K = inputs[0][0].numel()
    return lambda: _eager.apg(*inputs, None, 7.5, 1.0, 15.0, -0.5, buf, K, False)


def _apg_diffusers(inputs):
    from diffusers.guiders import AdaptiveProjectedGuidance
    g = AdaptiveProjectedGuidance(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5,
                                  adaptive_projected_guidance_rescale=15.0)
    g.set_state(step=0, num_inference_steps=10, timestep=None)
    g.prepare_inputs({})  # creates its momentum buffer
    return lambda: g.forward(*inputs).pred


CASES = {
    "cfg": Case("cfg", 2, _call(lambda c, u: ops.cfg(c, u, 7.5)),
                _call(lambda c, u: _eager.cfg(c, u, None, 7.5, 0.0, False)),
                _guider_call("cfg", guidance_scale=7.5)),
    "cfg_rescale": Case("cfg_rescale", 2, _call(lambda c, u: ops.cfg(c, u, 7.5, rescale=0.7)),
                        _call(lambda c, u: _eager.cfg(c, u, None, 7.5, 0.7, False)),
                        _guider_call("cfg", guidance_scale=7.5, guidance_rescale=0.7)),
    "pag": Case("pag", 3, _call(lambda c, u, p: ops.pag(c, u, p, 7.5, 3.0)),
                _call(lambda c, u, p: _eager.pag(c, u, p, None, 7.5, None, 3.0, 0.0, False)),
                _guider_call("pag", guidance_scale=7.5, perturbed_guidance_scale=3.0)),
    "cfg_zero_star": Case("cfg_zero_star", 2, _call(lambda c, u: ops.cfg_zero_star(c, u, 7.5)),
                          _call(lambda c, u: _eager.cfg_zero_star(c, u, None, 7.5, 0.0, False)),
                          _guider_call("cfg_zero_star", guidance_scale=7.5)),
    # APG with momentum and norm clamp: reads cond, uncond, buffer; writes buffer and output.
    "apg": Case("apg", 2, _apg_fastguide, _apg_eager, _apg_diffusers, traffic=5),
    # cos(cond, guided) and friends for Adaptive Guidance: reads three tensors, writes a few floats.
    "stats": Case("stats", 3, _call(lambda c, u, g: ops.guidance_stats(c, u, g)),
                  _call(lambda c, u, g: _eager.guidance_stats(c, u, g, c[0].numel())), None, traffic=3),
}


def median_us(fn, device, min_run_time):
    """Median microseconds per call (torch.utils.benchmark: warm-up, CUDA sync, blocked repetitions)."""
    from torch.utils.benchmark import Timer
    fn()  # warm-up (and compile, for the compiled peer)
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e6, m.iqr * 1e6


def _revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def environment(device):
    try:
        import diffusers
        dv = diffusers.__version__
    except ImportError:
        dv = "not installed"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} " \
                                                                      f"({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": tv, "diffusers": dv,
            "fastguide_rev": _revision(), "date": datetime.date.today().isoformat()}


def run_bench(case_names, shape_names, dtype_names, device, impls=IMPLS, min_run_time=0.2, progress=None):
    rows = []
    for dname in dtype_names:
        dtype = DTYPES[dname]
        for sname in shape_names:
            shape = SHAPES[sname]
            for cname in case_names:
                case = CASES[cname]
                inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(case.n_inputs)]
                numel = inputs[0].numel()
                nbytes = case.bytes_moved(numel, inputs[0].element_size())
                src = torch.randn(nbytes // 2 // inputs[0].element_size(), device=device, dtype=dtype)
                dst = torch.empty_like(src)
                fns = {
                    "fastguide": case.fastguide(inputs),
                    "diffusers": case.diffusers(inputs) if case.diffusers else None,
                    "eager": case.eager(inputs),
                    "compile": torch.compile(case.eager(inputs), dynamic=False),
                    "floor": lambda: dst.copy_(src),
                }
                row = {"op": cname, "shape": sname, "dims": "x".join(map(str, shape)), "dtype": dname,
                       "bytes": nbytes}
                for impl in impls:
                    if fns[impl] is None:
                        row[f"{impl}_us"] = row[f"{impl}_iqr_us"] = float("nan")
                        continue
                    if progress:
                        progress(f"{dname} {sname} {cname} {impl}")
                    med, iqr = median_us(fns[impl], device, min_run_time)
                    row[f"{impl}_us"], row[f"{impl}_iqr_us"] = med, iqr
                if "fastguide" in impls:
                    t = row["fastguide_us"]
                    row["fastguide_GBps"] = nbytes / (t * 1e-6) / 1e9
                    if "floor" in impls:
                        row["pct_floor"] = 100.0 * row["floor_us"] / t
                    for peer in ("diffusers", "eager", "compile"):
                        if peer in impls and row[f"{peer}_us"] == row[f"{peer}_us"]:  # not NaN
                            row[f"x_{peer}"] = row[f"{peer}_us"] / t
                rows.append(row)
    return rows


def format_table(rows, impls):
    head = ["op", "shape", "dtype"] + [f"{i} us" for i in impls] + ["%floor", "xdiff", "xeager", "xcompile"]
    lines = []
    for r in rows:
        cells = [r["op"], r["shape"], r["dtype"]] + [f"{r[f'{i}_us']:.1f}" for i in impls]
        cells += [f"{r['pct_floor']:.0f}%" if "pct_floor" in r else "-"]
        cells += [f"{r[k]:.1f}x" if k in r else "-" for k in ("x_diffusers", "x_eager", "x_compile")]
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastguide bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(CASES), help=f"comma list from {','.join(CASES)}")
    p.add_argument("--shapes", default=None, help=f"comma list from {','.join(SHAPES)} "
                   f"(default {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtype", default="fp32", help="comma list from fp32,fp16,bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--quick", action="store_true", help="SDXL shape only, shorter timing: under a minute on CPU")
    p.add_argument("--csv", default=None, help="also write the rows (with versions and device) to this CSV")
    a = p.parse_args(argv)

    def pick(text, known, what):
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in known]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {list(known)}")
        return names

    shapes = pick(a.shapes or ",".join(QUICK_SHAPES if a.quick else DEFAULT_SHAPES), SHAPES, "shape")
    impls = pick(a.impls, IMPLS, "implementation")
    device = torch.device(a.device)
    env = environment(device)
    print("fastguide bench: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print("backends: " + ", ".join(f"{k}={v}" for k, v in ops.backends()["cfg"].items()))
    rows = run_bench(pick(a.ops, CASES, "op"), shapes, pick(a.dtype, DTYPES, "dtype"), device, impls,
                     min_run_time=0.05 if a.quick else 0.2,
                     progress=lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
    print(format_table(rows, impls))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(env) + list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({**env, **r})
        print(f"wrote {a.csv}")
    return 0
