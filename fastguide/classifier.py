"""Classifier-based guidance on diffusers' guider protocol: guiders that read a classifier besides the denoiser.

    from fastguide.classifier import ClassifierGuidance, GradientFreeClassifierGuidance, DynamicCFG, TimestepExperts
    clf = fastguide.lab.noisy_classifier()               # any callable: clf(x, t) -> logits [B, classes]
    guider = ClassifierGuidance(clf, classifier_scale=3.0, marginal_temperature=0.5, gamma=0.3,
                                scheduler=pipe.scheduler)
    out = pipe(class_labels=[3, 7], guider=guider)

* `ClassifierGuidance`: classifier guidance (Dhariwal & Nichol 2021) in the calibrated form of EluCD ("Elucidating
  the Design Space of Classifier-Guided Diffusion Generation", Ma et al. 2023): joint / marginal logit
  temperatures and the sine-bump scale schedule; optionally on the x0 estimate (an off-the-shelf classifier of
  clean images). With `TimestepExperts` as its classifier it is PPAP's multi-expert guidance ("Towards Practical
  Plug-and-Play Diffusion Models", Go et al. 2023): one classifier per noise range, switched by timestep.
* `GradientFreeClassifierGuidance` (GFCG, Shenoy et al. 2024, arXiv 2411.15393): no gradients; the classifier
  picks, per sample and step, a reference class (the likeliest wrong class) and a guidance scale (how confused
  it is); the denoiser's prediction for the reference class is the "negative" branch.
* `DynamicCFG` ("Dynamic Classifier-Free Diffusion Guidance via Online Feedback", Papalampidi et al. 2025): per
  sample and step, the CFG scale chosen from candidates by a feedback evaluator (a classifier) scoring each
  candidate's x0 estimate.

Common to all: the classifier is any callable `classifier(x, t) -> logits [B, classes]` (a noise-conditional
classifier reads the denoiser's input x_t at timestep t; inputs that are clean-image estimates are passed with
t = 0); it is not part of the config (pass it again after `from_pretrained`). The target labels are
`guider.target` when set, else the conditional `class_labels` the pipeline hands to `prepare_inputs`. The guiders
read the denoiser's input through `prepare_models` (pipelines call it around every denoiser call), need
`scheduler=pipe.scheduler` (timestep -> noise level) and an epsilon-prediction model. The combines are
fastguide's fused ops with per-sample [B] tensor scales (`ops.cfg`, `ops.pag`): the per-sample decisions
(GFCG's scales, DynamicCFG's choice) stay on the device, no host sync, no recompiles when they change.

Not in `fastguide.METHODS`: a registry method is a combine of predictions of one denoiser (branches cond /
uncond / perturbed) with JSON-able parameters; these read a second model (the classifier: a live object, not
config), the denoiser's input x_t, the target labels and the noise schedule, and GFCG adds a branch with a
different condition (the reference class). The registry would need a "needs" field (classifier, sample, labels,
schedule), a branch kind for a swapped condition, and parameters that are objects outside the config.
"""
import math

import torch
from diffusers.guiders.guider_utils import GuiderOutput

from . import ops
from .diffusers import ClassifierFreeGuidance

__all__ = ["ClassifierGuidance", "DynamicCFG", "GradientFreeClassifierGuidance", "TimestepExperts"]


def _finite(where, **values):
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be a finite number, got {v!r}")


class _ClassifierGuider(ClassifierFreeGuidance):
    """What the classifier guiders share: the classifier, the target labels, the denoiser's input (captured by
    `_Skipping.prepare_models` on the conditional call), the noise schedule, epsilon models only."""

    _needs_sample = True

    def _init_classifier_guider(self, where, classifier, scheduler, **cfg):
        """What every constructor does after checking its own parameters: the classifier (a callable or None) and
        the scheduler (required) checked before the CFG guider's __init__ (`cfg`: its arguments), then epsilon
        models only (read from the schedule that __init__ builds)."""
        if classifier is not None and not callable(classifier):
            raise TypeError(f"{where}: classifier must be a callable (x, t) -> logits, got {type(classifier).__name__}")
        if scheduler is None:
            raise ValueError(f"{where}: pass scheduler=pipe.scheduler (the guider maps timesteps to noise levels)")
        super().__init__(scheduler=scheduler, **cfg)
        if self._schedule.flow or self._schedule.prediction_type != "epsilon":
            raise ValueError(f"{where}: epsilon-prediction models only; the scheduler says "
                             f"{'flow matching' if self._schedule.flow else self._schedule.prediction_type}")
        self.classifier = classifier
        self.target = None
        self._labels = None

    def prepare_inputs(self, data):
        labels = data.get("class_labels") if isinstance(data, dict) else None
        self._labels = labels[0] if isinstance(labels, tuple) else labels
        return super().prepare_inputs(data)

    def _inputs(self, batch, where, need_classifier=True):
        """(target labels [B] on x's device, denoiser input x [B, ...]) or a clear error."""
        if need_classifier and self.classifier is None:
            raise ValueError(f"{where}: no classifier (it is not saved with the config): set guider.classifier")
        y = self.target if self.target is not None else self._labels
        x = self._sample
        if (not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor) or y.dim() != 1 or y.shape[0] != batch
                or x.shape[0] != batch):
            raise ValueError(f"{where}: needs the target labels ([B] ints: guider.target, or class_labels in the "
                             f"pipeline's prepare_inputs data) and the denoiser's input (read between prepare_models "
                             f"and cleanup_models); got labels {None if y is None else tuple(getattr(y, 'shape', ()))}, "
                             f"input {None if x is None else tuple(getattr(x, 'shape', ()))}, {batch} samples")
        return y.to(x.device).long(), x

    def _t_batch(self, x, clean=False):
        """This step's timestep as a [B] tensor for the classifier (0 for clean-image estimates)."""
        t = torch.as_tensor(self._timestep, device=x.device)
        t = t.flatten()[0] if t.dim() else t
        # an expanded scalar (stride 0): routers (TimestepExperts) see one timestep without comparing rows
        return (torch.zeros((), dtype=t.dtype, device=x.device) if clean else t).expand(x.shape[0])


class ClassifierGuidance(_ClassifierGuider):
    """CFG (`guidance_scale`; 1 = off) plus classifier guidance in EluCD's calibrated form:

        eps = eps_cfg - w_t * sqrt(1 - alpha_bar_t) * grad [ tj * z_y - logsumexp(tm * z) ],  z = classifier(input, t)
        w_t = classifier_scale * (1 + gamma * sin(pi * t / T))

    * `joint_temperature` tj and `marginal_temperature` tm (EluCD's "joint" and "marginal" temperatures; their
      code's joint_temperature and joint_temperature * margin_temperature_discount, or the EDM sampler's
      uncond_temperature): grad log p(y|x) = grad log p(x, y) - grad log p(x) with the energy reading
      log p(x, y) = z_y, log p(x) = logsumexp(z), each term's logits multiplied by its temperature (EluCD
      multiplies, it does not divide). tj = tm = 1 is Dhariwal & Nichol's guidance; tm = 0 guides by the joint
      term alone. The paper's DDPM setting: tj 1, tm 0.5, gamma 0.3.
    * `gamma`: EluCD's sine schedule, which raises the guidance in the middle of the trajectory (0 at both ends).
      Their DDPM code adds gamma * sin(pi t / T) * (the largest posterior variance so far) to the variance that
      scales the gradient, which is specific to ancestral DDPM steps (and would explode with a cosine schedule,
      whose variance near t = T is ~1); in the score (epsilon) form, which every scheduler takes, the same bump
      is relative to the base scale: w_t = classifier_scale * (1 + gamma sin(pi t / T)).
    * `classifier_input`: "x_t" (default; a noise-conditional classifier, the gradient taken in x_t) or "x0"
      (EluCD's off-the-shelf classifier of clean images, called on the x0 estimate of the conditional branch with
      t = 0; the gradient is taken in x0 and applied as the x_t gradient, as their code does). EluCD also
      replaces a ResNet's ReLUs by Softplus(beta) for smoother gradients: that is the classifier's business
      (`TimestepExperts` and the lab's classifiers use SiLU already).

    With `TimestepExperts` as the classifier this is PPAP's multi-expert guidance. The per-step scale is a
    float (all samples share the timestep); the combine is one fused `ops.pag` / `ops.cfg` pass. The gradient
    runs under `torch.enable_grad()` inside the pipeline's no_grad."""

    def __init__(self, classifier=None, classifier_scale: float = 1.0, joint_temperature: float = 1.0,
                 marginal_temperature: float = 1.0, gamma: float = 0.0, classifier_input: str = "x_t",
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, use_original_formulation: bool = False,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True, *, scheduler=None):
        where = f"fastguide.classifier.{type(self).__name__}"
        _finite(where, classifier_scale=classifier_scale, joint_temperature=joint_temperature,
                marginal_temperature=marginal_temperature, gamma=gamma)
        if joint_temperature < 0 or marginal_temperature < 0:
            raise ValueError(f"{where}: temperatures must be >= 0, got joint {joint_temperature!r}, "
                             f"marginal {marginal_temperature!r}")
        if classifier_input not in ("x_t", "x0"):
            raise ValueError(f"{where}: classifier_input must be 'x_t' or 'x0', got {classifier_input!r}")
        self._init_classifier_guider(where, classifier, scheduler, guidance_scale=guidance_scale,
                                     guidance_rescale=guidance_rescale, start=start, stop=stop, enabled=enabled,
                                     use_original_formulation=use_original_formulation)
        self.classifier_scale, self.joint_temperature = float(classifier_scale), float(joint_temperature)
        self.marginal_temperature, self.gamma, self.classifier_input = float(marginal_temperature), float(gamma), classifier_input
        self.register_to_config(classifier_scale=self.classifier_scale, joint_temperature=self.joint_temperature,
                                marginal_temperature=self.marginal_temperature, gamma=self.gamma,
                                classifier_input=classifier_input)

    def step_scale(self, timestep):
        """w_t * sqrt(1 - alpha_bar_t): the factor of the log-probability gradient at this timestep."""
        s = self._schedule.sigma(timestep)  # VP sigma; sqrt(1 - alpha_bar) = s / sqrt(1 + s^2)
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        bump = 1.0 + self.gamma * math.sin(math.pi * t / self._schedule.num_train_timesteps)
        return self.classifier_scale * bump * s / math.sqrt(1.0 + s * s)

    def log_prob_grad(self, x, y, pred_cond=None):
        """grad of [tj z_y - logsumexp(tm z)] (EluCD's calibrated log p(y | .)) in the classifier's input."""
        with torch.enable_grad():
            if self.classifier_input == "x0":
                leaf = self._schedule.x0(x.detach(), pred_cond.detach(), self._timestep).float().requires_grad_(True)
                logits = self.classifier(leaf, self._t_batch(leaf, clean=True)).float()
            else:
                leaf = x.detach().float().requires_grad_(True)
                logits = self.classifier(leaf, self._t_batch(leaf)).float()
            joint = self.joint_temperature * logits.gather(1, y[:, None]).squeeze(1)
            marginal = torch.logsumexp(self.marginal_temperature * logits, dim=1)
            (grad,) = torch.autograd.grad((joint - marginal).sum(), leaf)
        return grad

    def _guide(self, pred_cond, pred_uncond, rows=None):
        cfg_on = pred_uncond is not None and self._is_cfg_enabled()
        if self.classifier_scale == 0 or not self._enabled:
            return super()._guide(pred_cond, pred_uncond, rows) if cfg_on else pred_cond
        y, x = self._inputs(pred_cond.shape[0], f"fastguide.classifier.{type(self).__name__}")
        k = self.step_scale(self._timestep)
        # shifted = cond + k * grad, formed in place in the gradient's buffer; then the fused combine
        # uncond + s (cond - uncond) + 1 * (cond - shifted) = CFG - k grad (cond - k grad without CFG)
        shifted = self.log_prob_grad(x, y, pred_cond).to(pred_cond.dtype).mul_(k).add_(pred_cond)
        r, orig = float(self.guidance_rescale), self.use_original_formulation
        if cfg_on:
            return ops.pag(pred_cond, pred_uncond, shifted, float(self.guidance_scale), 1.0, rescale=r, original=orig)
        return ops.cfg(pred_cond, shifted, 2.0, rescale=r)


class TimestepExperts(torch.nn.Module):
    """PPAP's multi-expert guidance model: `experts[i]` (callables (x, t) -> logits) serves the timesteps in
    [boundaries[i], boundaries[i + 1]) (the last also past its end, the first below its start). Use it as the
    classifier of `ClassifierGuidance`. One timestep for all samples (a scalar, or a scalar expanded to [B], as
    the guiders pass it) routes in Python on its value; a [B] tensor of distinct timesteps routes each row to its
    expert."""

    def __init__(self, boundaries, experts):
        super().__init__()
        b = list(boundaries)
        experts = list(experts)
        if (len(b) != len(experts) + 1 or not experts or not all(isinstance(v, (int, float)) for v in b)
                or any(lo >= hi for lo, hi in zip(b, b[1:]))):
            raise ValueError(f"fastguide.classifier.TimestepExperts: boundaries must be {len(experts) + 1} increasing "
                             f"timesteps for {len(experts)} experts, got {boundaries!r}")
        if not all(callable(e) for e in experts):
            raise TypeError("fastguide.classifier.TimestepExperts: every expert must be a callable (x, t) -> logits")
        self.boundaries = tuple(float(v) for v in b)
        if all(isinstance(e, torch.nn.Module) for e in experts):
            self.experts = torch.nn.ModuleList(experts)
        else:
            self._plain = experts
        self.calls = [0] * len(experts)  # calls served per expert (what the routing did)

    def _experts(self):
        return list(self.experts) if hasattr(self, "experts") else self._plain

    def index(self, t):
        tv = float(t)
        return sum(tv >= b for b in self.boundaries[1:-1])

    def forward(self, x, t):
        experts = self._experts()
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1 or t.stride(0) == 0:  # one timestep (a scalar expanded to [B]: stride 0)
            i = self.index(t.flatten()[0])
            self.calls[i] += 1
            return experts[i](x, t if t.dim() else t.expand(x.shape[0]))
        inner = torch.tensor(self.boundaries[1:-1], dtype=torch.float64, device=t.device)
        idx = torch.bucketize(t.double(), inner, right=True)
        outs, rows_all = [], []
        for i, e in enumerate(experts):
            rows = (idx == i).nonzero().flatten()
            if rows.numel():
                self.calls[i] += 1
                outs.append(e(x[rows], t[rows]))
                rows_all.append(rows)
        out = torch.cat(outs)
        return out[torch.argsort(torch.cat(rows_all))]


class GradientFreeClassifierGuidance(_ClassifierGuider):
    """GFCG (Shenoy et al. 2024, "Gradient-Free Classifier Guidance for Diffusion Model Sampling", arXiv
    2411.15393): the classifier runs in inference mode only. Each step, per sample, it names a reference class
    c_r (the likeliest class other than the target y) and a scale from how confused it is; the denoiser's
    prediction for c_r is a third branch, guided away from:

        eps = eps_cfg + w * (eps(x | y) - eps(x | c_r)),   w = gfcg_scale * min(p(c_r | x_t) / p(y | x_t), 1)

    (eps_cfg = CFG at `guidance_scale`, the conditional prediction at 1). Faithfulness: the paper's text was not
    reachable from here; this follows its abstract and summary ("a time-adaptive reference class label and
    corresponding guidance scale are determined at each time step", the scale "depending on how confused the
    diffusion model is"); the confusion ratio p(c_r)/p(y), capped at 1, is this implementation's reading. The
    paper classifies the denoised estimate with a clean-image classifier; here the classifier reads the
    denoiser's input x_t at t (a noise-conditional classifier), which is known before the reference branch runs.

    The reference branch is an extra batch of the guider protocol (`num_conditions` + 1): the pipeline must pass
    `class_labels` as a (cond, uncond) tuple to `prepare_inputs` (as the lab's pipeline does); the reference
    labels are written into that batch's `class_labels` tensor in `prepare_models`, before its denoiser call.
    `corrections()` reports the guidance actually applied (mean w / gfcg_scale over samples and steps, and the
    fraction of (sample, step) pairs with w > 5% of gfcg_scale). Scales stay on the device ([B] tensors into
    `ops.cfg` / `ops.pag`): no host sync."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_ref"]

    def __init__(self, classifier=None, gfcg_scale: float = 3.0, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0, use_original_formulation: bool = False, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True, *, scheduler=None):
        where = f"fastguide.classifier.{type(self).__name__}"
        _finite(where, gfcg_scale=gfcg_scale)
        if gfcg_scale < 0:
            raise ValueError(f"{where}: gfcg_scale must be >= 0, got {gfcg_scale!r}")
        self._init_classifier_guider(where, classifier, scheduler, guidance_scale=guidance_scale,
                                     guidance_rescale=guidance_rescale, start=start, stop=stop, enabled=enabled,
                                     use_original_formulation=use_original_formulation)
        self.gfcg_scale = float(gfcg_scale)
        self._ref, self._w, self.history, self._count_ref = None, None, [], 0
        self.register_to_config(gfcg_scale=self.gfcg_scale)

    def _gfcg_on(self):
        return self._enabled and self.gfcg_scale > 0 and self._in_window()

    def _in_window(self):
        if self._num_inference_steps is None or self._step is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    @property
    def num_conditions(self):
        return super().num_conditions + (1 if self._gfcg_on() else 0)

    def set_state(self, step, num_inference_steps, timestep):
        if step == 0:
            self.history = []
        self._ref, self._w = None, None
        super().set_state(step, num_inference_steps, timestep)

    def prepare_inputs(self, data):
        n_ref = 1 if self._gfcg_on() else 0
        labels = data.get("class_labels") if isinstance(data, dict) else None
        if n_ref and not (isinstance(labels, tuple) and isinstance(labels[0], torch.Tensor)):
            raise ValueError(f"fastguide.classifier.{type(self).__name__}: the reference branch needs class_labels "
                             f"(cond, uncond) in prepare_inputs' data, got {type(labels).__name__}")
        self._labels = labels[0] if isinstance(labels, tuple) else labels
        self._count_ref = n_ref
        # the (cond[, uncond]) batches of CFG (diffusers' prepare_inputs would count the reference branch too)
        n_cfg = 2 if self._is_cfg_enabled() else 1
        batches = [self._prepare_batch(data, i, name) for i, name in zip(range(n_cfg), ("pred_cond", "pred_uncond"))]
        if n_ref:
            self._ref = labels[0].clone()  # filled with the reference classes in prepare_models
            ref_data = {**data, "class_labels": (self._ref, None)}
            batches.append(self._prepare_batch(ref_data, 0, "pred_ref"))
        return batches

    def prepare_inputs_from_block_state(self, data, input_fields):
        raise NotImplementedError(f"fastguide.classifier.{type(self).__name__}: modular pipelines' block-state inputs "
                                  f"have no class labels to swap for the reference class; call prepare_inputs with "
                                  f"class_labels (cond, uncond)")

    @property
    def is_conditional(self):
        # batches: cond (1), [uncond (2)], ref (last): the reference branch is a conditional one
        return self._count_prepared == 1 or (self._ref is not None and self._count_prepared == self.num_conditions)

    def prepare_models(self, denoiser):
        super().prepare_models(denoiser)
        if self._ref is not None and self._count_prepared == self.num_conditions:
            self._reference(self._ref.shape[0])

    def _reference(self, batch):
        """Reference classes (into the reference batch's labels, in place) and scales w [B], from the classifier
        on the conditional branch's input."""
        y, x = self._inputs(batch, f"fastguide.classifier.{type(self).__name__}")
        with torch.no_grad():
            p = torch.softmax(self.classifier(x, self._t_batch(x)).float(), dim=1)
            p_y = p.gather(1, y[:, None]).squeeze(1)
            others = p.scatter(1, y[:, None], -1.0)
            p_r, ref = others.max(dim=1)
            w = self.gfcg_scale * (p_r / p_y.clamp_min(1e-12)).clamp(max=1.0)
        self._ref.copy_(ref.to(self._ref.device, self._ref.dtype))
        self._w = w
        self.history.append(w)

    def forward(self, pred_cond, pred_uncond=None, pred_ref=None):
        where = f"fastguide.classifier.{type(self).__name__}"
        if self._count_ref and (pred_ref is None or self._w is None):
            raise ValueError(f"{where}: the reference branch ran without its classes (run the denoiser between "
                             f"prepare_models and cleanup_models for every batch)")
        cfg_on = pred_uncond is not None and self._is_cfg_enabled()
        r, orig = float(self.guidance_rescale), self.use_original_formulation
        if pred_ref is None:
            pred = super()._guide(pred_cond, pred_uncond) if cfg_on else pred_cond
        elif cfg_on:  # uncond + s (cond - uncond) + w (cond - ref)
            pred = ops.pag(pred_cond, pred_uncond, pred_ref, float(self.guidance_scale), self._w.to(pred_cond.device),
                           rescale=r, original=orig)
        else:  # cond + w (cond - ref) = ref + (1 + w)(cond - ref)
            pred = ops.cfg(pred_cond, pred_ref, (1.0 + self._w).to(pred_cond.device), rescale=r)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def corrections(self):
        """(mean w / gfcg_scale, fraction of (sample, step) pairs with w > 5% of gfcg_scale) over the last run."""
        if not self.history or self.gfcg_scale == 0:
            return 0.0, 0.0
        w = torch.stack(self.history) / self.gfcg_scale
        return float(w.mean()), float((w > 0.05).float().mean())


class DynamicCFG(_ClassifierGuider):
    """Dynamic CFG via online feedback (Papalampidi et al. 2025, "Dynamic Classifier-Free Diffusion Guidance via
    Online Feedback"): every step, for every sample, the CFG scale is chosen from `scales` by a feedback
    evaluator that scores each candidate's x0 estimate; the cond / uncond predictions are shared, so candidates
    cost evaluator calls only (one batched call of len(scales) * B rows per step), no denoiser passes.

    Evaluator: the classifier (default, e.g. the lab's noise-conditional classifier read at t = 0 on the x0
    estimates) scores p(y | x0(s)). Selection (greedy, per step): the smallest candidate (`scales` are sorted) whose confidence reaches
    `threshold` (default 0.999: on the lab's model 0.9 and 0.99 pick scale 1 almost everywhere), else the most
    confident one -- as much guidance as the feedback says is needed. Faithfulness:
    the paper (text not reachable from here beyond its abstract and summaries) runs a greedy search per step over
    CFG scales with several latent-space evaluators (CLIP alignment, a fidelity discriminator, a preference
    model) whose scores are weighted by timestep; with one classifier as the evaluator, alignment alone would
    always pick the largest scale, so the threshold (the smallest sufficient scale) plays the fidelity term's
    part. `evaluator` may be any callable (x0 [K*B, ...], t [K*B], y [K*B]) -> scores [K*B] (higher is better;
    then the threshold applies to its scores). `chosen_scales()` reports the scales picked ([steps, B]).
    The chosen scales go into `ops.cfg` as a [B] tensor: no host sync, no recompiles."""

    def __init__(self, classifier=None, scales=(1.0, 2.0, 3.0, 5.0, 8.0), threshold: float = 0.999, evaluator=None,
                 guidance_rescale: float = 0.0, start: float = 0.0, stop: float = 1.0, enabled: bool = True, *,
                 scheduler=None):
        where = f"fastguide.classifier.{type(self).__name__}"
        scales = sorted(float(s) for s in scales) if isinstance(scales, (list, tuple)) else None
        if not scales or not all(math.isfinite(s) for s in scales):
            raise ValueError(f"{where}: scales must be a non-empty list of finite numbers (candidate CFG scales)")
        _finite(where, threshold=threshold)
        if evaluator is not None and not callable(evaluator):
            raise TypeError(f"{where}: evaluator must be a callable (x0, t, y) -> scores, got {type(evaluator).__name__}")
        # CFG is on (both branches run) unless every candidate is 1; guidance_scale is the largest candidate
        self._init_classifier_guider(where, classifier, scheduler, guidance_rescale=guidance_rescale, start=start,
                                     stop=stop, enabled=enabled, guidance_scale=max(scales, key=lambda s: abs(s - 1.0)))
        self.scales, self.threshold, self.evaluator = scales, float(threshold), evaluator
        self.history = []
        self.register_to_config(scales=scales, threshold=self.threshold)

    def set_state(self, step, num_inference_steps, timestep):
        if step == 0:
            self.history = []
        super().set_state(step, num_inference_steps, timestep)

    def _score(self, x0, y):
        t = torch.zeros(x0.shape[0], dtype=torch.int64, device=x0.device)
        if self.evaluator is not None:
            return self.evaluator(x0, t, y).float()
        if self.classifier is None:
            raise ValueError(f"fastguide.classifier.{type(self).__name__}: no classifier (it is not saved with the "
                             f"config): set guider.classifier or pass evaluator=")
        return torch.softmax(self.classifier(x0, t).float(), dim=1).gather(1, y[:, None]).squeeze(1)

    def _guide(self, pred_cond, pred_uncond, rows=None):
        if pred_uncond is None or not self._is_cfg_enabled():
            return pred_cond
        b = pred_cond.shape[0]
        y, x = self._inputs(b, f"fastguide.classifier.{type(self).__name__}", need_classifier=self.evaluator is None)
        k = len(self.scales)
        scales = torch.tensor(self.scales, dtype=torch.float32, device=pred_cond.device)
        with torch.no_grad():
            x0 = torch.cat([self._schedule.x0(x, ops.cfg(pred_cond, pred_uncond, s), self._timestep) for s in self.scales])
            score = self._score(x0, y.repeat(k)).view(k, b)
            ok = score >= self.threshold
            first = ok.int().argmax(dim=0)           # the first (smallest-listed) sufficient candidate
            pick = torch.where(ok.any(dim=0), first, score.argmax(dim=0))
            chosen = scales[pick]
        self.history.append(chosen)
        return ops.cfg(pred_cond, pred_uncond, chosen, rescale=float(self.guidance_rescale))

    def chosen_scales(self):
        """[steps, B] scales picked in the last run (empty tensor before one)."""
        return torch.stack(self.history) if self.history else torch.empty(0)
