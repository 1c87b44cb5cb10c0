"""`fastguide bench`: each op against its peers and the memory floor, on the current device.

Columns (median time per call, microseconds; `--csv` adds the spread as IQR):
    fastguide   the fused op
    diffusers   the diffusers guider doing the same job (its `forward(...).pred`)
    upstream    the peer's own eager math where it is not a diffusers guider: the ComfyUI node (Mahiro,
                CFGNorm, RenormCFG, Perp-Neg, dual CFG, the CFG++ samplers), RLG's paper formula
    eager       the same math in plain PyTorch (fastguide/_eager.py, fp32 arithmetic)
    compile     that math under torch.compile (dynamic=False, default inductor mode)
    floor       a memcpy moving the bytes the op must move: each full-size input read once, each
                full-size output written once (a copy of (read + written) / 2 bytes moves that much)
%floor = floor / fastguide (100% = at the memory floor); GB/s = the op's minimum bytes / its time;
x<peer> = peer / fastguide (xup: upstream); launches = kernels per call (CUDA: profiler kernel events; CPU: top-level
operator calls, where torch.compile's fused C++ kernels are not visible, so its count reads low).

Timing: warm-up, then torch.utils.benchmark blocked repetitions (CPU) or CUDA events around each call
(CUDA), median; inputs rotate over enough fresh random sets (never zeros) to spill the last-level
cache, so caches do not flatter any implementation.
"""
import argparse
import collections
import csv
import datetime
import importlib
import itertools
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _eager, frequency, methods, ops

SHAPES = {
    "sdxl": (2, 4, 128, 128),
    "sd15": (2, 4, 64, 64),
    "flux": (1, 4096, 64),
    "sd3": (2, 16, 128, 128),
    "video": (1, 16, 21, 60, 104),
}
# The size sweep: 2^14 .. 2^26 elements as [2, n/2].
SWEEP = {f"2^{k}": (2, 2 ** (k - 1)) for k in range(14, 27, 2)}
ALL_SHAPES = {**SHAPES, **SWEEP}
DEFAULT_SHAPES = ("sdxl", "flux", "video")  # `--shapes all`: every named shape and the size sweep
QUICK_SHAPES = ("sdxl",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("fastguide", "diffusers", "upstream", "eager", "compile", "floor")
ROTATE_BYTES = 128 << 20  # rotate inputs over at least this many bytes (> last-level cache)


@dataclass
class Case:
    """One benchmarked job: its full-size inputs, the full-size tensors it must move, and each implementation.

    `fastguide` and `diffusers` are builders `(sets) -> callable` run once per shape, so that state
    (momentum buffers, guider objects) is set up outside the timed call; the callable takes the next
    input set on each call. `math` is a builder `(sets) -> fn(*inputs)`: the same math in plain
    PyTorch, timed eager and under torch.compile.
    """
    name: str
    n_inputs: int
    fastguide: Callable
    math: Callable
    diffusers: Optional[Callable]  # None: no diffusers peer for this job
    traffic: int = 0  # full-size tensors read + written at the least; default: inputs read, one output written
    applies: Callable = lambda shape: True  # noqa: E731 - shapes the job is defined for
    # The peer's own eager math where it is not a diffusers guider (ComfyUI's node; RLG: its paper's formula),
    # a builder `(sets) -> fn(*inputs)` like `math`; None: no such peer.
    upstream: Optional[Callable] = None
    diffusers_applies: Callable = lambda shape: True  # noqa: E731 - shapes the diffusers peer runs on

    def bytes_moved(self, numel, element_size):
        """Bytes the op must move at the least (the floor): every input read once, the outputs written once."""
        return (self.traffic or self.n_inputs + 1) * numel * element_size


def _cycled(fn, sets):
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def _pure(fn):
    return lambda sets: fn


# Settings that make a diffusers guider time its combine on every call (no zero-init step, PAG on every
# step with a layer to name); the class itself comes from the method registry (`Method.twin`).
_PEER_SETTINGS = {"cfg_zero_star": dict(zero_init_steps=0),
                  "pag": dict(perturbed_guidance_layers=[0], perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)}


def _diffusers_guider(kind, **kw):
    from diffusers import guiders

    method = methods.get(kind, "fastguide bench")
    if method.twin is None:
        raise ValueError(f"fastguide bench: {kind!r} has no diffusers peer guider")
    g = getattr(guiders, method.twin)(**_PEER_SETTINGS.get(kind, {}), **kw)
    g.set_state(step=0, num_inference_steps=10, timestep=None)
    g.prepare_inputs({})  # APG creates its momentum buffer at step 0
    g.set_state(step=1, num_inference_steps=10, timestep=None)
    return g


def _guider(kind, **kw):
    def build(sets):
        g = _diffusers_guider(kind, **kw)
        return _cycled(lambda *xs: g.forward(*xs).pred, sets)
    return build


def _fastguide(fn):
    return lambda sets: _cycled(fn, sets)


def _apg_fastguide(sets):
    buf = ops.MomentumBuffer(-0.5)
    return _cycled(lambda c, u: ops.apg(c, u, 7.5, momentum_buffer=buf, norm_threshold=15.0), sets)


def _apg_math(sets):
    buf, K = torch.zeros_like(sets[0][0]), sets[0][0][0].numel()
    return lambda c, u: _eager.apg(c, u, None, 7.5, 1.0, 15.0, -0.5, buf, K, False)


def _fresca_math(sets):
    """ComfyUI's FreSca node + CFG, the peer: torch.fft round trip with a box mask (fp32)."""
    def run(c, u):
        d = (c - u).float()
        xf = torch.fft.fftshift(torch.fft.fftn(d, dim=(-2, -1)), dim=(-2, -1))
        H, W = xf.shape[-2:]
        mask = torch.full(xf.shape, 7.5 * 1.25, device=xf.device)
        mask[..., H // 2 - 16:H // 2 + 16, W // 2 - 16:W // 2 + 16] = 7.5
        return (u + torch.fft.ifftn(torch.fft.ifftshift(xf * mask, dim=(-2, -1)), dim=(-2, -1)).real).to(c.dtype)
    return run


def _frecas_math(sets):
    """FreCaS facfg: bilinear down to half size and back per prediction, CFG per band."""
    import torch.nn.functional as F

    def bands(x):
        planes = x.reshape(-1, 1, *x.shape[-2:])
        low = F.interpolate(F.interpolate(planes, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear"),
                            size=x.shape[-2:], mode="bilinear").view(x.shape)
        return x - low, low
    return lambda c, u: sum(ub + w * (cb - ub) for ub, cb, w in zip(bands(u), bands(c), (9.0, 5.0)))


def _fdg_math(sets):
    from .frequency import _fdg_explicit
    return lambda c, u: _fdg_explicit(c, u, [10.0, 5.0], [1.0, 1.0], [0.0, 0.0], "data", False)


def _fdg_diffusers(sets):
    from diffusers.guiders import FrequencyDecoupledGuidance
    g = FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0])
    return _cycled(lambda c, u: g.forward(c, u).pred, sets)


def _fdg_applies(shape):
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    return len(shape) == 4 and (pow2(shape[2]) or pow2(shape[3])) and shape[2] % 2 == 0 and shape[3] % 2 == 0


# --- the methods added in session 4: diffusers 0.42 guiders (twins in fastguide.diffusers) -----------------
def _mag_math(sets):
    """MAMBO-G in plain PyTorch (diffusers' mambo_guidance with vector norms, so it runs on any rank)."""
    def run(c, u):
        d = c - u
        dims = tuple(range(1, c.dim()))
        norm = lambda x: torch.linalg.vector_norm(x, dim=dims, keepdim=True)  # noqa: E731
        ratio = norm(d) / norm(u)
        return u + (1.0 + (7.5 - 1.0) * torch.exp(-8.0 * ratio)) * d
    return run


def _tcfg_math(sets):
    """TCFG in plain PyTorch as fastguide computes it (2 x 2 Gram matrix per sample, its SVD, one combine)."""
    def run(c, u):
        cf, uf = c.flatten(1).double(), u.flatten(1).double()
        cu, uu = (cf * uf).sum(1), (uf * uf).sum(1)
        gram = torch.stack([torch.stack([(cf * cf).sum(1), cu], -1), torch.stack([cu, uu], -1)], -2)
        U, S, _ = torch.linalg.svd(gram)
        k = (U[:, 0, 0] * cu + U[:, 1, 0] * uu) / S[:, 0]
        shape = (-1,) + (1,) * (c.dim() - 1)
        a, b = (7.5 + (1 - 7.5) * k * U[:, 0, 0]).float().view(shape), ((1 - 7.5) * k * U[:, 1, 0]).float().view(shape)
        return a * c + b * u
    return run


# AdaptiveProjectedMixGuidance (HunyuanImage 2.1): guidance_scale 3.5 for the first steps, then APG with scale 10,
# momentum -0.5, norm threshold 10, eta 0 (diffusers' defaults). "apg_mix": a step in the APG phase (the steady
# state); "apg_mix_cfg": a step in the CFG phase, where the momentum follows cond - uncond (CFG + buffer update).
_APG_MIX = dict(guidance_scale=3.5, adaptive_projected_guidance_scale=10.0, adaptive_projected_guidance_momentum=-0.5,
                adaptive_projected_guidance_rescale=10.0, eta=0.0)


def _apg_mix_fastguide(apg_on):
    def build(sets):
        buf = ops.MomentumBuffer(-0.5)
        return _cycled(lambda c, u: methods.apg_mix(c, u, 3.5, 10.0, apg_on, eta=0.0, norm_threshold=10.0,
                                                    momentum_buffer=buf), sets)
    return build


def _apg_mix_math(sets):
    buf, K = torch.zeros_like(sets[0][0]), sets[0][0][0].numel()
    return lambda c, u: _eager.apg(c, u, None, 10.0, 0.0, 10.0, -0.5, buf, K, False)


def _apg_mix_cfg_math(sets):
    buf = torch.zeros_like(sets[0][0])

    def run(c, u):
        buf.mul_(-0.5).add_(c - u)
        return _eager.cfg(c, u, None, 3.5, 0.0, False)
    return run


def _ltx2_fastguide(sets):
    return _cycled(lambda c, u, p: methods.ltx2(c, [(3.0, u), (1.0, p)]), sets)


# --- ComfyUI's methods: the node's eager math is the peer ("upstream" column), transcribed compactly ------------
def _comfy_cfg(c, u, s):
    """comfy/samplers.py cfg_function without model options."""
    return u + (c - u) * s


def _dual_cfg_upstream(sets):
    """comfy_extras/nodes_custom_sampler.py Guider_DualCFG.predict_noise, regular style
    (out = [negative, middle, positive], cfg1 = 7.5, cfg2 = 1.5)."""
    return _pure(lambda c, m, u: _comfy_cfg(m, u, 1.5) + (c - m) * 7.5)(sets)


def _perp_neg_upstream(sets):
    """comfy_extras/nodes_perpneg.py perp_neg (the projection sums over the whole batch), then CFG."""
    def run(c, u, e):
        pos, neg = c - e, u - e
        perp = neg - (torch.mul(neg, pos).sum() / torch.norm(pos) ** 2) * pos
        return e + 7.5 * (pos - perp * 1.0)
    return run


def _perp_neg_math(sets):
    K = sets[0][0][0].numel()

    def run(c, u, e):
        st = _eager.diff_stats(e, c, u, K).sum(0)  # <P, N>, |P|^2, |N|^2 over the batch
        alpha = torch.where(st[1] > 0, st[0] / st[1], 0.0)
        one = torch.ones_like(alpha)
        return _eager.lincomb([e, c, u], torch.stack([one, 7.5 * (1 + alpha), -7.5 * one]), [])
    return run


def _rlg_upstream(sets):
    """RLG as its paper writes it (Jin et al. 2025; no ComfyUI node): CFG on each model, g_ref + w (g_rl - g_ref)."""
    def run(c, u, rc, ru):
        g_rl, g_ref = _comfy_cfg(c, u, 7.5), _comfy_cfg(rc, ru, 7.5)
        return g_ref + 1.5 * (g_rl - g_ref)
    return run


def _cfg_norm_upstream(sets):
    """comfy_extras/nodes_cfg.py CFGNorm's post-CFG function on cfg_function's result (strength 1)."""
    def run(c, u):
        g = _comfy_cfg(c, u, 7.5)
        scale = (torch.norm(c, dim=1, keepdim=True) / (torch.norm(g, dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
        return g * scale * 1.0
    return run


def _mahiro_upstream(sets):
    """comfy_extras/nodes_mahiro.py mahiro_normd on cfg_function's result (the similarity averaged over the batch)."""
    import torch.nn.functional as F

    def run(c, u):
        g = _comfy_cfg(c, u, 7.5)
        leap, u_leap = c * 7.5, u * 7.5
        merge = (leap + g) / 2
        normu, normm = torch.sqrt(u_leap.abs()) * u_leap.sign(), torch.sqrt(merge.abs()) * merge.sign()
        simsc = 2 * (F.cosine_similarity(normu, normm).mean() + 1)
        return (simsc * g + (4 - simsc) * leap) / 4
    return run


def _mahiro_math(sets):
    def run(c, u):
        k = 2 * (_eager.mahiro_sim(c, u, None, 7.5).mean() + 1)
        return _eager.lincomb([u, c], torch.stack([7.5 + k * (1 - 7.5) / 4, torch.full_like(k, 7.5)]), [])
    return run


def _renorm_cfg_upstream(sets):
    """comfy_extras/nodes_lumina2.py RenormCFG below cfg_trunc (renorm_cfg 1, every channel guided); the node's
    `if new_pos_norm >= max_new_norm` runs at batch 1 only: here a per-sample where."""
    def run(c, u):
        g = u + 7.5 * (c - u)
        dims = tuple(range(1, c.dim()))
        max_norm = torch.linalg.vector_norm(c, dim=dims, keepdim=True) * 1.0
        norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        return torch.where(norm >= max_norm, g * (max_norm / norm), g)
    return run


def _renorm_cfg_math(sets):
    K = sets[0][0][0].numel()

    def run(c, u):
        raw = _eager.guidance_stats(c, u, None, K)
        cu, cc, uu = raw[:, 0], raw[:, 1], raw[:, 2]
        ng, nmax = ((1 - 7.5) ** 2 * uu + 2 * 7.5 * (1 - 7.5) * cu + 7.5 ** 2 * cc).clamp_min(0).sqrt(), cc.sqrt()
        f = torch.where((ng >= nmax) & (ng > 0), nmax / torch.where(ng > 0, ng, 1.0), 1.0)
        return _eager.lincomb([u, c], torch.stack([f, f * 7.5], 1), [])
    return run


# CFG++ steps (epsilon predictions in sigma space; lambda 0.6): sigma 2 -> 1.5, the DPM++ 2M step its second-order
# one (previous sigma 3). Euler ancestral takes its noise as an input (ComfyUI draws it in the sampler).
_SIG, _SIG_NEXT, _SIG_PREV, _LAM = 2.0, 1.5, 3.0, 0.6


def _euler_a_fastguide(sets):
    return _cycled(lambda x, c, u, n: ops.cfgpp_euler_ancestral_step(x, c, u, _LAM, _SIG, _SIG_NEXT, noise=n), sets)


def _euler_a_math(sets):
    down, up = ops._ancestral_step(_SIG, _SIG_NEXT, 1.0)
    return lambda x, c, u, n: _eager.cfgpp_step(x, c, u, 1.0, -_SIG, down, None, _LAM) + n * up


def _euler_a_upstream(sets):
    """comfy/k_diffusion/sampling.py sample_euler_ancestral_cfg_pp, one step (eta 1, s_noise 1), the model's
    denoised outputs formed as ComfyUI's model_sampling does (x - sigma eps)."""
    down, up = ops._ancestral_step(_SIG, _SIG_NEXT, 1.0)

    def run(x, c, u, n):
        uncond_denoised = x - _SIG * u
        denoised = _comfy_cfg(x - _SIG * c, uncond_denoised, _LAM)
        d = (x - uncond_denoised) / _SIG
        return denoised + d * down + n * 1.0 * up
    return run


def _dpmpp_2m_fastguide(sets):
    return _cycled(lambda x, c, u, old: ops.cfgpp_dpmpp_2m_step(x, c, u, _LAM, _SIG, _SIG_NEXT, old_uncond_denoised=old,
                                                                sigma_prev=_SIG_PREV), sets)


def _dpmpp_2m_math(sets):
    h = math.log(_SIG / _SIG_NEXT)
    k = -math.expm1(-h) / (2 * math.log(_SIG_PREV / _SIG) / h)
    wc = -_SIG * (1 + k) * _LAM
    wu = -_SIG * (1 + k) * (1 - _LAM) + _SIG_NEXT
    return lambda x, c, u, old: (_eager.lincomb([x, c, u, old], None, [1.0 + wc + wu, wc, wu, -k]),
                                 _eager.lincomb([u, x], None, [1.0 - _SIG, 1.0]))


def _dpmpp_2m_upstream(sets):
    """comfy/k_diffusion/sampling.py sample_dpmpp_2m_cfg_pp, one second-order step; returns (x, uncond_denoised)."""
    t_fn = lambda s: -math.log(s)  # noqa: E731
    h, h_last = t_fn(_SIG_NEXT) - t_fn(_SIG), t_fn(_SIG) - t_fn(_SIG_PREV)
    r = h_last / h

    def run(x, c, u, old):
        uncond_denoised = x - _SIG * u
        denoised = _comfy_cfg(x - _SIG * c, uncond_denoised, _LAM)
        denoised_mix = -math.exp(-h) * uncond_denoised - math.expm1(-h) * (1 / (2 * r)) * (denoised - old)
        return denoised + denoised_mix + math.exp(-h) * x, uncond_denoised
    return run


CASES = {
    "cfg": Case("cfg", 2, _fastguide(lambda c, u: ops.cfg(c, u, 7.5)),
                _pure(lambda c, u: _eager.cfg(c, u, None, 7.5, 0.0, False)),
                _guider("cfg", guidance_scale=7.5)),
    "cfg_rescale": Case("cfg_rescale", 2, _fastguide(lambda c, u: ops.cfg(c, u, 7.5, rescale=0.7)),
                        _pure(lambda c, u: _eager.cfg(c, u, None, 7.5, 0.7, False)),
                        _guider("cfg", guidance_scale=7.5, guidance_rescale=0.7)),
    "pag": Case("pag", 3, _fastguide(lambda c, u, p: ops.pag(c, u, p, 7.5, 3.0)),
                _pure(lambda c, u, p: _eager.pag(c, u, p, None, 7.5, None, 3.0, 0.0, False)),
                _guider("pag", guidance_scale=7.5, perturbed_guidance_scale=3.0)),
    "cfg_zero_star": Case("cfg_zero_star", 2, _fastguide(lambda c, u: ops.cfg_zero_star(c, u, 7.5)),
                          _pure(lambda c, u: _eager.cfg_zero_star(c, u, None, 7.5, 0.0, False)),
                          _guider("cfg_zero_star", guidance_scale=7.5)),
    # APG with momentum and norm clamp: reads cond, uncond, buffer; writes buffer and output.
    "apg": Case("apg", 2, _apg_fastguide, _apg_math,
                _guider("apg", guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5,
                        adaptive_projected_guidance_rescale=15.0), traffic=5),
    # cos(cond, guided) and friends for Adaptive Guidance: reads three tensors, writes a few floats.
    "stats": Case("stats", 3, _fastguide(lambda c, u, g: ops.guidance_stats(c, u, g).raw),
                  _pure(lambda c, u, g: _eager.guidance_stats(c, u, g, c[0].numel())), None, traffic=3),
    # Frequency-split guidance on [..., H, W] planes (the matrix route; peers: torch.fft / interpolate / kornia).
    "fresca": Case("fresca", 2, _fastguide(lambda c, u: frequency.frequency_cfg(c, u, 7.5, 7.5 * 1.25, cutoff=16)),
                   _fresca_math, None, applies=lambda shape: len(shape) >= 3 and min(shape[-2:]) >= 32),
    "frecas": Case("frecas", 2, _fastguide(lambda c, u: frequency.frequency_cfg(
        c, u, 5.0, 9.0, method="bilinear", size=(c.shape[-2] // 2, c.shape[-1] // 2))), _frecas_math, None,
        applies=lambda shape: len(shape) >= 3 and min(shape[-2:]) >= 4),
    "fdg": Case("fdg", 2, _fastguide(lambda c, u: frequency.fdg(c, u, [10.0, 5.0])), _fdg_math, _fdg_diffusers,
                applies=_fdg_applies),
    # --- session 4: the diffusers 0.42 guiders twinned (peer: the stock diffusers guider's forward) ---
    # MAG: one guidance_stats pass + one cfg pass (5 tensor moves against the floor's 3). diffusers' MAG takes
    # torch.norm over dims 1.. (a matrix norm): it fails on 4-D and 5-D inputs, so its column is empty there.
    "mag": Case("mag", 2, _fastguide(lambda c, u: methods.mag(c, u, 7.5, 8.0)), _mag_math,
                _guider("mag", guidance_scale=7.5, alpha=8.0), diffusers_applies=lambda shape: len(shape) <= 3),
    # TCFG: guidance_stats, a [B, 2, 2] SVD, one combine (diffusers: SVD of [B, 2, N] and two matmuls).
    "tcfg": Case("tcfg", 2, _fastguide(lambda c, u: methods.tcfg(c, u, 7.5)), _tcfg_math,
                 _guider("tcfg", guidance_scale=7.5)),
    # APMix in its APG phase (start step 0, timed at step 1): APG's traffic (cond, uncond, buffer in; buffer, out).
    "apg_mix": Case("apg_mix", 2, _apg_mix_fastguide(True), _apg_mix_math,
                    _guider("apg_mix", **_APG_MIX, adaptive_projected_guidance_start_step=0), traffic=5),
    # APMix in its CFG phase (start step 5, timed at step 1): CFG plus the momentum update, the same 5 tensors.
    "apg_mix_cfg": Case("apg_mix_cfg", 2, _apg_mix_fastguide(False), _apg_mix_cfg_math,
                        _guider("apg_mix", **_APG_MIX, adaptive_projected_guidance_start_step=5), traffic=5),
    # LTX-2, single modality: cond + (gs - 1)(cond - uncond) + stg (cond - stg pass): one fused pag pass.
    "ltx2": Case("ltx2", 3, _ltx2_fastguide,
                 _pure(lambda c, u, p: _eager.pag(c, u, p, None, 3.0, None, 1.0, 0.0, True)),
                 _guider("ltx2", guidance_scale=4.0, stg_scale=1.0)),
    # --- session 4: ComfyUI's methods and RLG (peer: the node's eager math, the "upstream" column) ---
    "dual_cfg": Case("dual_cfg", 3, _fastguide(lambda c, m, u: ops.dual_cfg(c, m, u, 7.5, 1.5)),
                     _pure(lambda c, m, u: _eager.lincomb([u, m, c], None, [1.0, 1.5 - 7.5, 7.5])), None,
                     upstream=_dual_cfg_upstream),
    # Perp-Neg: diff_stats (reads 3) then one lincomb (reads 3, writes 1); the floor counts each input once.
    "perp_neg": Case("perp_neg", 3, _fastguide(lambda c, u, e: ops.perp_neg(c, u, e, 7.5, 1.0)), _perp_neg_math, None,
                     upstream=_perp_neg_upstream),
    # RLG: cond, uncond of the RL model, cond, uncond of the reference model: one lincomb over 4 inputs.
    "rlg": Case("rlg", 4, _fastguide(lambda c, u, rc, ru: ops.two_model_cfg(c, u, rc, ru, 7.5, 1.5)),
                _pure(lambda c, u, rc, ru: _eager.lincomb([ru, rc, u, c], None,
                                                          [1.0, (1 - 1.5) * 7.5, 1.5 * (1 - 7.5), 1.5 * 7.5])),
                None, upstream=_rlg_upstream),
    "cfg_norm": Case("cfg_norm", 2, _fastguide(lambda c, u: ops.cfg_norm(c, u, 7.5)),
                     _pure(lambda c, u: _eager.cfg_norm(c, u, None, 7.5, 1.0)), None, upstream=_cfg_norm_upstream,
                     applies=lambda shape: len(shape) >= 2),
    "mahiro": Case("mahiro", 2, _fastguide(lambda c, u: ops.mahiro(c, u, 7.5)), _mahiro_math, None,
                   upstream=_mahiro_upstream),
    "renorm_cfg": Case("renorm_cfg", 2, _fastguide(lambda c, u: ops.renorm_cfg(c, u, 7.5, 1.0)), _renorm_cfg_math,
                       None, upstream=_renorm_cfg_upstream),
    # CFG++ Euler ancestral: x, cond, uncond, noise in; x_next out (cfgpp_step, then the noise added in place).
    "euler_ancestral_cfg_pp": Case("euler_ancestral_cfg_pp", 4, _euler_a_fastguide, _euler_a_math, None,
                                   upstream=_euler_a_upstream),
    # CFG++ DPM++ 2M, second-order step: x, cond, uncond, the previous uncond_denoised in; x_next and
    # uncond_denoised out (the latter is the next step's input).
    "dpmpp_2m_cfg_pp": Case("dpmpp_2m_cfg_pp", 4, _dpmpp_2m_fastguide, _dpmpp_2m_math, None,
                            upstream=_dpmpp_2m_upstream, traffic=6),
}


def median_us(fn, device, min_run_time):
    """(median, IQR) microseconds per call."""
    for _ in range(3):
        fn()  # warm-up (compiles the compiled peer)
    if device.type == "cuda":
        times = []
        reps = max(20, min(1000, int(min_run_time / max(_one_cuda_call(fn), 1e-6))))
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        t = torch.tensor(times)
        return t.median().item(), (t.quantile(0.75) - t.quantile(0.25)).item()
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e6, m.iqr * 1e6


def _one_cuda_call(fn):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def count_launches(fn, device):
    """Kernels per call: CUDA kernel events, or on CPU top-level operator calls."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and e.name.startswith(("aten::", "fastguide::")))


def _revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a checkout
        return "unknown"


def environment(device):
    versions = {}
    for mod in ("triton", "diffusers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": versions["triton"],
            "diffusers": versions["diffusers"], "fastguide_rev": _revision(), "date": datetime.date.today().isoformat()}


def _input_sets(case, shape, dtype, device):
    one = math.prod(shape) * torch.empty((), dtype=dtype).element_size() * case.n_inputs
    n = max(1, min(128, ROTATE_BYTES // max(one, 1)))
    return [[torch.randn(shape, device=device, dtype=dtype) for _ in range(case.n_inputs)] for _ in range(n)]


def run_bench(case_names, shape_names, dtype_names, device, impls=IMPLS, min_run_time=0.2, progress=None,
              no_diffusers=()):
    """One row per (dtype, shape, op); `no_diffusers`: ops whose diffusers peer is left out (a missing dependency)."""
    rows = []
    jobs = [(d, s, c) for d in dtype_names for s in shape_names for c in case_names]
    for dname, sname, cname in jobs:
        dtype, shape, case = DTYPES[dname], ALL_SHAPES[sname], CASES[cname]
        if not case.applies(shape):
            if progress:
                for impl in impls:
                    progress(f"{dname} {sname} {cname}: not defined for this shape")
            continue
        sets = _input_sets(case, shape, dtype, device)
        esize = sets[0][0].element_size()
        nbytes = case.bytes_moved(math.prod(shape), esize)
        srcs = [torch.randn(nbytes // 2 // esize, device=device, dtype=dtype) for _ in range(max(1, len(sets) // 2))]
        dst = torch.empty_like(srcs[0])
        math_fn = case.math(sets)
        fns = {
            "fastguide": lambda: case.fastguide(sets),
            "diffusers": ((lambda: case.diffusers(sets))
                          if case.diffusers and cname not in no_diffusers and case.diffusers_applies(shape) else None),
            "upstream": (lambda: _cycled(case.upstream(sets), sets)) if case.upstream else None,
            "eager": lambda: _cycled(math_fn, sets),
            "compile": lambda: _cycled(torch.compile(math_fn, dynamic=False), sets),
            "floor": lambda: _cycled(dst.copy_, [[s] for s in srcs]),
        }
        row = {"op": cname, "shape": sname, "dims": "x".join(map(str, shape)), "dtype": dname, "bytes": nbytes,
               "rotating_sets": len(sets)}
        for impl in impls:
            if progress:
                progress(f"{dname} {sname} {cname}: {impl}")
            if fns[impl] is None:
                row[f"{impl}_us"] = row[f"{impl}_iqr_us"] = float("nan")
                row[f"{impl}_launches"] = ""
                continue
            fn = fns[impl]()
            row[f"{impl}_us"], row[f"{impl}_iqr_us"] = median_us(fn, device, min_run_time)
            row[f"{impl}_launches"] = count_launches(fn, device) if impl != "floor" else 1
            row[f"{impl}_GBps"] = nbytes / (row[f"{impl}_us"] * 1e-6) / 1e9
        if "fastguide" in impls:
            t = row["fastguide_us"]
            if "floor" in impls:
                row["pct_floor"] = 100.0 * row["floor_us"] / t
            for peer in ("diffusers", "upstream", "eager", "compile"):
                if peer in impls and not math.isnan(row[f"{peer}_us"]):
                    row[f"x_{peer}"] = row[f"{peer}_us"] / t
        rows.append(row)
        del sets, srcs, dst, math_fn
    return rows


def _render(head, lines):
    """Right-aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _write_csv(path, env, rows):
    fields = list(env) + list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    print(f"wrote {path}")


def format_table(rows, impls):
    head = ["op", "shape", "dtype"] + [f"{i} us" for i in impls] + ["GB/s", "%floor", "xdiff", "xup", "xeager",
                                                                    "xcompile", "launches fg/diff/up/eager"]
    lines = []
    for r in rows:
        cells = [r["op"], r["shape"], r["dtype"]]
        cells += ["-" if math.isnan(r[f"{i}_us"]) else f"{r[f'{i}_us']:.1f}" for i in impls]
        cells += [f"{r['fastguide_GBps']:.1f}" if "fastguide_GBps" in r else "-"]
        cells += [f"{r['pct_floor']:.0f}%" if "pct_floor" in r else "-"]
        cells += [f"{r[k]:.1f}x" if k in r else "-" for k in ("x_diffusers", "x_upstream", "x_eager", "x_compile")]
        cells += ["/".join(str(r.get(f"{i}_launches", "")) or "-"
                           for i in ("fastguide", "diffusers", "upstream", "eager"))]
        lines.append(cells)
    return _render(head, lines)


def write_plot(rows, path, impls, device_name):
    """Achieved bandwidth (minimum bytes / time) against size: one panel per op, one line per implementation,
    the memcpy floor in black."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["op"] for r in rows))
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    styles = {"fastguide": "-", "diffusers": "--", "upstream": (0, (5, 1, 1, 1)), "eager": ":", "compile": "-.",
              "floor": "-"}
    for ax, op in zip(axes.flat, names):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            group = sorted((r for r in rows if r["op"] == op and r["dtype"] == dtype), key=lambda r: r["bytes"])
            for impl in impls:
                pts = [(r["bytes"], r[f"{impl}_GBps"]) for r in group if f"{impl}_GBps" in r]
                if pts:
                    floor = impl == "floor"
                    ax.plot(*zip(*pts), linestyle=styles[impl], marker="o", markersize=3,
                            label=f"{'memcpy floor' if floor else impl} {dtype}",
                            color="black" if floor else None, linewidth=2.2 if floor else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("bytes moved (inputs once + outputs once)", fontsize=7)
        ax.set_ylabel("achieved GB/s", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"fastguide vs peers, {device_name} (higher is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- per denoising step -----------------------------------------------------------------------
STEP_GUIDANCE = ("cfg", "cfg_rescale", "apg")


def tiny_unet(device, dtype=torch.float32):
    """A real diffusers UNet2DConditionModel (SD-style: cross-attention down/up blocks) from a tiny
    config with random weights: no download."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    # .to(dtype=...) makes diffusers warn about modules to keep in float32 (there are none here).
    return (unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)).eval()


def step_bench(device, latent=64, min_run_time=0.2, compile_unet=False, progress=None):
    """Time of one CFG denoising step (batched cond/uncond UNet pass + guidance), stock vs fastguide.

    Returns rows: the denoiser's time, each guidance's time with diffusers' guider and with fastguide,
    the guidance's share of the whole step, and (with compile_unet) the step with torch.compile(unet).
    """
    unet = tiny_unet(device)
    x = torch.randn(1, 4, latent, latent, device=device)
    emb = torch.randn(2, 7, 32, device=device)
    t = torch.tensor(500, device=device)

    def denoise(model):
        with torch.no_grad():
            return model(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)

    models = {"eager": unet}
    if compile_unet:
        models["compiled"] = torch.compile(unet)
    rows = []
    for mode, model in models.items():
        if progress:
            progress(f"step, {mode} UNet: denoiser")
        cond, uncond = denoise(model)
        den_us, _ = median_us(lambda: denoise(model), device, min_run_time)
        for name in STEP_GUIDANCE:
            case = CASES[name]
            stock = case.diffusers([[cond, uncond]])
            fast = case.fastguide([[cond, uncond]])
            if progress:
                progress(f"step, {mode} UNet: {name}")
            stock_us, _ = median_us(stock, device, min_run_time)
            fast_us, _ = median_us(fast, device, min_run_time)
            rows.append({"unet": mode, "guidance": name, "latent": f"{latent}x{latent}", "denoiser_ms": den_us / 1e3,
                         "diffusers_guidance_ms": stock_us / 1e3, "fastguide_guidance_ms": fast_us / 1e3,
                         "diffusers_share": stock_us / (den_us + stock_us), "fastguide_share": fast_us / (den_us + fast_us),
                         "step_speedup": (den_us + stock_us) / (den_us + fast_us)})
    return rows


def format_step_table(rows):
    head = ["unet", "guidance", "latent", "denoiser ms", "diffusers guid. ms", "fastguide guid. ms",
            "share (diffusers)", "share (fastguide)", "step speed-up"]
    lines = [[r["unet"], r["guidance"], r["latent"], f"{r['denoiser_ms']:.2f}", f"{r['diffusers_guidance_ms']:.3f}",
              f"{r['fastguide_guidance_ms']:.3f}", f"{100 * r['diffusers_share']:.1f}%",
              f"{100 * r['fastguide_share']:.1f}%", f"{r['step_speedup']:.3f}x"] for r in rows]
    return _render(head, lines)


# --- end to end: network evaluations saved -------------------------------------------------------
def tiny_sd_pipeline(device):
    """A real StableDiffusionPipeline from tiny configs (random weights, no download): the UNet of
    `tiny_unet`, a one-block VAE, Euler; prompts enter as embeddings (no tokenizer)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=tiny_unet(device),
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


E2E_STEPS = (30, 50)
E2E_POLICIES = 5  # cfg, ag(0.991), ag(0.95), interval(middle), linear_ag


def e2e_bench(device, steps=E2E_STEPS, size=32, progress=None):
    """NFEs and wall time of a whole sampling run with CFG, Adaptive Guidance, interval guidance and LinearAG
    (calibrated on two other prompts), and how far each final result is from full CFG (relative L2 of the
    latents, PSNR of the decoded images)."""
    import time
    pipe = tiny_sd_pipeline(device)
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    latents = torch.randn(1, 4, size, size, generator=g)
    rows = []
    for n in steps:
        pipe.scheduler.set_timesteps(n)
        sig = [float(s) for s in pipe.scheduler.sigmas[:n]]
        from .pipelines import calibrate_linear_ag
        cal = [torch.randn(1, 7, 32, generator=g).to(device) for _ in range(4)]  # calibration prompts != eval prompt
        lag = calibrate_linear_ag(pipe, cal[:2], cal[2:], n, guidance_scale=7.5, height=size, width=size)
        policies = {"cfg": {}, "ag(0.991)": {"adaptive": ops_ag(0.991)}, "ag(0.95)": {"adaptive": ops_ag(0.95)},
                    # the scheduler's float32 sigmas as bounds, widened by 1e-6: the policy maps timesteps to sigmas in float64
                    "interval(middle)": {"interval": (sig[int(0.8 * n)] * (1 - 1e-6), sig[int(0.2 * n)] * (1 + 1e-6))},
                    "linear_ag": {"linear_ag": lag}}
        ref_img = ref_lat = None
        for name, kw in policies.items():
            if progress:
                progress(f"end to end, {n} steps: {name}")
            from .pipelines import disable, enable
            enable(pipe, guidance="cfg", **kw)
            t0 = time.perf_counter()
            with torch.no_grad():
                lat = pipe(prompt_embeds=emb.to(device), negative_prompt_embeds=neg.to(device),
                           latents=latents.to(device), num_inference_steps=n, guidance_scale=7.5,
                           output_type="latent", height=size, width=size).images
            wall = time.perf_counter() - t0
            report = pipe.fastguide_report
            disable(pipe)
            with torch.no_grad():
                img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
            if ref_lat is None:
                ref_lat, ref_img = lat, img
            mse = ((img - ref_img) ** 2).mean().item()
            rows.append({"steps": n, "policy": name, "nfe": report.nfe, "nfe_skipped": report.nfe_skipped,
                         "wall_s": wall, "rel_l2_latents": ((lat - ref_lat).norm() / ref_lat.norm()).item(),
                         "psnr_db": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)})
    return rows


def ops_ag(threshold):
    from .pipelines import AG
    return AG(threshold=threshold)


def format_e2e_table(rows):
    head = ["steps", "policy", "NFE", "skipped", "wall s", "rel L2 vs CFG", "PSNR dB vs CFG"]
    lines = [[r["steps"], r["policy"], r["nfe"], r["nfe_skipped"], f"{r['wall_s']:.3f}", f"{r['rel_l2_latents']:.2e}",
              f"{r['psnr_db']:.1f}"] for r in rows]
    return _render(head, lines)



# --- command line ------------------------------------------------------------------------------
EXIT_CODES = """exit codes:
  0  success
  1  failure: an error while running (its traceback is printed)
  2  bad usage: an unknown option or name, or an optional dependency the options need is missing"""

EPILOG = f"""examples:
  fastguide bench                        every op, shapes {','.join(DEFAULT_SHAPES)}, then the per-step and
                                         end-to-end sections (the README's main job)
  fastguide bench --quick                SDXL shape only, short timing, tables only: under a minute on CPU
  fastguide bench --ops cfg,apg --dtype fp16,bf16 --shapes sdxl,flux
  fastguide bench --shapes all --csv bench.csv --plot bench.png
  fastguide bench --quick -v             also show the third-party warnings and profiler log lines

optional dependencies (all of them: pip install 'fastguide[bench]'):
  matplotlib    --plot; without it, --plot stops before any work (exit 2)
  diffusers     the diffusers column and the per-step section
  transformers  with diffusers: the end-to-end section (a tiny StableDiffusionPipeline)
  kornia        the diffusers column of fdg (diffusers' FrequencyDecoupledGuidance)
  tqdm          the progress bar (without it: plain progress lines)
  A column or section asked for by name (--impls diffusers, --step on, --e2e on, --compile-step) stops
  the run at once when its dependency is missing (exit 2); by default it is left out with a one-line note.

{EXIT_CODES}"""

_INSTALL = "pip install {pkgs} (or pip install 'fastguide[bench]')"


def _importable(name):
    """Whether `import name` works (a broken install counts as missing)."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - ImportError, or whatever a broken install raises
        return False


def check_dependencies(a, impls, ops_):
    """Decide, before any work, what this run can do with the packages installed.

    Returns (errors, notes, plan): errors are missing hard requirements (each names its install command),
    notes are one line per dropped optional column or section, plan says what to run."""
    errors, notes = [], []
    want_step = a.step == "on" or a.compile_step or (a.step == "auto" and not a.quick)
    want_e2e = a.e2e == "on" or (a.e2e == "auto" and not a.quick)
    if a.plot and not _importable("matplotlib"):
        errors.append("--plot needs matplotlib: " + _INSTALL.format(pkgs="matplotlib"))
    has_diffusers = (("diffusers" in impls) or want_step or want_e2e) and _importable("diffusers")
    if "diffusers" in impls and not has_diffusers:
        if a.impls is not None:
            errors.append("--impls diffusers needs diffusers: " + _INSTALL.format(pkgs="diffusers"))
        else:
            impls = [i for i in impls if i != "diffusers"]
            notes.append("diffusers column left out: diffusers is not installed; " + _INSTALL.format(pkgs="diffusers"))
    no_diffusers = []
    if "diffusers" in impls and "fdg" in ops_ and has_diffusers and not _importable("kornia"):
        no_diffusers.append("fdg")
        notes.append("fdg's diffusers column left out: diffusers' FrequencyDecoupledGuidance needs kornia; "
                     + _INSTALL.format(pkgs="kornia"))
    if want_step and not has_diffusers:
        what = "--compile-step" if a.compile_step else "--step on"
        if a.step == "on" or a.compile_step:
            errors.append(f"{what} needs diffusers (a tiny UNet2DConditionModel): " + _INSTALL.format(pkgs="diffusers"))
        else:
            notes.append("per-step section left out: it needs diffusers; " + _INSTALL.format(pkgs="diffusers"))
        want_step = False
    if want_e2e:
        missing = [m for m, ok in (("diffusers", has_diffusers), ("transformers", _importable("transformers"))) if not ok]
        if missing:
            if a.e2e == "on":
                errors.append(f"--e2e on needs {' and '.join(missing)} (a tiny StableDiffusionPipeline): "
                              + _INSTALL.format(pkgs=" ".join(missing)))
            else:
                notes.append(f"end-to-end section left out: it needs {' and '.join(missing)}; "
                             + _INSTALL.format(pkgs=" ".join(missing)))
            want_e2e = False
    return errors, notes, {"impls": impls, "no_diffusers": no_diffusers, "step": want_step, "e2e": want_e2e}


def _progress(total, stream):
    """(step(label), close): a tqdm bar on a terminal; otherwise (or without tqdm) one plain line per job, where
    a job is the part of the label before ': '."""
    if stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total, file=stream, unit="run", leave=False, dynamic_ncols=True)

            def step(label):
                bar.set_description(label, refresh=False)
                bar.update(1)
            return step, bar.close
    state = {"n": 0, "job": None, "t0": time.perf_counter()}

    def step(label):
        state["n"] += 1
        job = label.split(": ", 1)[0]
        if job != state["job"]:
            state["job"] = job
            print(f"  [{state['n']}/{total}, {time.perf_counter() - state['t0']:.0f} s] {job}", file=stream, flush=True)
    return step, lambda: None


# A line of the torch profiler's C++ logger (kineto), e.g.
# "USDT:2026-11-23 12:50:55 6299:6299 SyncActivityProfilerHandler.cpp:52] profiler_start".
_KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.(cpp|h):\d+\]")


class QuietThirdParty:
    """Hides third-party chatter while the benchmark runs and sums it up in one line.

    The torch profiler (used to count kernel launches) logs profiler_start / profiler_stop lines from C++
    straight to file descriptor 2; diffusers and transformers log warnings (experimental guiders, missing
    torchvision); torch.compile warns. So: Python warnings are recorded (warnings.catch_warnings), and fd 2
    is pointed at a temporary file at the OS level (os.dup2), which catches both the library loggers and the
    C++ lines. Progress goes to a duplicate of the real stderr. On an exception, everything collected is
    written out before the traceback. Disabled (`enabled=False`, `fastguide bench -v`): nothing is hidden.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.stream = sys.stderr  # where progress goes
        self.text, self.warnings = "", []

    def __enter__(self):
        if not self.enabled:
            return self
        self._catch = warnings.catch_warnings(record=True)
        self.warnings = self._catch.__enter__()  # the filters in force stay: what would show is counted
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # replaced by a non-file stream (pytest's capsys)
            on_fd2 = False
        if on_fd2:
            self.stream = os.fdopen(os.dup(self._saved), "w", buffering=1, encoding="utf-8", errors="replace")
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if self.stream is not sys.stderr:
            self.stream.close()
            self.stream = sys.stderr
        self._catch.__exit__(exc_type, exc, tb)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        if exc_type is not None:  # the hidden output may explain the failure
            sys.stderr.write(self.text)
            for w in self.warnings:
                sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
            sys.stderr.flush()
        return False

    def counts(self):
        """Counter of hidden messages: the profiler's C++ log lines as one kind, others by their opening words."""
        c = collections.Counter()
        for line in self.text.splitlines():
            line = line.strip()
            if not line or line == "warnings.warn(":
                continue
            c["torch profiler log lines" if _KINETO_LINE.match(line) else _shorten(line)] += 1
        for w in self.warnings:
            c[f"{w.category.__name__}: {_shorten(str(w.message))}"] += 1
        return c

    def summary(self, command="fastguide bench -v"):
        """One line, or None when nothing was hidden."""
        c = self.counts()
        if not c:
            return None
        parts = [f"{n}x {k}" for k, n in c.most_common(4)]
        more = len(c) - len(parts)
        return (f"(hid {sum(c.values())} lines of third-party output: {'; '.join(parts)}"
                f"{f'; {more} more kinds' if more > 0 else ''}. `{command}` shows them)")


def _shorten(text, n=48):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1].rstrip() + "…"


def add_arguments(p):
    """The options of `fastguide bench` (shared by `python -m fastguide bench` and bench.main)."""
    p.add_argument("--ops", default=",".join(CASES), help=f"comma list from {','.join(CASES)}")
    p.add_argument("--shapes", default=None, help=f"comma list from {','.join(SHAPES)}, sweep (2^14..2^26 elements), "
                   f"a sweep point like 2^20, or all (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtype", default="fp32", help="comma list from fp32,fp16,bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default=None, help=f"comma list from {','.join(IMPLS)} (default: all; diffusers only "
                   "where it is installed)")
    p.add_argument("--quick", action="store_true", help="SDXL shape only, short timing: under a minute on CPU")
    p.add_argument("--csv", default=None, help="also write the rows (with versions and device) to this CSV")
    p.add_argument("--plot", default=None, help="write a PNG of achieved bandwidth vs size to this path (needs matplotlib)")
    p.add_argument("--step", choices=("auto", "on", "off"), default="auto",
                   help="per-denoising-step section on a tiny diffusers UNet (auto: on unless --quick, "
                        "where diffusers is installed)")
    p.add_argument("--compile-step", action="store_true", help="also time the step with torch.compile(unet)")
    p.add_argument("--e2e", choices=("auto", "on", "off"), default="auto",
                   help="end-to-end NFEs and wall time with CFG, AG and interval guidance (auto: on unless --quick, "
                        "where diffusers and transformers are installed)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show third-party warnings and the torch profiler's log lines (hidden and counted by default)")
    return p


def build_parser(prog="fastguide bench"):
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def run(a, p):
    """Run `fastguide bench` with parsed arguments `a` (p: its parser, for usage errors). Returns the exit code."""
    def pick(text, known, what):
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in known]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {list(known)}")
        return names

    shapes = []
    for name in pick(a.shapes or ",".join(QUICK_SHAPES if a.quick else DEFAULT_SHAPES),
                     {**ALL_SHAPES, "sweep": None, "all": None}, "shape"):
        shapes += list(SWEEP) if name == "sweep" else list(ALL_SHAPES) if name == "all" else [name]
    impls = pick(a.impls or ",".join(IMPLS), IMPLS, "implementation")
    ops_ = pick(a.ops, CASES, "op")
    dtypes = pick(a.dtype, DTYPES, "dtype")
    try:
        device = torch.device(a.device)
    except RuntimeError as exc:
        p.error(f"bad --device {a.device!r}: {exc}")
    errors, notes, plan = check_dependencies(a, impls, ops_)
    if errors:  # before any work
        for e in errors:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    impls = plan["impls"]

    env = environment(device)
    print("fastguide bench: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print("backends: " + ", ".join(f"{k}={v}" for k, v in ops.backends()["cfg"].items()))
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()
    quiet = QuietThirdParty(enabled=not a.verbose)
    with quiet:
        step, done = _progress(len(ops_) * len(shapes) * len(dtypes) * len(impls), quiet.stream)
        try:
            rows = run_bench(ops_, shapes, dtypes, device, impls, min_run_time=0.05 if a.quick else 0.2,
                             progress=step, no_diffusers=plan["no_diffusers"])
        finally:
            done()
        print(format_table(rows, impls), flush=True)
        step_rows = []
        if plan["step"]:
            step, done = _progress((2 if a.compile_step else 1) * (1 + len(STEP_GUIDANCE)), quiet.stream)
            try:
                step_rows = step_bench(device, latent=128 if device.type == "cuda" else 32,
                                       compile_unet=a.compile_step, progress=step)
            finally:
                done()
            print("\nper denoising step (tiny SD-style UNet2DConditionModel, batch 2 = cond + uncond):")
            print(format_step_table(step_rows), flush=True)
        e2e_rows = []
        if plan["e2e"]:
            step, done = _progress(len(E2E_STEPS) * E2E_POLICIES, quiet.stream)
            try:
                e2e_rows = e2e_bench(device, progress=step)
            finally:
                done()
            print("\nend to end (tiny StableDiffusionPipeline, Euler, guidance 7.5; differences against full CFG):")
            print(format_e2e_table(e2e_rows), flush=True)
        if a.csv:
            _write_csv(a.csv, env, rows)
            for suffix, extra in (("_e2e", e2e_rows), ("_step", step_rows)):
                if extra:
                    _write_csv(os.path.splitext(a.csv)[0] + suffix + ".csv", env, extra)
        if a.plot:
            write_plot(rows, a.plot, impls, env["device"])
            print(f"wrote {a.plot}")
    sys.stdout.flush()
    summary = quiet.summary()
    if summary:
        print(summary, file=sys.stderr, flush=True)
    return 0


def main(argv=None):
    """`fastguide bench [options]`; returns the exit code (argparse's own usage errors raise SystemExit(2))."""
    p = build_parser()
    return run(p.parse_args(argv), p)
