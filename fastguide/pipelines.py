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
from dataclasses import dataclass, field

import torch

from . import methods, ops
from .attention import IdentityPAGProcessor, apply_pag, remove_pag

SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")


@dataclass(frozen=True)
class AG:
    """Adaptive Guidance (Castillo et al., AAAI 2025): once cos(cond, guided) of a sample exceeds `threshold`,
    stop evaluating its unconditional branch and run conditional-only steps for the rest of the trajectory.
    The cosine comes from the fused `guidance_stats` (one pass, on device); the policy reads it once per
    step (a host sync of B floats). threshold > 1 never switches (plain CFG); -1 switches after the first
    guided step. The default 0.991 is a starting point: tune it per model and scale.

    space: where the cosine is measured. "prediction": the denoiser's outputs as they are (epsilon, v or
    flow velocity). "x0": the clean-image estimates x0(cond) and x0(guided) the scheduler would form from
    them (needs the denoiser input and the noise schedule: guiders take scheduler=pipe.scheduler). On the
    lab's trained epsilon model (fastguide.lab) the epsilon cosine is not monotone along the trajectory
    (it is highest at the first step), while the x0 cosine rises steadily to 1 as the paper assumes."""
    threshold: float = 0.991
    space: str = "prediction"

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ValueError(f"fastguide.AG: threshold must be a finite float, got {self.threshold!r}")
        if self.space not in ("prediction", "x0"):
            raise ValueError(f"fastguide.AG: space must be 'prediction' or 'x0', got {self.space!r}")


@dataclass(frozen=True)
class LinearAG:
    """LinearAG (Castillo et al., AAAI 2025): at the listed steps the unconditional prediction is not evaluated
    but predicted from past estimates, u_i ~ a cond_i + b cond_{i-1} + c uncond_{i-1}, one (a, b, c) per step,
    fitted by `calibrate_linear_ag` on full-CFG runs. This DEVIATES from the base model's CFG (it is a
    learned approximation); check the result against full CFG on your own prompts. Our formulation of the
    paper's affine predictor; the coefficients are per step and shared by all pixels and samples."""
    coefficients: dict  # step -> (a, b, c)
    num_inference_steps: int


def fit_linear_ag(history, steps):
    """Least-squares (a, b, c) per step from recorded trajectories: history is a list (one per calibration run)
    of per-step (cond, uncond) predictions. fp64 normal equations of three regressors."""
    coefficients = {}
    for i in steps:
        if i < 1:
            raise ValueError(f"fastguide.fit_linear_ag: step {i} has no previous step to predict from")
        xs, ys = [], []
        for run in history:
            (c_prev, u_prev), (c_i, u_i) = run[i - 1], run[i]
            xs.append(torch.stack([c_i.flatten(), c_prev.flatten(), u_prev.flatten()], 1).double())
            ys.append(u_i.flatten().double())
        X, y = torch.cat(xs), torch.cat(ys)
        sol = torch.linalg.lstsq(X.cpu(), y.cpu()[:, None]).solution.flatten()
        coefficients[i] = tuple(float(v) for v in sol)
    return coefficients


def calibrate_linear_ag(pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps, steps=None, **call_kwargs):
    """Fit LinearAG coefficients on full-CFG runs of `pipe` (one run per (prompt_embeds[k], negative[k]) pair;
    pass other pipeline arguments, e.g. guidance_scale, height, width, generator, in call_kwargs).
    `steps` (default: every other step of the first half, from step 1) are the steps whose unconditional
    pass LinearAG will replace. Returns a LinearAG for `enable(pipe, linear_ag=...)`."""
    if steps is None:
        steps = list(range(1, num_inference_steps // 2, 2))
    steps = sorted(int(s) for s in steps)
    if any(not 1 <= s < num_inference_steps for s in steps):
        raise ValueError(f"fastguide.calibrate_linear_ag: steps must lie in [1, {num_inference_steps}), got {steps}")
    previous = getattr(pipe, "_fastguide", None)
    history = []
    try:
        for pos, neg in zip(prompt_embeds, negative_prompt_embeds):
            enable(pipe, guidance="cfg")
            pipe._fastguide.record = []
            with torch.no_grad():
                pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=num_inference_steps,
                     output_type="latent", **call_kwargs)
            history.append(pipe._fastguide.record)
    finally:
        disable(pipe)
        if previous is not None:
            enable(pipe, previous.guidance, adaptive=previous.adaptive, interval=previous.interval,
                   linear_ag=previous.linear_ag, **{k: v for k, v in previous.params.items()
                                                   if v != previous.method.params[k]})
    return LinearAG(fit_linear_ag(history, steps), num_inference_steps)


@dataclass
class Report:
    """What guidance cost in one pipeline call (per-sample network evaluations)."""
    steps: int = 0
    nfe: int = 0                 # denoiser rows evaluated (one row = one sample's prediction)
    nfe_skipped: int = 0         # unconditional rows not evaluated (interval or AG)
    ag_switch_step: list = field(default_factory=list)  # per sample: step where AG stopped the uncond pass


class _Guidance:
    """The per-pipeline state: the method and its settings, the step counter, the method's state across
    steps (APG's momentum buffer), the AG/interval policy."""

    def __init__(self, pipe, denoiser, guidance, params, adaptive=None, interval=None, linear_ag=None):
        self.method = methods.get(guidance, "fastguide.enable")
        if adaptive is not None and not isinstance(adaptive, AG):
            raise TypeError(f"fastguide.enable: adaptive must be a fastguide.AG, got {type(adaptive).__name__}")
        if interval is not None:
            if (not isinstance(interval, (tuple, list)) or len(interval) != 2
                    or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in interval)):
                raise ValueError(f"fastguide.enable: interval must be (sigma_lo, sigma_hi), got {interval!r}")
            if interval[0] > interval[1]:
                raise ValueError(f"fastguide.enable: interval needs sigma_lo <= sigma_hi, got {tuple(interval)}")
        if linear_ag is not None and not isinstance(linear_ag, LinearAG):
            raise TypeError(f"fastguide.enable: linear_ag must be a fastguide.LinearAG, got {type(linear_ag).__name__}")
        if linear_ag is not None and (adaptive is not None or interval is not None):
            raise ValueError("fastguide.enable: linear_ag cannot be combined with adaptive or interval")
        if ((adaptive is not None or interval is not None or linear_ag is not None)
                and not self.method.can_skip_uncond):
            usable = sorted(m.name for m in methods.METHODS.values() if m.can_skip_uncond)
            raise ValueError(f"fastguide.enable: adaptive/interval/linear_ag skip rows per sample; guidance={guidance!r} "
                             f"(state across steps or extra branches) is not supported with them yet; use one of {usable}")
        self.linear_ag = linear_ag
        self.record = None      # calibration: per-step (cond, uncond) of full-CFG runs
        self.history = None     # LinearAG: the previous step's (cond, uncond)
        self.adaptive, self.interval = adaptive, (tuple(map(float, interval)) if interval is not None else None)
        self.report = Report()
        self.done = None  # per-sample AG flags of the current trajectory
        self.pipe, self.denoiser, self.guidance = pipe, denoiser, guidance
        self.params = self.method.check_params(params, "fastguide.enable")
        self.step, self.last_t = 0, None
        self.state = self.method.new_state(self.params) if self.method.new_state is not None else None
        self.processor = None

    def _scale(self, name="scale"):
        """A scale setting: None follows the pipeline call's guidance_scale; a callable is a per-step schedule
        `f(step, timestep) -> float or tensor` (a tensor scale changes per step without recompiling)."""
        value = self.params[name]
        if value is None:
            return float(self.pipe.guidance_scale)
        return value(self.step, self.last_t) if callable(value) else value

    def _new_step(self, timestep):
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.last_t is None or t > self.last_t:  # timesteps decrease within a trajectory: a new one began
            self.step = 0
            self.done = None
            self.report = Report()
            self.pipe.fastguide_report = self.report
            if self.method.reset_state is not None:
                self.method.reset_state(self.state)
        else:
            self.step += 1
        self.last_t = t
        self.report.steps = self.step + 1
        return t

    def _sigma(self, t):
        """The noise level of timestep t: the scheduler's sigma (Euler, flow matching), else sqrt((1-a)/a)."""
        sch = self.pipe.scheduler
        ts = getattr(sch, "timesteps", None)
        sigmas = getattr(sch, "sigmas", None)
        if ts is not None and sigmas is not None and len(sigmas) > len(ts) - 1:
            idx = (ts.float() - t).abs().argmin().item()
            return float(sigmas[idx])
        ac = sch.alphas_cumprod[int(round(t))]
        return float(((1 - ac) / ac) ** 0.5)

    def guide(self, cond, uncond, perturbed):
        """The method's combine on this step's predictions, its scales resolved for this step."""
        p = dict(self.params)
        for name in self.method.scale_params:
            p[name] = self._scale(name)
        preds = {"cond": cond, "uncond": uncond, "perturbed": perturbed}
        return self.method.combine(preds, p, self.state, self.step)

    def __call__(self, forward, args, kwargs):
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return forward(*args, **kwargs)
        bound = inspect.signature(forward).bind(*args, **kwargs)
        sample_name = next(iter(bound.arguments))  # sample / hidden_states: the batched latents
        batch = bound.arguments[sample_name].shape[0]
        half = batch // 2
        t = self._new_step(bound.arguments["timestep"])
        if self.adaptive is not None or self.interval is not None:
            return self._skipping_call(forward, bound, batch, half, t)
        if self.linear_ag is not None:
            return self._linear_ag_call(forward, bound, batch, half)
        pag = "perturbed" in self.method.branches
        if pag:  # [uncond, cond] -> [uncond, cond, cond]: every input batched like the latents gets its cond half again
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: torch.cat([v, v[half:]]))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        parts = pred.chunk(3 if pag else 2)
        if self.record is not None:
            self.record.append((parts[1].detach().clone(), parts[0].detach().clone()))
        return _with_prediction(out, self.guide(parts[1], parts[0], parts[2] if pag else None))

    def _linear_ag_call(self, forward, bound, batch, half):
        """LinearAG: at calibrated steps, run the conditional rows only and predict the unconditional ones."""
        if self.step == 0:
            self.history = None
        coef = self.linear_ag.coefficients.get(self.step)
        if coef is not None and self.history is None:
            raise ValueError(f"fastguide LinearAG: step {self.step} is predicted from the previous step, which did not run")
        if coef is not None:
            idx = torch.arange(half, batch, device=bound.arguments[next(iter(bound.arguments))].device)
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: v.index_select(0, idx.to(v.device)))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        if coef is None:
            uncond, cond = pred.chunk(2)
            self.report.nfe += batch
        else:
            cond = pred
            a, b, c = coef
            c_prev, u_prev = self.history
            uncond = a * cond + b * c_prev + c * u_prev
            self.report.nfe += half
            self.report.nfe_skipped += half
        self.history = (cond, uncond)
        return _with_prediction(out, self.guide(cond, uncond, None))

    def _skipping_call(self, forward, bound, batch, half, t):
        """Evaluate the unconditional rows only of samples that still need guidance (interval, AG)."""
        if self.done is None:
            self.done = [False] * half
            self.report.ag_switch_step = [None] * half
        in_interval = self.interval is None or self.interval[0] <= self._sigma(t) <= self.interval[1]
        guided = [i for i in range(half) if in_interval and not self.done[i]]
        rows = guided + list(range(half, batch))  # uncond rows still needed, then every cond row
        if len(rows) < batch:
            idx = torch.tensor(rows, device=bound.arguments[next(iter(bound.arguments))].device)
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: v.index_select(0, idx.to(v.device)))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += len(rows)
        self.report.nfe_skipped += batch - len(rows)
        n = len(guided)
        cond = pred[n:]
        result = cond.clone() if n < half else None
        if n:
            gidx = torch.tensor(guided, device=pred.device)
            g = self.guide(cond.index_select(0, gidx), pred[:n], None)
            if self.adaptive is not None:
                cos = ops.guidance_stats(cond.index_select(0, gidx), g, g).cos_cond_guided.tolist()  # the policy's sync
                for i, c in zip(guided, cos):
                    if c > self.adaptive.threshold and not self.done[i]:
                        self.done[i] = True
                        self.report.ag_switch_step[i] = self.step
            if result is None:
                result = g
            else:
                result.index_copy_(0, gidx, g)
        return _with_prediction(out, result)


def _prediction(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _with_prediction(out, guided):
    """The denoiser's output with [guided, guided] as its prediction: the pipeline's CFG then yields guided."""
    both = torch.cat([guided, guided])
    if isinstance(out, tuple):
        return (both,) + tuple(out[1:])
    out.sample = both
    return out


def _map_batched(value, batch, fn):
    """Apply fn to every tensor batched like the latents (dim 0 == batch), inside dicts too (SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_batched(v, batch, fn) for k, v in value.items()}
    return value


def _denoiser(pipe):
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise TypeError(f"fastguide.enable: {name} is not supported; supported pipelines: {', '.join(SUPPORTED)}")
    return pipe.transformer if name == "StableDiffusion3Pipeline" else pipe.unet


def enable(pipe, guidance="cfg", *, adaptive=None, interval=None, linear_ag=None, **params):
    """Make `pipe`'s classifier-free guidance compute `guidance` with fastguide's fused ops.

    guidance: "cfg" (scale, rescale, original), "apg" (scale, eta, norm_threshold, momentum, norm_dim,
    rescale, original), "pag" (scale, pag_scale, layers, rescale, original), "cfg_zero_star" (scale,
    zero_init_steps, rescale, original), "frequency" (scale_low, scale_high, method, cutoff, size, rescale,
    original), "fdg" (scales, parallel_weights, rescale, original). A scale left as None follows the
    pipeline call's guidance_scale; a callable `f(step, timestep)` is a per-step schedule.
    adaptive=fastguide.AG(threshold): Adaptive Guidance, per sample. interval=(sigma_lo, sigma_hi):
    limited-interval guidance (Kynkaeaenniemi et al. 2024), no unconditional pass outside it. With either,
    the denoiser runs only the rows that are needed; `pipe.fastguide_report` counts the evaluations.
    linear_ag=calibrate_linear_ag(...): LinearAG, predicted unconditional passes (deviates from the model).
    Returns the pipeline.
    """
    denoiser = _denoiser(pipe)
    state = _Guidance(pipe, denoiser, guidance, params, adaptive, interval, linear_ag)  # validates first
    disable(pipe)
    if "perturbed" in state.method.branches:
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
