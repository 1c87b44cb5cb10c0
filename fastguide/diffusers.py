"""Drop-in diffusers guiders whose `forward` runs fastguide's fused ops.

Each class subclasses diffusers' own guider: same constructor, same config (so `save_pretrained` /
`from_pretrained` round-trip), same step logic (start/stop windows, zero-init steps, momentum reset at
step 0, enabled flags) inherited unchanged. The math goes through `fastguide.cfg / pag / cfg_zero_star /
apg / fdg / guidance_stats` (MAG, TCFG, APMix and LTX-2's combines: `fastguide.methods.mag / tcfg / apg_mix /
ltx2`). Every guider of diffusers 0.42 has its twin here (`GUIDERS`).

    from fastguide.diffusers import ClassifierFreeGuidance     # instead of diffusers.guiders
    guider = fastguide.diffusers.guider_from(pipe.guider)      # convert an existing one

Skipping the unconditional pass (the names `fastguide.enable` uses), on the guiders that combine exactly
cond / uncond (CFG, CFG-Zero*, FDG, MAG, TCFG, AutoGuidance, APG and APMix -- their momentum kept per
sample; `SKIPPING` lists them; PAG / SLG / SEG / LTX-2 raise at construction):

    guider = ClassifierFreeGuidance(guidance_scale=5.0, adaptive=fastguide.AG(0.991))
    guider = ClassifierFreeGuidance(guidance_scale=5.0, interval=(0.28, 5.42), scheduler=pipe.scheduler)
    guider = ClassifierFreeGuidance(guidance_scale=5.0, linear_ag=fastguide.LinearAG({...}, num_inference_steps))

The guider asks the pipeline for the batches it needs through the guider protocol itself (`num_conditions`,
`prepare_inputs`), so every modular pipeline skips the unconditional network pass with no pipeline code:
* when no sample needs it (outside the interval, every sample switched by AG, a LinearAG step), the step has
  one condition and `prepare_inputs` returns the conditional batch only;
* when only some samples still need it (AG switched the others), the unconditional batch is sliced to those
  rows: every tensor of its BlockState batched like the samples, and -- through `prepare_models`, which
  pipelines call with the denoiser before each batch -- every input of the denoiser call batched like the
  samples (the latents and timesteps that pipelines pass from their own state). "Batched like the samples"
  means dim 0 == batch size, as in `fastguide.enable`: an unbatched input whose first dimension happens to
  equal the batch size would be sliced too. The guided rows are combined, the others return their
  conditional prediction (`GuiderOutput.pred_uncond` holds the rows evaluated).
A decision taken in `forward` (AG) takes effect from the next step; the step index is set_state's.
`interval` is in sigma, like `fastguide.enable`'s. A guider sees timesteps only, so it needs `scheduler=`:
sigma is a function of the timestep under the scheduler's training noise schedule (flow matching:
t / num_train_timesteps; otherwise sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])), independent of the
sampler's spacing or shift, and serialized with the guider (`skip.NoiseSchedule`).
`guider.report` (a `fastguide.pipelines.Report`, new at step 0) counts the evaluations of the last run.
The policy (AG threshold, interval and noise schedule, LinearAG coefficients) is part of the config: it
survives `save_pretrained` / `from_pretrained`, alone or in a pipeline (a modular pipeline saves the guider
only when it was loaded from a directory, as diffusers does for its own guiders).

Differences from diffusers, all documented in tests/test_diffusers_guiders.py: guidance rescale of a
prediction with zero std returns it unrescaled instead of NaN (diffusers issue #13425) -- this includes
CFG-Zero*'s zero-init steps with rescale > 0, where diffusers returns NaN and fastguide zeros; APG's
projection runs in fp32 (diffusers: float64), within fp32 rounding. In tests/test_diffusers_twins.py: MAG
runs on [B, C, H, W] (diffusers' torch.norm over 3 dims raises); TCFG's `is_conditional` works (diffusers reads
an attribute nothing sets) and its projection comes from the 2 x 2 Gram matrix (more accurate than diffusers'
fp32 SVD on large inputs); AutoGuidance / SEG take `*_layers=[...]` (diffusers builds configs with int
indices that its hooks cannot read); SEG's blurred batch is really blurred, with the official blur
(diffusers never installs its hooks, and its blur swaps the finite / infinite branches).
"""
import contextlib
import inspect

import torch
from diffusers import guiders as _dg
# Re-exported on purpose: a pipeline's model_index.json names a component's library by its module
# ("fastguide.diffusers"), and diffusers' loader decides how to load the class by looking the names of
# LOADABLE_CLASSES (BaseGuidance among them) up in that module. Without this name, from_pretrained of a
# pipeline holding a fastguide guider fails with "does not seem to have any of the loading methods".
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.hooks import HookRegistry
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES, _get_submodule_from_fqn
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook

from . import frequency, methods, ops
from . import methods as _methods
from .attention import seg_blur_
from .pipelines import AG, LinearAG
from .skip import NoiseSchedule, SkipPolicy, check_policy

__all__ = ["AdaptiveProjectedGuidance", "AdaptiveProjectedMixGuidance", "AutoGuidance", "BaseGuidance",
           "ClassifierFreeGuidance", "ClassifierGuidance", "ClassifierFreeZeroStarGuidance",
           "CFGPlusPlusGuidance", "FrequencyDecoupledGuidance", "LTX2Guidance", "MagnitudeAwareGuidance", "MultiBranchGuidance",
           "PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance",
           "TangentialClassifierFreeGuidance", "guider_from",
           "recording", "GUIDERS", "SKIPPING"]

POLICY_ARGS = ("adaptive", "interval", "linear_ag", "scheduler")


# --- the policy arguments: construction, validation, config ------------------------------------------
def _encode(adaptive, interval, linear_ag, schedule):
    """The policy as JSON-able config entries (only those that are set, so a guider without a policy has
    exactly its diffusers twin's config)."""
    out = {}
    if adaptive is not None:
        out["adaptive"] = {"threshold": float(adaptive.threshold), "space": adaptive.space}
    if interval is not None:
        out["interval"] = list(interval)
    if linear_ag is not None:
        out["linear_ag"] = {"num_inference_steps": linear_ag.num_inference_steps,
                            "coefficients": [[s, *map(float, c)] for s, c in sorted(linear_ag.coefficients.items())]}
    if schedule is not None:
        out["scheduler"] = schedule.to_json()
    return out


def _decode(name, value, where):
    """A config entry back into the constructor's argument. Live objects pass through unchanged (so
    `guider.new(adaptive=AG(...))` works); a malformed entry raises naming it."""
    try:
        if name == "adaptive" and isinstance(value, dict):
            # configs written before AG had a space measured in the prediction space: keep their meaning
            return AG(**{"space": "prediction", **value})
        if name == "interval" and isinstance(value, list):
            return tuple(value)
        if name == "linear_ag" and isinstance(value, dict):
            return LinearAG({int(s): tuple(c) for s, *c in value["coefficients"]}, int(value["num_inference_steps"]))
        if name == "scheduler" and isinstance(value, dict):
            return NoiseSchedule.from_json(value, where)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: cannot read config entry {name!r} = {value!r}: {e}") from e
    return value


class _PolicyArgs:
    """Every fastguide guider accepts adaptive= / interval= / linear_ag= / scheduler=; those that cannot skip
    rows (`_cannot_skip` gives the reason) raise at construction, listing the guiders that can."""

    _skip = None  # the SkipPolicy, None without a policy (also on guider_from twins)
    _par = None   # fastguide.parallel's state when the guider is distributed (it then slices every branch's rows)

    def _cannot_skip(self):
        return None

    def _configure(self, adaptive, interval, linear_ag, scheduler):
        """Validate and install a policy. Raises before touching the guider."""
        where = f"fastguide.diffusers.{type(self).__name__}"
        adaptive, interval, linear_ag = check_policy(where, adaptive, interval, linear_ag)
        if isinstance(scheduler, NoiseSchedule):
            schedule = scheduler
        elif scheduler is not None:
            schedule = NoiseSchedule(scheduler, where)
        else:
            schedule = None
        if interval is not None and schedule is None:
            raise ValueError(f"{where}: interval=(sigma_lo, sigma_hi) is in sigma and the guider only sees timesteps; "
                             f"pass scheduler=pipe.scheduler so it can map each step's timestep to its sigma")
        if adaptive is not None and adaptive.space == "x0" and schedule is None:
            raise ValueError(f"{where}: adaptive=AG(space='x0') measures the cosine of the x0 estimates, which needs "
                             f"the noise schedule: pass scheduler=pipe.scheduler (or use AG(space='prediction'))")
        given = [n for n, v in (("adaptive", adaptive), ("interval", interval), ("linear_ag", linear_ag))
                 if v is not None]
        policy = bool(given)
        reason = self._cannot_skip()
        if policy and reason is not None:
            raise ValueError(f"{where}: {' / '.join(given)} skips the unconditional pass per sample, which this "
                             f"guider cannot do ({reason}); guiders that can: {sorted(SKIPPING)}")
        self._skip = SkipPolicy(adaptive, interval, linear_ag, schedule) if policy else None
        self._schedule = schedule
        self._rows_hook = None
        entries = _encode(adaptive, interval, linear_ag, schedule)
        if entries:
            self.register_to_config(**entries)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        init, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        where = f"fastguide.diffusers.{cls.__name__}.from_config"
        for name in POLICY_ARGS:
            if name in init:
                init[name] = _decode(name, init[name], where)
        return init, unused, hidden

    @property
    def report(self):
        """What guidance cost in the current / last trajectory (a fastguide.pipelines.Report; None without
        a policy): steps, denoiser rows evaluated, unconditional rows skipped, AG's switch step per sample."""
        return self._skip.report if self._skip is not None else None


def _policy_init(base):
    """An __init__ for the twin of `base`: base's parameters plus the policy ones (keyword-only).

    The signature is published (`__signature__`) because diffusers' ConfigMixin reads the constructor's
    parameters to decide which config entries `from_config` passes back. Base's own (decorated) __init__
    registers its config as in diffusers; the policy is registered after it, in its JSON form."""
    base_init = base.__init__
    sig = inspect.signature(base_init)

    def __init__(self, *args, adaptive=None, interval=None, linear_ag=None, scheduler=None, **kwargs):
        # Type/shape errors of the policy first, before diffusers' constructor runs.
        check_policy(f"fastguide.diffusers.{type(self).__name__}", adaptive, interval, linear_ag)
        base_init(self, *args, **kwargs)
        self._configure(adaptive, interval, linear_ag, scheduler)

    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in POLICY_ARGS]
    __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    __init__.__doc__ = base_init.__doc__
    return __init__


def _batched_rows(value, batch, idx):
    """value with every tensor batched like the samples (dim 0 == batch) reduced to rows idx, inside dicts,
    lists and tuples too (SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, idx.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: _batched_rows(v, batch, idx) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_batched_rows(v, batch, idx) for v in value)
    return value


class _Skipping(_PolicyArgs):
    """The guider side of the skipping policy (see the module docstring). Subclasses provide `_guide(cond,
    uncond, rows=None)`, the combine of any number of rows (`rows`: their indices in the full batch when they
    are a subset, for per-sample state such as APG's momentum), and may override `_unguided` / `_ag_observes`."""

    def _unguided(self, pred_cond):
        """The prediction of a sample whose unconditional branch was skipped."""
        return pred_cond

    def _ag_observes(self):
        """Whether this step's guided prediction is a guidance of cond that AG's cosine can judge."""
        return True

    # -- protocol ----------------------------------------------------------------------------------
    def set_state(self, step, num_inference_steps, timestep):
        self._sample = None  # this step's denoiser input, when the guider needs it (x0 space)
        if self._skip is not None:
            self._skip.start_step(step, num_inference_steps, timestep, f"fastguide.diffusers.{type(self).__name__}")
        super().set_state(step, num_inference_steps, timestep)

    @property
    def num_conditions(self):
        n = super().num_conditions
        # The policy counts only inside a step (set_state .. guider call): before the loop pipelines read
        # num_conditions to decide whether to encode negative prompts, and a new trajectory may need them.
        if n == 2 and self._skip is not None and self._skip.in_step and self._skip.rows == []:
            return 1
        return n

    def _partial(self):
        """The guided rows as an index tensor when only some samples' unconditional pass runs, else None."""
        skip = self._skip
        if skip is None or not skip.in_step or not skip.rows or super().num_conditions != 2:
            return None
        return torch.tensor(skip.rows, dtype=torch.long)

    def _slice_uncond(self, batches):
        idx = self._partial()
        if idx is None or len(batches) < 2 or self._par is not None:  # branch-parallel: fastguide.parallel slices
            return batches
        from diffusers.modular_pipelines.modular_pipeline import BlockState
        batch, uncond = len(self._skip.done), batches[1]
        batches[1] = BlockState(**{k: _batched_rows(v, batch, idx) for k, v in uncond.as_dict().items()})
        return batches

    def prepare_inputs(self, data):
        return self._slice_uncond(super().prepare_inputs(data))

    def prepare_inputs_from_block_state(self, data, input_fields):
        return self._slice_uncond(super().prepare_inputs_from_block_state(data, input_fields))

    def _wants_sample(self):
        skip = self._skip
        ag_x0 = skip is not None and skip.in_step and skip.adaptive is not None and skip.adaptive.space == "x0"
        return (ag_x0 or getattr(self, "_space", "prediction") == "x0" or self._needs_sample) and self.is_conditional

    _needs_sample = False  # guiders whose combine reads the denoiser's input (classifier guidance)

    def prepare_models(self, denoiser):
        super().prepare_models(denoiser)
        if self._wants_sample() and isinstance(denoiser, torch.nn.Module):
            # AG in x0 space needs the denoiser's input: read it off the conditional call (the pipeline passes
            # it to the denoiser, not to the guider). First positional argument, or sample= / hidden_states=.
            def capture(module, args, kwargs):
                x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
                self._sample = x

            self._remove_capture()
            self._capture_hook = denoiser.register_forward_pre_hook(capture, with_kwargs=True)
        idx = self._partial()
        if idx is not None and not self.is_conditional and isinstance(denoiser, torch.nn.Module) and self._par is None:
            # The unconditional batch of a partly switched step: the pipeline passes its own inputs (latents,
            # timesteps) at full batch, so the denoiser call gets them reduced to the guided rows here.
            batch = len(self._skip.done)

            def rows_only(module, args, kwargs):
                return _batched_rows(args, batch, idx), _batched_rows(kwargs, batch, idx)

            self._remove_hook()
            self._rows_hook = denoiser.register_forward_pre_hook(rows_only, with_kwargs=True)

    def cleanup_models(self, denoiser):
        self._remove_hook()
        self._remove_capture()
        super().cleanup_models(denoiser)

    def _remove_capture(self):
        if getattr(self, "_capture_hook", None) is not None:
            self._capture_hook.remove()
            self._capture_hook = None

    def _remove_hook(self):
        if getattr(self, "_rows_hook", None) is not None:
            self._rows_hook.remove()
            self._rows_hook = None

    _recording = None  # a list of runs while `recording(guider)` is active

    def _record(self, pred_cond, pred_uncond):
        """LinearAG calibration: every step whose two branches ran on every sample, per run, by step index."""
        runs = self._recording
        if runs is None or pred_uncond is None or pred_uncond.shape[0] != pred_cond.shape[0]:
            return
        if self._step == 0 or not runs:
            runs.append({})
        runs[-1][self._step] = (pred_cond.detach().clone(), pred_uncond.detach().clone())

    def forward(self, pred_cond, pred_uncond=None):
        self._record(pred_cond, pred_uncond)
        skip = self._skip
        if skip is None or not skip.in_step:
            return GuiderOutput(pred=self._guide(pred_cond, pred_uncond), pred_cond=pred_cond, pred_uncond=pred_uncond)
        where = f"fastguide.diffusers.{type(self).__name__}"
        batch = pred_cond.shape[0]
        skip.check_batch(batch, where)
        rows = skip.rows
        guided_step = super().num_conditions == 2  # the base guider guides this step (windows, scale != 1)
        expected = 0 if not guided_step or rows == [] else (batch if rows is None else len(rows))
        got = 0 if pred_uncond is None else pred_uncond.shape[0]
        if got != expected:  # checked before any state changes
            raise ValueError(f"{where}: step {skip.step} expects an unconditional prediction of {expected} rows, "
                             f"got {got}")
        if (skip.adaptive is not None and skip.adaptive.space == "x0" and expected and self._ag_observes()
                and (not isinstance(self._sample, torch.Tensor) or self._sample.shape != pred_cond.shape)):
            x = self._sample
            raise ValueError(f"{where}: AG(space='x0') needs the denoiser's input sample of the conditional branch "
                             f"(shape {tuple(pred_cond.shape)}), got {None if x is None else tuple(getattr(x, 'shape', ()))}; "
                             f"run the denoiser between guider.prepare_models / cleanup_models, or use "
                             f"AG(space='prediction')")
        report = skip.report
        report.nfe += batch + got
        if not guided_step:
            pred = self._guide(pred_cond, None)
            skip.history = None
        elif rows == [] and skip.linear_ag is not None:  # a LinearAG step: uncond predicted
            a, b, c = skip.linear_ag.coefficients[skip.step]
            cond_prev, uncond_prev = skip.history
            uncond = a * pred_cond + b * cond_prev + c * uncond_prev
            pred = self._guide(pred_cond, uncond)
            skip.history = (pred_cond, uncond)
            report.nfe_skipped += batch
        elif rows == []:  # outside the interval, or every sample switched
            pred = self._unguided(pred_cond)
            report.nfe_skipped += batch
        else:
            skip.size(batch)
            if rows is None:
                cond_rows, idx = pred_cond, None
                pred = guided = self._guide(pred_cond, pred_uncond)
            else:
                idx = torch.tensor(rows, device=pred_cond.device)
                cond_rows = pred_cond.index_select(0, idx)
                guided = self._guide(cond_rows, pred_uncond, rows=idx)
                pred = self._unguided(pred_cond).clone().index_copy_(0, idx, guided)
                report.nfe_skipped += batch - len(rows)
            if skip.adaptive is not None and self._ag_observes():
                a, b = cond_rows, guided
                if skip.adaptive.space == "x0":
                    x = self._sample
                    if idx is not None:
                        x = x.index_select(0, idx)
                    a = skip.schedule.x0(x, cond_rows, self._timestep)
                    b = skip.schedule.x0(x, guided, self._timestep)
                cos = ops.guidance_stats(a, b, b).cos_cond_guided.tolist()  # the policy's sync
                skip.observe(range(batch) if rows is None else rows, cos)
            skip.history = (pred_cond, pred_uncond) if skip.linear_ag is not None else None
        skip.in_step = False
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


# --- the guiders ------------------------------------------------------------------------------------
class ClassifierFreeGuidance(_Skipping, _dg.ClassifierFreeGuidance):
    __doc__ = "fastguide-backed " + (_dg.ClassifierFreeGuidance.__doc__ or "")
    __init__ = _policy_init(_dg.ClassifierFreeGuidance)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_cfg_enabled():
            return pred_cond  # diffusers' rescale of pred_cond against itself is the identity
        return ops.cfg(pred_cond, pred_uncond, float(self.guidance_scale), rescale=float(self.guidance_rescale),
                       original=self.use_original_formulation)


def __getattr__(name):  # ClassifierGuidance moved to fastguide.classifier (which imports this module): lazy re-export
    if name == "ClassifierGuidance":
        from .classifier import ClassifierGuidance
        return ClassifierGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _SkipLayerForward(_PolicyArgs):
    """CFG + skip-layer/perturbed-attention guidance, shared by PAG and SLG (identical math in diffusers)."""

    def _cannot_skip(self):
        return "it evaluates a third, perturbed branch whose guidance term needs no unconditional pass"

    @property
    def is_conditional(self):
        # diffusers counts the batches as [cond, uncond, cond_skip] (1 and 3 conditional). With CFG off they
        # are [cond, cond_skip], its count calls the skip batch unconditional and prepare_models never puts
        # the perturbation hooks on: PAG / SLG without CFG equals no guidance there. Batch 2 is the
        # conditional skip batch whenever CFG is off.
        n = self._count_prepared
        return n in (1, 3) or (n == 2 and not self._is_cfg_enabled())

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
    __init__ = _policy_init(_dg.PerturbedAttentionGuidance)


class SkipLayerGuidance(_SkipLayerForward, _dg.SkipLayerGuidance):
    __doc__ = "fastguide-backed " + (_dg.SkipLayerGuidance.__doc__ or "")
    __init__ = _policy_init(_dg.SkipLayerGuidance)


class ClassifierFreeZeroStarGuidance(_Skipping, _dg.ClassifierFreeZeroStarGuidance):
    __doc__ = "fastguide-backed " + (_dg.ClassifierFreeZeroStarGuidance.__doc__ or "")
    __init__ = _policy_init(_dg.ClassifierFreeZeroStarGuidance)

    def _zero_init(self):
        return self._enabled and self._step is not None and self._step < self.zero_init_steps

    def _unguided(self, pred_cond):
        # zero-init needs no unconditional prediction: it stays zero even where that pass is skipped
        return torch.zeros_like(pred_cond) if self._zero_init() else pred_cond

    def _ag_observes(self):
        return not self._zero_init()  # zeros are no guidance of cond: AG judges the steps after zero-init

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._enabled:
            return pred_cond
        if self._zero_init():
            return torch.zeros_like(pred_cond)  # diffusers then rescales zeros into NaN; zeros stay zeros
        if not self._is_cfg_enabled():
            return pred_cond
        return ops.cfg_zero_star(pred_cond, pred_uncond, float(self.guidance_scale),
                                 rescale=float(self.guidance_rescale), original=self.use_original_formulation)


_apg_init = _policy_init(_dg.AdaptiveProjectedGuidance)


def _apg_space_init(self, *args, space="prediction", **kwargs):
    where = f"fastguide.diffusers.{type(self).__name__}"
    if space not in ("prediction", "x0"):
        raise ValueError(f"{where}: space must be 'prediction' or 'x0', got {space!r}")
    if space == "x0" and kwargs.get("scheduler") is None:
        raise ValueError(f"{where}: space='x0' runs APG on the x0 estimates, which needs the noise schedule: "
                         f"pass scheduler=pipe.scheduler")
    _apg_init(self, *args, **kwargs)
    self._space = space
    if space != "prediction":  # only when set: a default guider keeps exactly diffusers' config
        self.register_to_config(space=space)


_sig = inspect.signature(_apg_init)
_apg_space_init.__signature__ = _sig.replace(parameters=[
    *_sig.parameters.values(), inspect.Parameter("space", inspect.Parameter.KEYWORD_ONLY, default="prediction")])
_apg_space_init.__doc__ = _apg_init.__doc__


def _synced_buffer(guider, pred_cond):
    """fastguide's MomentumBuffer following the diffusers guider's own (`guider.momentum_buffer`, None without
    momentum). diffusers makes a new MomentumBuffer at step 0 (prepare_inputs); ours follows it, zeroed in place
    when the shape allows (CUDA-graph friendly), new otherwise. Theirs may already hold a running average (a
    guider converted mid-trajectory by guider_from): ours starts from it. Callers point theirs at our tensor
    afterwards (`theirs.running_average = buf.running_average`), so the state stays readable through diffusers'
    attribute."""
    theirs = guider.momentum_buffer
    if theirs is None:
        return None
    if getattr(guider, "_fastguide_owner", None) is not theirs:
        momentum = float(guider.adaptive_projected_guidance_momentum)
        old = getattr(guider, "_fastguide_buffer", None)
        ra = old.running_average if old is not None else None
        if (ra is not None and old.momentum == momentum and ra.shape == pred_cond.shape
                and ra.dtype == pred_cond.dtype and ra.device == pred_cond.device):
            old.reset()
        else:
            old = ops.MomentumBuffer(momentum)
        prior = getattr(theirs, "running_average", 0)
        if isinstance(prior, torch.Tensor):
            if prior.shape != pred_cond.shape:
                raise ValueError(f"fastguide {type(guider).__name__}: the momentum buffer's running average has shape "
                                 f"{tuple(prior.shape)}, the predictions {tuple(pred_cond.shape)}; reset the guider "
                                 f"(set_state at step 0)")
            if old.running_average is None:
                old.running_average = torch.zeros_like(pred_cond)
            old.running_average.copy_(prior)
        guider._fastguide_buffer, guider._fastguide_owner = old, theirs
    return guider._fastguide_buffer


def _rows_buffer(guider, rows, run):
    """run(sub_buffer) on the momentum rows `rows` only (AG switched the other samples off), written back: each
    sample's running average advances on the steps its guidance is computed, the others' rows stay as they
    are (they are not used again in this trajectory). The first guided step of a trajectory is always full
    (AG decides after guided steps only), so the buffer exists here, bound to this trajectory."""
    buf = getattr(guider, "_fastguide_buffer", None)
    if buf is None or buf.running_average is None or guider._fastguide_owner is not guider.momentum_buffer:
        raise RuntimeError(f"fastguide {type(guider).__name__}: a partial step before the trajectory's first full "
                           f"guided step (the momentum buffer is not set up)")
    ra = buf.running_average
    sub = ops.MomentumBuffer(buf.momentum)
    sub.running_average = ra.index_select(0, rows.to(ra.device))
    pred = run(sub)
    ra.index_copy_(0, rows.to(ra.device), sub.running_average)
    return pred


class AdaptiveProjectedGuidance(_Skipping, _dg.AdaptiveProjectedGuidance):
    __doc__ = "fastguide-backed " + (_dg.AdaptiveProjectedGuidance.__doc__ or "") + """
    fastguide: space="x0" (with scheduler=pipe.scheduler) runs the projection, the norm clamp and the momentum
    on the x0 estimates the scheduler forms from the denoiser's input, as the APG paper and ComfyUI's node do,
    and converts the result back to the model's prediction type (epsilon, v, flow). diffusers' guider (and
    space="prediction", the default) works on the raw predictions."""
    __init__ = _apg_space_init
    _space = "prediction"

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_apg_enabled():
            return pred_cond
        if self._space == "x0":
            x = self._sample
            if not isinstance(x, torch.Tensor) or x.shape[1:] != pred_cond.shape[1:]:
                raise ValueError(f"fastguide.diffusers.AdaptiveProjectedGuidance: space='x0' needs the denoiser's "
                                 f"input of the conditional branch (read between prepare_models / cleanup_models), "
                                 f"got {None if x is None else tuple(getattr(x, 'shape', ()))}")
            if rows is not None:
                x = x.index_select(0, rows.to(x.device))
            t, sched = self._timestep, self._schedule
            if sched.invertible(t):  # at sigma 0 x0 does not depend on the prediction: guide the prediction
                guided = self._guide_space(sched.x0(x, pred_cond, t), sched.x0(x, pred_uncond, t), rows)
                return sched.from_x0(x, guided, t).to(pred_cond.dtype)
        return self._guide_space(pred_cond, pred_uncond, rows)

    def _guide_space(self, pred_cond, pred_uncond, rows=None):
        theirs = self.momentum_buffer
        if theirs is not None and rows is not None:
            return self._guide_rows(pred_cond, pred_uncond, rows)
        buf = _synced_buffer(self, pred_cond)
        # diffusers clamps the norm only when the threshold is > 0: a negative one means "no clamp" there too.
        pred = ops.apg(pred_cond, pred_uncond, float(self.guidance_scale), eta=float(self.eta),
                       norm_threshold=max(float(self.adaptive_projected_guidance_rescale), 0.0), momentum_buffer=buf,
                       norm_dim=self.adaptive_projected_guidance_norm_dim, rescale=float(self.guidance_rescale),
                       original=self.use_original_formulation)
        if buf is not None:
            # Theirs shares our tensor (updated in place): the state stays readable (and convertible back)
            # through diffusers' own attribute.
            theirs.running_average = buf.running_average
        return pred

    def _guide_rows(self, pred_cond, pred_uncond, rows):
        """APG with momentum on the samples `rows` only (AG switched the others off): each sample's running
        average advances on the steps its guidance is computed, the others' rows stay as they are (they are
        not used again in this trajectory). The first guided step of a trajectory is always full (AG decides
        after guided steps only), so the buffer exists here, bound to this trajectory."""
        return _rows_buffer(self, rows, lambda sub: ops.apg(
            pred_cond, pred_uncond, float(self.guidance_scale), eta=float(self.eta),
            norm_threshold=max(float(self.adaptive_projected_guidance_rescale), 0.0), momentum_buffer=sub,
            norm_dim=self.adaptive_projected_guidance_norm_dim, rescale=float(self.guidance_rescale),
            original=self.use_original_formulation))


class FrequencyDecoupledGuidance(_Skipping, _dg.FrequencyDecoupledGuidance):
    __doc__ = "fastguide-backed " + (_dg.FrequencyDecoupledGuidance.__doc__ or "")
    __init__ = _policy_init(_dg.FrequencyDecoupledGuidance)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_fdg_enabled():
            return pred_cond
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
        return frequency.fdg(pred_cond, pred_uncond, scales, parallel_weights=weights, rescale=rescales,
                             rescale_space=self.guidance_rescale_space, original=orig)


# --- the diffusers 0.42 guiders: MAG, TCFG, AutoGuidance, APMix, SEG, LTX-2 -------------------------------------
# Their math lives in fastguide.methods (one function per method, shared with the registry entries).
class MagnitudeAwareGuidance(_Skipping, _dg.MagnitudeAwareGuidance):
    __doc__ = "fastguide-backed " + (_dg.MagnitudeAwareGuidance.__doc__ or "")
    __init__ = _policy_init(_dg.MagnitudeAwareGuidance)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_mambo_g_enabled():
            return pred_cond  # diffusers' rescale of pred_cond against itself is the identity
        return methods.mag(pred_cond, pred_uncond, float(self.guidance_scale), float(self.alpha),
                           rescale=float(self.guidance_rescale), original=self.use_original_formulation)


class TangentialClassifierFreeGuidance(_Skipping, _dg.TangentialClassifierFreeGuidance):
    __doc__ = "fastguide-backed " + (_dg.TangentialClassifierFreeGuidance.__doc__ or "") + """
    fastguide: the projection comes from the 2 x 2 Gram matrix of (cond, uncond) (one fused pass, then
    torch.linalg.svd of [B, 2, 2]) instead of the SVD of the [B, 2, N] predictions; `is_conditional` counts the
    prepared batches (diffusers 0.42 reads an attribute that does not exist, `_num_outputs_prepared`)."""
    __init__ = _policy_init(_dg.TangentialClassifierFreeGuidance)

    @property
    def is_conditional(self):
        return self._count_prepared == 1

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_tcfg_enabled():
            return pred_cond
        return methods.tcfg(pred_cond, pred_uncond, float(self.guidance_scale), rescale=float(self.guidance_rescale),
                            original=self.use_original_formulation)


def _list_indices(configs):
    """diffusers 0.42 builds `LayerSkipConfig(layer, ...)` / `SmoothedEnergyGuidanceConfig(layer, ...)` per entry
    of auto_guidance_layers / seg_guidance_layers: an int where the config wants a list of indices, and the
    hooks then fail on len(int) / `i in int` at the first perturbed batch. Same layers, as lists (in place, before
    the hooks go on: also on guiders converted by guider_from); the saved config is unchanged."""
    for config in configs:
        if isinstance(config.indices, int):
            config.indices = [config.indices]


class AutoGuidance(_Skipping, _dg.AutoGuidance):
    __doc__ = "fastguide-backed " + (_dg.AutoGuidance.__doc__ or "") + """
    fastguide: the unconditional batch runs with diffusers' layer-skip hooks (the "bad" model) as in diffusers;
    the combine is fastguide.cfg. Adaptive guidance / intervals / LinearAG skip that batch per sample.
    `auto_guidance_layers=[...]` works (diffusers 0.42 crashes on it at the first unconditional batch)."""
    __init__ = _policy_init(_dg.AutoGuidance)

    def prepare_models(self, denoiser):
        _list_indices(self.auto_guidance_config)
        super().prepare_models(denoiser)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_ag_enabled():
            return pred_cond
        return ops.cfg(pred_cond, pred_uncond, float(self.guidance_scale), rescale=float(self.guidance_rescale),
                       original=self.use_original_formulation)


class AdaptiveProjectedMixGuidance(_Skipping, _dg.AdaptiveProjectedMixGuidance):
    __doc__ = "fastguide-backed " + (_dg.AdaptiveProjectedMixGuidance.__doc__ or "") + """
    fastguide: adaptive= / interval= / linear_ag= skip the unconditional pass per sample, the momentum kept per
    sample (a sample's running average advances on the steps it is guided, CFG steps included)."""
    __init__ = _policy_init(_dg.AdaptiveProjectedMixGuidance)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._is_cfg_enabled():
            return pred_cond  # no momentum update there, as in diffusers

        def run(buf):
            return methods.apg_mix(pred_cond, pred_uncond, float(self.guidance_scale),
                                   float(self.adaptive_projected_guidance_scale), self._is_apg_enabled(),
                                   eta=float(self.eta), norm_threshold=float(self.adaptive_projected_guidance_rescale),
                                   momentum_buffer=buf, rescale=float(self.guidance_rescale),
                                   original=self.use_original_formulation)

        theirs = self.momentum_buffer
        if theirs is not None and rows is not None:
            return _rows_buffer(self, rows, run)
        buf = _synced_buffer(self, pred_cond)
        pred = run(buf)
        if buf is not None:
            theirs.running_average = buf.running_average  # diffusers' attribute shows our state
        return pred


def _apply_seg_hooks(denoiser, config, blur_sigma, blur_threshold_inf, name):
    """diffusers' `_apply_smoothed_energy_guidance_hook` (same layer selection: the non-cross attention modules of
    the blocks `config.indices` of the stack `config.fqn`, their `to_q`), with fastguide's blur hook."""
    where = "fastguide.diffusers.SmoothedEnergyGuidance"
    if config.fqn == "auto":
        found = [i for i in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS if hasattr(denoiser, i)]
        if not found:
            raise ValueError(f"{where}: no stack of transformer blocks found automatically in "
                             f"{type(denoiser).__name__}; give SmoothedEnergyGuidanceConfig(fqn=...)")
        config.fqn = found[0]
    if config._query_proj_identifiers is None:
        config._query_proj_identifiers = ["to_q"]
    blocks_found = False
    for i, block in enumerate(_get_submodule_from_fqn(denoiser, config.fqn)):
        if i not in config.indices:
            continue
        blocks_found = True
        for sub in block.modules():
            if not isinstance(sub, _ATTENTION_CLASSES) or sub.is_cross_attention:
                continue
            for ident in config._query_proj_identifiers:
                proj = getattr(sub, ident, None)
                if isinstance(proj, torch.nn.Linear):
                    HookRegistry.check_if_exists_or_initialize(proj).register_hook(
                        _SEGQueryHook(blur_sigma, blur_threshold_inf), name)
    if not blocks_found:
        raise ValueError(f"{where}: no transformer blocks {config.indices} in '{config.fqn}' of "
                         f"{type(denoiser).__name__}")


class _SEGQueryHook(SmoothedEnergyGuidanceHook):
    """diffusers' SEG hook on `to_q` with the official blur (fastguide.attention.seg_blur_) and the guider's own
    `seg_blur_threshold_inf` (diffusers' hook keeps its default 9999.9)."""

    def post_forward(self, module, output):
        return seg_blur_(output, self.blur_sigma, self.blur_threshold_inf)


class SmoothedEnergyGuidance(_SkipLayerForward, _dg.SmoothedEnergyGuidance):
    __doc__ = "fastguide-backed " + (_dg.SmoothedEnergyGuidance.__doc__ or "") + """
    fastguide: the blurred-query batch is really blurred. diffusers 0.42's `prepare_models` never counts the
    batches, so its hooks never go on and `pred_cond_seg` equals `pred_cond` (SEG is a no-op there); and its
    blur swaps the finite / infinite branches (a finite sigma gives the mean query, the default "infinite" sigma
    a box blur). Here the third batch (the second with CFG off) gets the official SEG blur
    (fastguide.attention.seg_blur_) on `to_q` of the configured layers; the combine is fastguide.pag / cfg.
    In `fastguide.enable`'s single batch the same blur runs as `fastguide.attention.SEGProcessor`.
    `seg_guidance_layers=[...]` works (diffusers 0.42 would fail on it once its hooks went on)."""
    __init__ = _policy_init(_dg.SmoothedEnergyGuidance)

    # _SkipLayerForward's combine under SEG's names: base + scale (cond - uncond) + seg_scale (cond - seg)
    _is_slg_enabled = _dg.SmoothedEnergyGuidance._is_seg_enabled

    @property
    def skip_layer_guidance_scale(self):
        return self.seg_guidance_scale

    def prepare_models(self, denoiser):
        self._count_prepared += 1
        if self._is_seg_enabled() and self.is_conditional and self._count_prepared > 1:
            _list_indices(self.seg_guidance_config)
            for name, config in zip(self._seg_layer_hook_names, self.seg_guidance_config):
                _apply_seg_hooks(denoiser, config, float(self.seg_blur_sigma), float(self.seg_blur_threshold_inf),
                                 name)

    def forward(self, pred_cond, pred_uncond=None, pred_cond_seg=None):
        return super().forward(pred_cond, pred_uncond, pred_cond_seg)


class LTX2Guidance(_PolicyArgs, _dg.LTX2Guidance):
    __doc__ = "fastguide-backed " + (_dg.LTX2Guidance.__doc__ or "")
    __init__ = _policy_init(_dg.LTX2Guidance)

    def _cannot_skip(self):
        return "its spatio-temporal and modality passes are guidance terms of their own"

    def forward(self, pred_cond, pred_uncond=None, pred_cond_stg=None, pred_cond_modality=None):
        terms = []
        for on, weight, pred, name in ((self.is_cfg_enabled(), float(self.guidance_scale) - 1.0, pred_uncond,
                                        "pred_uncond"),
                                       (self.is_stg_enabled(), float(self.stg_scale), pred_cond_stg, "pred_cond_stg"),
                                       (self.is_modality_enabled(), float(self.modality_scale) - 1.0,
                                        pred_cond_modality, "pred_cond_modality")):
            if on and pred is None:
                raise ValueError(f"fastguide.diffusers.LTX2Guidance: this step's active predictions are "
                                 f"{self.active_predictions()}; {name} is missing")
            if on:
                terms.append((weight, pred))
        pred = methods.ltx2(pred_cond, terms, rescale=float(self.guidance_rescale))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


from typing import Optional  # noqa: E402  (MultiBranchGuidance's imports, kept next to it)

from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.hooks import ModelHook  # noqa: E402


class _ModelBranch(ModelHook):
    """Runs another model in place of the denoiser's forward, with the same arguments (one branch's call)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def new_forward(self, module, *args, **kwargs):
        return self.model(*args, **kwargs)


class MultiBranchGuidance(BaseGuidance):
    """Any method of the registry (`fastguide.METHODS`) through diffusers' guider protocol, including methods
    whose branches come from a second model: RLG's reference model, autoguidance's weak model.

        guider = MultiBranchGuidance(method="rlg", guidance_scale=5.0, params={"rl_scale": 1.5}, models={"ref": base_unet})
        guider = MultiBranchGuidance(method="weak_model", guidance_scale=2.0, models={"weak": early_unet})

    One batch per branch (`prepare_inputs`): the prompt branches take their entry of the data tuples (cond 0,
    uncond 1; middle / empty 2, for pipelines that pass 3-tuples); a model branch takes the batch of its prompt
    branch, and between `prepare_models` / `cleanup_models` the pipeline's denoiser call runs that model
    instead (a diffusers hook on the denoiser's forward, removed after the call). The second model must take
    the denoiser's call arguments. `models` is not part of the config (like ClassifierGuidance's classifier):
    pass it again after `from_pretrained`, or set `guider.models`. Outside start/stop only the conditional
    batch runs and its prediction is returned. `guidance_scale` fills the method's `scale` (None in the
    registry follows the pipeline's guidance_scale)."""

    ignore_for_config = ["models"]
    _input_predictions = ["pred_cond"]  # per instance: one per branch of the method (set in __init__)
    _TUPLE_INDEX = {"cond": 0, "uncond": 1, "middle": 2, "empty": 2}

    @register_to_config
    def __init__(self, *, method: str = "rlg", guidance_scale: float = 7.5, params: Optional[dict] = None,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True, models=None):
        # keyword-only: diffusers' register_to_config files positional arguments under its defaults
        super().__init__(start, stop, enabled)
        where = "fastguide.diffusers.MultiBranchGuidance"
        self.method = _methods.get(method, where)
        if "perturbed" in self.method.branches:
            raise ValueError(f"{where}: guidance={method!r} perturbs attention layers: use PerturbedAttentionGuidance")
        self.params = self.method.check_params(dict(params or {}), where)
        for param in self.method.prompts.values():  # enable's: here the pipeline's data tuples carry the branch
            value, default = self.params[param], self.method.params[param]
            if not (value is default or (isinstance(value, str) and value == default)):
                raise ValueError(f"{where}: {param}= is for fastguide.enable on StableDiffusion / StableDiffusionXL "
                                 f"pipelines; in the guider route the pipeline passes the branch's inputs as entry 2 "
                                 f"of its data tuples (leave {param} unset)")
        self.guidance_scale = guidance_scale
        self._input_predictions = [f"pred_{b}" for b in self.method.branches]
        self.models = {}
        if models is not None:
            self.set_models(models)
        self._state = self.method.new_state(self.params) if self.method.new_state is not None else None

    def set_models(self, models):
        """{model key: module}: the second models of the method's model branches (validated here)."""
        where = "fastguide.diffusers.MultiBranchGuidance"
        if not isinstance(models, dict) or set(models) != set(self.method.model_keys) or not all(
                callable(m) for m in models.values()):
            raise ValueError(f"{where}: guidance={self.method.name!r} needs models={{key: model}} for the keys "
                             f"{list(self.method.model_keys)}, got {models if not isinstance(models, dict) else sorted(models)!r}")
        self.models = dict(models)

    def _active(self):
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _branches(self):
        return self.method.branches if self._active() else ("cond",)

    @property
    def num_conditions(self):
        return len(self._branches())

    @property
    def is_conditional(self):
        return self._branches()[max(self._count_prepared - 1, 0)] == "cond"

    def _prompt_of(self, branch):
        spec = self.method.models.get(branch)
        return spec[1] if spec is not None else branch

    def prepare_inputs(self, data):
        batches = []
        for branch in self._branches():
            idx = self._TUPLE_INDEX[self._prompt_of(branch)]
            short = [k for k, v in data.items() if isinstance(v, tuple) and len(v) <= idx]
            if short:
                raise ValueError(f"fastguide.diffusers.MultiBranchGuidance: branch {branch!r} reads entry {idx} of "
                                 f"the data tuples, but {short} have fewer entries")
            batches.append(self._prepare_batch(data, idx, f"pred_{branch}"))
        return batches

    def prepare_models(self, denoiser):
        self._count_prepared += 1
        branches = self._branches()
        branch = branches[(self._count_prepared - 1) % len(branches)]
        spec = self.method.models.get(branch)
        if spec is not None:
            model = self.models.get(spec[0])
            if model is None:
                raise ValueError(f"fastguide.diffusers.MultiBranchGuidance: branch {branch!r} needs the model "
                                 f"{spec[0]!r}: pass models={{{spec[0]!r}: module}} (not saved with the config)")
            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_ModelBranch(model), "fastguide_model_branch")

    def cleanup_models(self, denoiser):
        registry = getattr(denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("fastguide_model_branch") is not None:
            registry.remove_hook("fastguide_model_branch", recurse=False)

    def forward(self, **preds):
        x = {name[len("pred_"):]: p for name, p in preds.items()}
        if not self._active():
            return GuiderOutput(pred=x["cond"], pred_cond=x["cond"], pred_uncond=None)
        if self._step == 0 and self.method.reset_state is not None:
            self.method.reset_state(self._state)
        p = dict(self.params)
        if p.get("scale", 0.0) is None:
            p["scale"] = float(self.guidance_scale)
        return GuiderOutput(pred=self.method.combine(x, p, self._state, self._step), pred_cond=x["cond"],
                            pred_uncond=x.get("uncond"))


class CFGPlusPlusGuidance(ClassifierFreeGuidance):
    """CFG++ (Chung et al. 2024) as a guider for diffusers' DDIMScheduler (eta 0, epsilon predictions):
    `guidance_scale` is CFG++'s lambda (typically in [0, 1]). CFG++'s step takes x0 from the guided prediction
    g = u + lambda (c - u) and the direction from the unconditional one; DDIM's step of this guider's output then
    equals it exactly, because that output is CFG at the per-step scale lambda c1 / (c1 - c2), with
    c1 = sqrt(a_prev (1 - a_t) / a_t), c2 = sqrt(1 - a_prev) (a = alphas_cumprod, prev = t - T // steps as DDIM):
    one fused cfg pass, any pipeline on the guider protocol, no sampler change. Needs scheduler=pipe.scheduler."""

    def _check_ddim(self):
        sched = self._schedule
        if sched is None or sched.class_name != "DDIMScheduler" or sched.prediction_type != "epsilon":
            got = "no scheduler" if sched is None else f"{sched.class_name} ({sched.prediction_type})"
            raise ValueError(f"fastguide.diffusers.CFGPlusPlusGuidance: needs scheduler=pipe.scheduler, a DDIMScheduler "
                             f"with epsilon prediction (its step is what the output is built for), got {got}")
        if sched.config.get("clip_sample") or sched.config.get("thresholding"):
            raise ValueError("fastguide.diffusers.CFGPlusPlusGuidance: the DDIMScheduler clips / thresholds its x0 "
                             "estimate, which CFG++ takes from the guided prediction; use clip_sample=False, "
                             "thresholding=False (or fastguide.cfgpp_ddim_step in your own loop)")

    def set_state(self, step, num_inference_steps, timestep):
        self._check_ddim()  # the first protocol call: before any step is taken
        super().set_state(step, num_inference_steps, timestep)

    def _is_cfg_enabled(self):
        return self._enabled  # lambda = 1 is CFG++'s full guidance, not "off"

    def _alpha(self, t):
        sched = self._schedule
        if t < 0:  # DDIM's final step: alpha 1 (set_alpha_to_one), else alphas_cumprod[0]
            return 1.0 if sched.config.get("set_alpha_to_one", True) else 1.0 / (1.0 + sched.sigma(0) ** 2)
        return 1.0 / (1.0 + sched.sigma(t) ** 2)

    def effective_scale(self):
        """The CFG scale this step's output uses (lambda c1 / (c1 - c2))."""
        t = int(round(float(self._timestep.flatten()[0] if isinstance(self._timestep, torch.Tensor) else self._timestep)))
        a, a_prev = self._alpha(t), self._alpha(t - self._schedule.num_train_timesteps // self._num_inference_steps)
        c1, c2 = (a_prev * (1.0 - a) / a) ** 0.5, (1.0 - a_prev) ** 0.5
        if abs(c1 - c2) < 1e-12:
            # a_prev == a_t (DDIM's last step at t = 0 without set_alpha_to_one): DDIM's update ignores the
            # prediction there, so no output reproduces CFG++'s step; the guided prediction itself
            return float(self.guidance_scale)
        return float(self.guidance_scale) * c1 / (c1 - c2)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if not self._enabled:
            return pred_cond
        return ops.cfg(pred_cond, pred_uncond, self.effective_scale(), rescale=float(self.guidance_rescale),
                       original=self.use_original_formulation)


GUIDERS = {  # diffusers guider -> fastguide twin
    _dg.ClassifierFreeGuidance: ClassifierFreeGuidance,
    _dg.PerturbedAttentionGuidance: PerturbedAttentionGuidance,
    _dg.SkipLayerGuidance: SkipLayerGuidance,
    _dg.ClassifierFreeZeroStarGuidance: ClassifierFreeZeroStarGuidance,
    _dg.AdaptiveProjectedGuidance: AdaptiveProjectedGuidance,
    _dg.FrequencyDecoupledGuidance: FrequencyDecoupledGuidance,
    _dg.MagnitudeAwareGuidance: MagnitudeAwareGuidance,
    _dg.TangentialClassifierFreeGuidance: TangentialClassifierFreeGuidance,
    _dg.AutoGuidance: AutoGuidance,
    _dg.AdaptiveProjectedMixGuidance: AdaptiveProjectedMixGuidance,
    _dg.SmoothedEnergyGuidance: SmoothedEnergyGuidance,
    _dg.LTX2Guidance: LTX2Guidance,
}

# The twins that can skip the unconditional pass per sample (PAG / SLG cannot: a third branch).
SKIPPING = {cls.__name__: cls for cls in GUIDERS.values() if issubclass(cls, _Skipping)}


@contextlib.contextmanager
def recording(guider):
    """Record a guider's (cond, uncond) predictions for LinearAG calibration, in any pipeline:

        with fastguide.diffusers.recording(pipe.guider) as runs:
            for prompt in prompts:
                pipe(prompt=prompt, num_inference_steps=30)     # full CFG runs
        coefficients = fastguide.pipelines.fit_linear_ag(runs, steps=[1, 3, 5, 7])
        pipe.update_components(guider=pipe.guider.new(linear_ag=fastguide.LinearAG(coefficients, 30)))

    `runs` gets one {step: (cond, uncond)} per trajectory (steps where both branches ran on every sample)."""
    if not isinstance(guider, _Skipping):
        raise TypeError(f"fastguide.diffusers.recording: guider must be one of {sorted(SKIPPING)} (a guider "
                        f"combining cond and uncond), got {type(guider).__name__}")
    runs = []
    guider._recording = runs
    try:
        yield runs
    finally:
        guider._recording = None


def guider_from(guider, *, adaptive=None, interval=None, linear_ag=None, scheduler=None):
    """The fastguide twin of a diffusers guider, with the same config and the same current state
    (step, windows, scales changed after construction, momentum buffer), and optionally a skipping policy
    (adaptive= / interval= / linear_ag= / scheduler=, as the constructors take)."""
    policy = (adaptive, interval, linear_ag, scheduler)
    if isinstance(guider, tuple(GUIDERS.values())):
        if all(v is None for v in policy):
            return guider
        cls = type(guider)
    else:
        cls = GUIDERS.get(type(guider))
    if cls is None:
        names = sorted(k.__name__ for k in GUIDERS)
        raise TypeError(f"fastguide.diffusers.guider_from: no fastguide twin for {type(guider).__name__}; "
                        f"supported: {names}")
    twin = cls.__new__(cls)
    twin.__dict__.update(guider.__dict__)  # config, state, hooks: everything the guider holds
    if any(v is not None for v in policy):
        twin._configure(*policy)  # validates before installing; the original guider is left untouched
    return twin
