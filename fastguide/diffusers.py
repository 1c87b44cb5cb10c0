"""Drop-in diffusers guiders whose `forward` runs fastguide's fused ops.

Each class subclasses diffusers' own guider: same constructor, same config (so `save_pretrained` /
`from_pretrained` round-trip), same step logic (start/stop windows, zero-init steps, momentum reset at
step 0, enabled flags) inherited unchanged. Only `forward` is replaced; the math goes through
`fastguide.cfg / pag / cfg_zero_star / apg / fdg`.

    from fastguide.diffusers import ClassifierFreeGuidance     # instead of diffusers.guiders
    guider = fastguide.diffusers.guider_from(pipe.guider)      # convert an existing one

Differences from diffusers, all documented in tests/test_diffusers_guiders.py: guidance rescale of a
prediction with zero std returns it unrescaled instead of NaN (diffusers issue #13425) -- this includes
CFG-Zero*'s zero-init steps with rescale > 0, where diffusers returns NaN and fastguide zeros; APG's
projection runs in fp32 (diffusers: float64), within fp32 rounding.
"""
import torch
from diffusers import guiders as _dg
from diffusers.guiders.guider_utils import GuiderOutput

from . import frequency, ops

__all__ = ["AdaptiveProjectedGuidance", "ClassifierFreeGuidance", "ClassifierFreeZeroStarGuidance",
           "FrequencyDecoupledGuidance", "PerturbedAttentionGuidance", "SkipLayerGuidance", "guider_from",
           "GUIDERS"]


class ClassifierFreeGuidance(_dg.ClassifierFreeGuidance):
    __doc__ = "fastguide-backed " + (_dg.ClassifierFreeGuidance.__doc__ or "")

    def forward(self, pred_cond, pred_uncond=None):
        if not self._is_cfg_enabled():
            pred = pred_cond  # diffusers' rescale of pred_cond against itself is the identity
        else:
            pred = ops.cfg(pred_cond, pred_uncond, float(self.guidance_scale), rescale=float(self.guidance_rescale),
                           original=self.use_original_formulation)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class _SkipLayerForward:
    """CFG + skip-layer/perturbed-attention guidance, shared by PAG and SLG (identical math in diffusers)."""

    def forward(self, pred_cond, pred_uncond=None, pred_cond_skip=None):
        cfg_on, slg_on = self._is_cfg_enabled(), self._is_slg_enabled()
        r, orig = float(self.guidance_rescale), self.use_original_formulation
        s, s_skip = float(self.guidance_scale), float(self.skip_layer_guidance_scale)
        if cfg_on and slg_on:
            pred = ops.pag(pred_cond, pred_uncond, pred_cond_skip, s, s_skip, rescale=r, original=orig)
        elif cfg_on:
            pred = ops.cfg(pred_cond, pred_uncond, s, rescale=r, original=orig)
        elif slg_on:  # base = cond_skip (cond when original): CFG with the skip prediction as "uncond"
            pred = ops.cfg(pred_cond, pred_cond_skip, s_skip, rescale=r, original=orig)
        else:
            pred = pred_cond
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class PerturbedAttentionGuidance(_SkipLayerForward, _dg.PerturbedAttentionGuidance):
    __doc__ = "fastguide-backed " + (_dg.PerturbedAttentionGuidance.__doc__ or "")


class SkipLayerGuidance(_SkipLayerForward, _dg.SkipLayerGuidance):
    __doc__ = "fastguide-backed " + (_dg.SkipLayerGuidance.__doc__ or "")


class ClassifierFreeZeroStarGuidance(_dg.ClassifierFreeZeroStarGuidance):
    __doc__ = "fastguide-backed " + (_dg.ClassifierFreeZeroStarGuidance.__doc__ or "")

    def forward(self, pred_cond, pred_uncond=None):
        if not self._enabled:
            pred = pred_cond
        elif self._step < self.zero_init_steps:
            pred = torch.zeros_like(pred_cond)  # diffusers then rescales zeros into NaN; zeros stay zeros
        elif not self._is_cfg_enabled():
            pred = pred_cond
        else:
            pred = ops.cfg_zero_star(pred_cond, pred_uncond, float(self.guidance_scale),
                                     rescale=float(self.guidance_rescale), original=self.use_original_formulation)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class AdaptiveProjectedGuidance(_dg.AdaptiveProjectedGuidance):
    __doc__ = "fastguide-backed " + (_dg.AdaptiveProjectedGuidance.__doc__ or "")

    def forward(self, pred_cond, pred_uncond=None):
        if not self._is_apg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        theirs, buf = self.momentum_buffer, None
        if theirs is not None:
            # diffusers makes a new MomentumBuffer at step 0 (prepare_inputs); follow it with ours, zeroed
            # in place when the shape allows (CUDA-graph friendly), new otherwise. Theirs may already hold
            # a running average (a guider converted mid-trajectory by guider_from): ours starts from it.
            if getattr(self, "_fastguide_owner", None) is not theirs:
                old = getattr(self, "_fastguide_buffer", None)
                ra = old.running_average if old is not None else None
                if (ra is not None and old.momentum == float(self.adaptive_projected_guidance_momentum)
                        and ra.shape == pred_cond.shape and ra.dtype == pred_cond.dtype
                        and ra.device == pred_cond.device):
                    old.reset()
                else:
                    old = ops.MomentumBuffer(float(self.adaptive_projected_guidance_momentum))
                prior = getattr(theirs, "running_average", 0)
                if isinstance(prior, torch.Tensor):
                    if prior.shape != pred_cond.shape:
                        raise ValueError(f"fastguide AdaptiveProjectedGuidance: the momentum buffer's running "
                                         f"average has shape {tuple(prior.shape)}, the predictions "
                                         f"{tuple(pred_cond.shape)}; reset the guider (set_state at step 0)")
                    if old.running_average is None:
                        old.running_average = torch.zeros_like(pred_cond)
                    old.running_average.copy_(prior)
                self._fastguide_buffer, self._fastguide_owner = old, theirs
            buf = self._fastguide_buffer
        # diffusers clamps the norm only when the threshold is > 0: a negative one means "no clamp" there too.
        pred = ops.apg(pred_cond, pred_uncond, float(self.guidance_scale), eta=float(self.eta),
                       norm_threshold=max(float(self.adaptive_projected_guidance_rescale), 0.0), momentum_buffer=buf,
                       norm_dim=self.adaptive_projected_guidance_norm_dim, rescale=float(self.guidance_rescale),
                       original=self.use_original_formulation)
        if buf is not None:
            # Theirs shares our tensor (updated in place): the state stays readable (and convertible back)
            # through diffusers' own attribute.
            theirs.running_average = buf.running_average
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class FrequencyDecoupledGuidance(_dg.FrequencyDecoupledGuidance):
    __doc__ = "fastguide-backed " + (_dg.FrequencyDecoupledGuidance.__doc__ or "")

    def forward(self, pred_cond, pred_uncond=None):
        if not self._is_fdg_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        orig = self.use_original_formulation
        scales, weights, rescales = [], [], []
        for level, (s, w, r) in enumerate(zip(self.guidance_scales, self.parallel_weights, self.guidance_rescale)):
            if self._is_fdg_enabled_for_level(level):
                scales.append(float(s))
                weights.append(float(w))
                rescales.append(float(r))
            else:  # diffusers keeps the conditional band: scale 1 on uncond (0 on cond), no projection
                scales.append(0.0 if orig else 1.0)
                weights.append(1.0)
                rescales.append(0.0 if self.guidance_rescale_space == "freq" else float(r))
        pred = frequency.fdg(pred_cond, pred_uncond, scales, parallel_weights=weights, rescale=rescales,
                             rescale_space=self.guidance_rescale_space, original=orig)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


GUIDERS = {  # diffusers guider -> fastguide twin
    _dg.ClassifierFreeGuidance: ClassifierFreeGuidance,
    _dg.PerturbedAttentionGuidance: PerturbedAttentionGuidance,
    _dg.SkipLayerGuidance: SkipLayerGuidance,
    _dg.ClassifierFreeZeroStarGuidance: ClassifierFreeZeroStarGuidance,
    _dg.AdaptiveProjectedGuidance: AdaptiveProjectedGuidance,
    _dg.FrequencyDecoupledGuidance: FrequencyDecoupledGuidance,
}


def guider_from(guider):
    """The fastguide twin of a diffusers guider, with the same config and the same current state
    (step, windows, scales changed after construction, momentum buffer)."""
    if isinstance(guider, tuple(GUIDERS.values())):
        return guider
    cls = GUIDERS.get(type(guider))
    if cls is None:
        names = sorted(k.__name__ for k in GUIDERS)
        raise TypeError(f"fastguide.diffusers.guider_from: no fastguide twin for {type(guider).__name__}; "
                        f"supported: {names}")
    twin = cls.__new__(cls)
    twin.__dict__.update(guider.__dict__)  # config, state, hooks: everything the guider holds
    return twin
