"""The lab's model as a diffusers `DiffusionPipeline` that takes a guider, like diffusers' modular pipelines.

    pipe = fastguide.lab.pipeline()
    out = pipe(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=20, generator=g)
    out.images        # [2, 1, 8, 8] in [0, 1]
    out.nfe           # denoiser rows evaluated (one row = one sample's prediction)

The denoising loop follows diffusers' guider protocol exactly (`set_state` -> `prepare_inputs` -> one
batch per branch -> `guider(batches)`), so any diffusers guider, any `fastguide.diffusers` guider, and
whatever the guider decides about its branches (Adaptive Guidance dropping the unconditional one) runs
here as it does in a modular pipeline. The conditional branch gets the digit labels, the unconditional
one the null class (10). Branches that need no model change (no `prepare_models` hooks, e.g. CFG, APG)
run as ONE forward of the concatenated batches; branches with hooks (PAG's perturbed attention) run
one forward each, between `prepare_models` / `cleanup_models`.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import DiffusionPipeline
from diffusers.guiders.guider_utils import BaseGuidance
from diffusers.utils import BaseOutput

from . import data


@dataclass
class DigitsOutput(BaseOutput):
    images: torch.Tensor          # [B, 1, 8, 8] in [0, 1] ("pt"), numpy for "np", model space for "latent"
    nfe: int                      # denoiser rows evaluated over the whole run
    out_of_range: Optional[float] = None  # fraction of final pixels outside [-1, 1] before clipping


class DigitsPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"
    _optional_components = ["guider"]

    def __init__(self, unet, scheduler, guider=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, guider=guider)

    def _guider(self, guider, guidance_scale):
        from ..diffusers import ClassifierFreeGuidance
        guider = guider if guider is not None else self.guider
        if guider is None:
            return ClassifierFreeGuidance(guidance_scale=3.0 if guidance_scale is None else float(guidance_scale))
        if not isinstance(guider, BaseGuidance):
            raise TypeError(f"DigitsPipeline: guider must be a diffusers guider (BaseGuidance), got {type(guider).__name__}")
        if guidance_scale is not None and not hasattr(guider, "guidance_scale"):
            raise ValueError(f"DigitsPipeline: guidance_scale given, but {type(guider).__name__} has no "
                             f"guidance_scale; set the guider's own scales instead")
        return guider

    def _denoise(self, guider, batches, t):
        """Set `noise_pred` on every branch batch: one forward for all branches when the guider puts no hooks on
        the model (its prepare_models is diffusers' base one, e.g. diffusers' own CFG); fastguide's guiders
        override prepare_models (row slicing, reading the denoiser input) and run one forward per branch."""
        hooks = type(guider).prepare_models is not BaseGuidance.prepare_models
        if len(batches) > 1 and not hooks:
            sample = torch.cat([b.sample for b in batches])
            labels = torch.cat([b.class_labels for b in batches])
            preds = self.unet(sample, t, class_labels=labels).sample.split([len(b.sample) for b in batches])
            for b, p in zip(batches, preds):
                b.noise_pred = p
            return sum(len(b.sample) for b in batches)
        for b in batches:
            guider.prepare_models(self.unet)
            b.noise_pred = self.unet(b.sample, t, class_labels=b.class_labels).sample
            guider.cleanup_models(self.unet)
        return sum(len(b.sample) for b in batches)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale=None, num_inference_steps=20, generator=None, output_type="pt",
                 guider=None, latents=None, return_dict=True):
        """class_labels: digits 0..9 (10 = the null class: unconditional sampling). guidance_scale: the
        default CFG guider's scale (3.0), or the scale of `guider` / `self.guider` for this call.
        output_type: "pt" (images in [0, 1]), "np", or "latent" (model space, unclipped)."""
        labels = torch.as_tensor(class_labels, dtype=torch.int64, device=self.device).flatten()
        if labels.numel() == 0 or labels.min() < 0 or labels.max() > data.NULL_CLASS:
            raise ValueError(f"DigitsPipeline: class_labels must be a non-empty list of ints in 0..{data.NULL_CLASS} "
                             f"(10 = unconditional), got {class_labels!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"DigitsPipeline: num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if output_type not in ("pt", "np", "latent"):
            raise ValueError(f"DigitsPipeline: output_type must be 'pt', 'np' or 'latent', got {output_type!r}")
        guider = self._guider(guider, guidance_scale)
        # guidance_scale overrides the guider's for this call only, on the guider itself (not a copy), so
        # its state and report (AG, interval) stay readable afterwards; restored even when the call raises.
        saved = getattr(guider, "guidance_scale", None)
        if guidance_scale is not None:
            guider.guidance_scale = float(guidance_scale)
        try:
            return self._sample(guider, labels, num_inference_steps, generator, output_type, latents, return_dict)
        finally:
            if guidance_scale is not None:
                guider.guidance_scale = saved

    def _sample(self, guider, labels, num_inference_steps, generator, output_type, latents, return_dict):
        n = len(labels)
        shape = (n, 1, data.SIZE, data.SIZE)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype, device="cpu").to(self.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"DigitsPipeline: latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = latents * self.scheduler.init_noise_sigma
        null = torch.full_like(labels, data.NULL_CLASS)
        nfe = 0
        for i, t in enumerate(self.scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=num_inference_steps, timestep=t)
            x_in = self.scheduler.scale_model_input(x, t)
            batches = guider.prepare_inputs({"sample": x_in, "class_labels": (labels, null)})
            nfe += self._denoise(guider, batches, t)
            eps = guider(batches).pred
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        out_of_range = (x.abs() > 1).float().mean().item()
        if output_type == "latent":
            images = x
        else:
            images = ((x.clamp(-1, 1) + 1) / 2).float()
            if output_type == "np":
                images = images.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nfe
        return DigitsOutput(images=images, nfe=nfe, out_of_range=out_of_range)
