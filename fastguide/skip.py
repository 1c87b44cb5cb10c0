"""Per-sample skipping of the unconditional branch: Adaptive Guidance, limited-interval guidance, LinearAG.

This module holds the policy only -- which samples still need an unconditional prediction at a step, and the
bookkeeping of a trajectory -- independent of how rows reach the denoiser. `fastguide.diffusers` guiders use it
(they ask the pipeline for fewer or smaller batches); the semantics are those of `fastguide.enable`'s
adaptive= / interval= / linear_ag= (`fastguide.pipelines._Guidance._skipping_call` / `_linear_ag_call`):

* AG(threshold): per sample, once cos(cond, guided) > threshold at a guided step, that sample's unconditional
  branch is not evaluated again in this trajectory (its prediction is then the conditional one). A decision
  taken at step i takes effect at step i + 1.
* interval=(sigma_lo, sigma_hi): no unconditional pass at a step whose sigma lies outside [lo, hi].
* LinearAG: at its calibrated steps the unconditional prediction is a * cond_i + b * cond_{i-1} + c * uncond_{i-1}.
"""
import math
from numbers import Real

import torch

from .pipelines import AG, LinearAG, Report

__all__ = ["NoiseSchedule", "SkipPolicy", "check_policy"]


def _is_real(v):
    return isinstance(v, Real) and not isinstance(v, bool)


def check_policy(where, adaptive=None, interval=None, linear_ag=None):
    """Validate the policy arguments (the names `fastguide.enable` uses); returns them normalised
    (interval as a tuple of floats). Raises before anything is built, naming the argument."""
    if adaptive is not None and not isinstance(adaptive, AG):
        raise TypeError(f"{where}: adaptive must be a fastguide.AG (e.g. fastguide.AG(0.991)), "
                        f"got {type(adaptive).__name__} {adaptive!r}")
    if interval is not None:
        if (not isinstance(interval, (tuple, list)) or len(interval) != 2
                or not all(_is_real(v) and not math.isnan(v) for v in interval)):
            raise ValueError(f"{where}: interval must be (sigma_lo, sigma_hi), two numbers, got {interval!r}")
        interval = (float(interval[0]), float(interval[1]))
        if interval[0] > interval[1]:
            raise ValueError(f"{where}: interval needs sigma_lo <= sigma_hi, got {interval}")
        if interval[0] < 0:
            raise ValueError(f"{where}: interval is in sigma (>= 0), got {interval}")
    if linear_ag is not None:
        if not isinstance(linear_ag, LinearAG):
            raise TypeError(f"{where}: linear_ag must be a fastguide.LinearAG (from fastguide.calibrate_linear_ag "
                            f"or fastguide.pipelines.fit_linear_ag), got {type(linear_ag).__name__}")
        n = linear_ag.num_inference_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ValueError(f"{where}: linear_ag.num_inference_steps must be an int >= 2, got {n!r}")
        for step, coef in linear_ag.coefficients.items():
            if not isinstance(step, int) or not 1 <= step < n:
                raise ValueError(f"{where}: linear_ag step {step!r} must be an int in [1, {n}) (step 0 has no "
                                 f"previous step to predict from)")
            if (not isinstance(coef, (tuple, list)) or len(coef) != 3
                    or not all(_is_real(c) and math.isfinite(c) for c in coef)):
                raise ValueError(f"{where}: linear_ag coefficients of step {step} must be three finite numbers "
                                 f"(a, b, c), got {coef!r}")
        if adaptive is not None or interval is not None:
            raise ValueError(f"{where}: linear_ag cannot be combined with adaptive or interval")
    return adaptive, interval, linear_ag


class NoiseSchedule:
    """timestep -> sigma, from a diffusers scheduler's *training* noise schedule.

    Guiders see each step's timestep (`set_state`), not the scheduler, so `interval` (in sigma, like
    `fastguide.enable`) needs this map. It is a pure function of the timestep, so it does not depend on the
    sampler's spacing, shift or custom sigmas, and it serializes (the scheduler's class name and config):
    * flow matching (FlowMatch* schedulers; UniPC / DPM-Solver with use_flow_sigmas or flow_prediction):
      timesteps are sigma * num_train_timesteps, so sigma = t / num_train_timesteps (UniPC rounds its
      timesteps to integers: sigma within 1 / num_train_timesteps);
    * every other (DDPM-family) scheduler: sigma = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]), the
      sigma Euler-type schedulers use, linearly interpolated at fractional timesteps (Karras sigmas map back
      to timesteps by a log-linear interpolation: sigma within that of adjacent training timesteps).
    """

    def __init__(self, scheduler, where="fastguide"):
        from diffusers.schedulers.scheduling_utils import SchedulerMixin
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"{where}: scheduler must be a diffusers scheduler (e.g. pipe.scheduler), "
                            f"got {type(scheduler).__name__}")
        cfg = scheduler.config
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.flow = ("FlowMatch" in type(scheduler).__name__ or bool(cfg.get("use_flow_sigmas", False))
                     or cfg.get("prediction_type") == "flow_prediction")
        self._sigmas = None
        if not self.flow:
            ac = getattr(scheduler, "alphas_cumprod", None)
            if not isinstance(ac, torch.Tensor):
                raise TypeError(f"{where}: scheduler {type(scheduler).__name__} is neither flow matching nor has "
                                f"alphas_cumprod; cannot map its timesteps to sigmas for interval")
            ac = ac.double()
            self._sigmas = ((1 - ac) / ac).sqrt()
        self.prediction_type = cfg.get("prediction_type", "epsilon") or "epsilon"
        self.class_name = type(scheduler).__name__
        self.config = {k: _jsonable(v) for k, v in cfg.items() if not k.startswith("_")}

    def sigma(self, timestep):
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.flow:
            return t / self.num_train_timesteps
        n = self._sigmas.shape[0]
        t = min(max(t, 0.0), n - 1.0)
        lo = int(math.floor(t))
        hi = min(lo + 1, n - 1)
        w = t - lo
        return float((1 - w) * self._sigmas[lo] + w * self._sigmas[hi])

    def x0(self, sample, pred, timestep):
        """The clean-image estimate from the denoiser's input `sample` (what the model sees: x_t for DDPM-family
        schedulers, i.e. the scaled model input of Euler-type ones) and its prediction, by prediction type:
        epsilon: (x - sqrt(1-a) eps) / sqrt(a); v: sqrt(a) x - sqrt(1-a) v; sample: pred; flow: x - sigma v.
        In float32 at least (AG's cosine of two such estimates)."""
        x, p = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample, pred
        p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        if self.flow:
            return x - self.sigma(timestep) * p
        s = self.sigma(timestep)             # VP sigma = sqrt((1 - a) / a)
        if self.prediction_type == "sample":
            return p
        if self.prediction_type == "v_prediction":
            c = (1.0 + s * s) ** -0.5        # sqrt(a)
            return c * x - (s * c) * p
        return (1.0 + s * s) ** 0.5 * x - s * p

    def invertible(self, timestep):
        """Whether `from_x0` exists at this timestep (sigma > 0, or a model that predicts x0 itself)."""
        return (self.prediction_type == "sample" and not self.flow) or self.sigma(timestep) >= 1e-6

    def from_x0(self, sample, x0, timestep):
        """The prediction (of this schedule's type) whose x0 estimate from `sample` is `x0`: the inverse of
        `x0`; only where `invertible(timestep)` (at sigma 0 every prediction has the same x0)."""
        s = self.sigma(timestep)
        if self.prediction_type == "sample" and not self.flow:
            return x0
        x = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample
        if self.flow:
            return (x - x0) / s
        if self.prediction_type == "v_prediction":
            c = (1.0 + s * s) ** -0.5
            return (c * x - x0) / (s * c)
        return ((1.0 + s * s) ** 0.5 * x - x0) / s

    def to_json(self):
        return {"class_name": self.class_name, "config": self.config}

    @classmethod
    def from_json(cls, value, where="fastguide"):
        import diffusers
        from diffusers.schedulers.scheduling_utils import SchedulerMixin
        name = value.get("class_name") if isinstance(value, dict) else None
        sched_cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if not (isinstance(sched_cls, type) and issubclass(sched_cls, SchedulerMixin)):
            raise ValueError(f"{where}: config entry 'scheduler' must be {{'class_name': <a diffusers scheduler>, "
                             f"'config': {{...}}}}, got {value!r}")
        return cls(sched_cls.from_config(dict(value.get("config") or {})), where)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "tolist"):  # numpy arrays and scalars
        return v.tolist()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


class SkipPolicy:
    """The per-trajectory state of one skipping policy.

    Per step: `start_step` (at the guider's set_state) decides `rows`, the samples whose unconditional
    prediction is evaluated this step: None = every sample, [] = none, else a sorted strict subset.
    `observe` (after the guided prediction of those rows) records AG's per-sample cosines. Everything resets
    at step 0 (or when the step index goes back: a new trajectory).
    """

    def __init__(self, adaptive=None, interval=None, linear_ag=None, schedule=None):
        self.adaptive, self.interval, self.linear_ag, self.schedule = adaptive, interval, linear_ag, schedule
        self.report = Report()
        self.done = None      # per sample: AG switched it off (list of bool, sized at the first guided step)
        self.history = None   # LinearAG: the previous step's (cond, uncond)
        self.rows = None
        self.step = None
        self.sigma = None
        self.in_step = False  # between start_step and the guider call of that step

    def start_step(self, step, num_inference_steps, timestep, where):
        # Everything that can fail is checked before any state changes.
        new_run = step == 0 or self.step is None or step <= self.step
        if (self.linear_ag is not None and new_run and num_inference_steps is not None
                and num_inference_steps != self.linear_ag.num_inference_steps):
            raise ValueError(f"{where}: linear_ag was calibrated for {self.linear_ag.num_inference_steps} steps, "
                             f"the pipeline runs num_inference_steps={num_inference_steps}")
        sigma = None
        if self.interval is not None:
            if timestep is None:
                raise ValueError(f"{where}: interval needs each step's timestep (set_state(..., timestep=t)), "
                                 f"got None at step {step}")
            sigma = self.schedule.sigma(timestep)
        predicted = self.linear_ag is not None and step in self.linear_ag.coefficients
        if predicted and (new_run or self.history is None):
            raise ValueError(f"{where}: LinearAG step {step} is predicted from step {step - 1}, whose "
                             f"unconditional prediction was not evaluated")
        if new_run:
            self.done, self.history, self.report = None, None, Report()
        self.step, self.sigma = step, sigma
        self.report.steps = step + 1
        if self.interval is not None and not self.interval[0] <= sigma <= self.interval[1]:
            self.rows = []
        elif predicted:
            self.rows = []
        elif self.done is None or not any(self.done):
            self.rows = None
        else:
            self.rows = [i for i, d in enumerate(self.done) if not d]
        self.in_step = True

    def check_batch(self, batch, where):
        if self.done is not None and len(self.done) != batch:
            raise ValueError(f"{where}: the batch changed from {len(self.done)} to {batch} samples within a "
                             f"trajectory (step {self.step}); start a new one at step 0")

    def size(self, batch):
        if self.done is None:
            self.done = [False] * batch
            if self.adaptive is not None or self.interval is not None:  # as fastguide.enable's report
                self.report.ag_switch_step = [None] * batch

    def observe(self, rows, cos):
        """AG: samples `rows` (indices) had cosines `cos` (floats) at this step."""
        for i, c in zip(rows, cos):
            if c > self.adaptive.threshold and not self.done[i]:
                self.done[i] = True
                self.report.ag_switch_step[i] = self.step
