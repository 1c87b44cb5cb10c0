"""One line for classic diffusers pipelines: `fastguide.enable(pipe, guidance="apg", ...)`.

The pipeline's denoiser (`pipe.unet` or `pipe.transformer`) gets a wrapped `forward`. When the pipeline
runs classifier-free guidance, the wrapper splits the denoiser's output into its uncond/cond halves,
computes fastguide's guided prediction g, and returns [g, g]: the pipeline's own arithmetic
`uncond + s * (cond - uncond)` then yields g exactly (cond - uncond = 0). Nothing in diffusers is edited.
For PAG the wrapper appends the conditional rows again to every batched input ([uncond, cond, cond]) and
puts `IdentityPAGProcessor`s on the chosen layers, so the extra rows see identity attention.

Supported: StableDiffusionPipeline, StableDiffusionXLPipeline (UNet), StableDiffusion3Pipeline (DiT,
true CFG). `enable` on an enabled pipeline replaces its settings; `disable` restores the denoiser.
Pass guidance_rescale=0 to the pipeline call and `rescale=` here (the pipeline's own rescale would
act on [g, g] and is the identity up to rounding).
"""
import inspect
import math

import torch

from . import frequency, ops
from .attention import IdentityPAGProcessor, apply_pag, remove_pag

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
PARAMS = {  # guidance -> {parameter: default}; "scale" None means the pipeline call's guidance_scale
    "cfg": {"scale": None, "rescale": 0.0, "original": False},
    "apg": {"scale": None, "eta": 1.0, "norm_threshold": 0.0, "momentum": None, "norm_dim": None, "rescale": 0.0,
            "original": False},
    "pag": {"scale": None, "pag_scale": 3.0, "layers": ("mid",), "rescale": 0.0, "original": False},
    "cfg_zero_star": {"scale": None, "zero_init_steps": 1, "rescale": 0.0, "original": False},
    "frequency": {"scale_low": 1.0, "scale_high": None, "method": "fft_box", "cutoff": None, "size": None,
                  "rescale": 0.0, "original": False},
    "fdg": {"scales": (10.0, 5.0), "parallel_weights": None, "rescale": 0.0, "original": False},
}


class _Guidance:
    """The per-pipeline state: settings, the step counter, the APG momentum buffer."""

    def __init__(self, pipe, denoiser, guidance, params):
        if guidance not in PARAMS:
            raise ValueError(f"fastguide.enable: unknown guidance {guidance!r}; supported: {sorted(PARAMS)}")
        unknown = sorted(set(params) - set(PARAMS[guidance]))
        if unknown:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} takes {sorted(PARAMS[guidance])}, "
                             f"not {unknown}")
        self.pipe, self.denoiser, self.guidance = pipe, denoiser, guidance
        self.params = {**PARAMS[guidance], **params}
        self.step, self.last_t = 0, None
        self.buffer = ops.MomentumBuffer(self.params["momentum"]) if self.params.get("momentum") is not None else None
        self.processor = None

    def _scale(self, name="scale"):
        value = self.params[name]
        return float(self.pipe.guidance_scale) if value is None else value

    def _new_step(self, timestep):
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.last_t is None or t > self.last_t:  # timesteps decrease within a trajectory: a new one began
            self.step = 0
            if self.buffer is not None:
                self.buffer.reset()
        else:
            self.step += 1
        self.last_t = t

    def guide(self, cond, uncond, perturbed):
        p, g = self.params, self.guidance
        if g == "cfg":
            return ops.cfg(cond, uncond, self._scale(), rescale=p["rescale"], original=p["original"])
        if g == "apg":
            return ops.apg(cond, uncond, self._scale(), eta=p["eta"], norm_threshold=p["norm_threshold"],
                           momentum_buffer=self.buffer, norm_dim=p["norm_dim"], rescale=p["rescale"],
                           original=p["original"])
        if g == "pag":
            return ops.pag(cond, uncond, perturbed, self._scale(), p["pag_scale"], rescale=p["rescale"],
                           original=p["original"])
        if g == "cfg_zero_star":
            if self.step < p["zero_init_steps"]:
                return torch.zeros_like(cond)
            return ops.cfg_zero_star(cond, uncond, self._scale(), rescale=p["rescale"], original=p["original"])
        if g == "frequency":
            return frequency.frequency_cfg(cond, uncond, p["scale_low"], self._scale("scale_high"), method=p["method"],
                                           cutoff=p["cutoff"], size=p["size"], rescale=p["rescale"],
                                           original=p["original"])
        return frequency.fdg(cond, uncond, list(p["scales"]), parallel_weights=p["parallel_weights"],
                             rescale=p["rescale"], original=p["original"])

    def __call__(self, forward, args, kwargs):
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return forward(*args, **kwargs)
        bound = inspect.signature(forward).bind(*args, **kwargs)
        sample_name = next(iter(bound.arguments))  # sample / hidden_states: the batched latents
        batch = bound.arguments[sample_name].shape[0]
        self._new_step(bound.arguments["timestep"])
        pag = self.guidance == "pag"
        if pag:  # [uncond, cond] -> [uncond, cond, cond]: every input batched like the latents gets its cond half again
            half = batch // 2
            for name, value in bound.arguments.items():
                bound.arguments[name] = _append_cond_rows(value, batch, half)
        out = forward(*bound.args, **bound.kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        parts = pred.chunk(3 if pag else 2)
        guided = self.guide(parts[1], parts[0], parts[2] if pag else None)
        both = torch.cat([guided, guided])
        if isinstance(out, tuple):
            return (both,) + tuple(out[1:])
        out.sample = both
        return out


def _append_cond_rows(value, batch, half):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value, value[half:]])
    if isinstance(value, dict):  # SDXL added_cond_kwargs
        return {k: _append_cond_rows(v, batch, half) for k, v in value.items()}
    return value


def _denoiser(pipe):
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise TypeError(f"fastguide.enable: {name} is not supported; supported pipelines: {', '.join(SUPPORTED)}")
    return pipe.transformer if name == "StableDiffusion3Pipeline" else pipe.unet


def enable(pipe, guidance="cfg", **params):
    """Make `pipe`'s classifier-free guidance compute `guidance` with fastguide's fused ops.

    guidance: "cfg" (scale, rescale, original), "apg" (scale, eta, norm_threshold, momentum, norm_dim,
    rescale, original), "pag" (scale, pag_scale, layers, rescale, original), "cfg_zero_star" (scale,
    zero_init_steps, rescale, original), "frequency" (scale_low, scale_high, method, cutoff, size, rescale,
    original), "fdg" (scales, parallel_weights, rescale, original). A scale left as None follows the
    pipeline call's guidance_scale. Returns the pipeline.
    """
    denoiser = _denoiser(pipe)
    state = _Guidance(pipe, denoiser, guidance, params)  # validates before anything changes
    disable(pipe)
    if guidance == "pag":
        state.processor = apply_pag(denoiser, list(state.params["layers"]), IdentityPAGProcessor(chunks=3))
    original = denoiser.forward

    def forward(*args, **kwargs):
        return state(original, args, kwargs)

    denoiser.forward = forward
    pipe._fastguide = state
    return pipe


def disable(pipe):
    """Undo `enable` (a no-op on a pipeline that is not enabled)."""
    state = getattr(pipe, "_fastguide", None)
    if state is None:
        return pipe
    if "forward" in state.denoiser.__dict__:
        del state.denoiser.forward
    if state.processor is not None:
        remove_pag(state.denoiser)
    del pipe._fastguide
    return pipe


def is_enabled(pipe):
    return getattr(pipe, "_fastguide", None) is not None
