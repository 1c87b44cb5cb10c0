"""fastguide's guidance lab: a small class-conditional diffusion model trained on scikit-learn's 8x8
digits (shipped as safetensors), classifiers to score its samples, and `fastguide lab`, which measures
every guidance method on it.

    pipe = fastguide.lab.pipeline()                     # a diffusers DiffusionPipeline that takes a guider
    out = pipe(class_labels=[3, 7], guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    scores = fastguide.lab.evaluator()(out.images * 2 - 1, [3, 7])

`python -m fastguide.lab train` reproduces the weights from seed.
"""
import inspect
import os

import torch

from . import data, models

__all__ = ["DigitsPipeline", "pipeline", "load", "evaluator", "noisy_classifier", "ppap_classifier", "data", "models"]


def __getattr__(name):  # DigitsPipeline imports diffusers: only when asked for
    if name == "DigitsPipeline":
        from .digits import DigitsPipeline
        return DigitsPipeline
    raise AttributeError(f"module 'fastguide.lab' has no attribute {name!r}")


def _weights_path(key, weights_dir=None):
    path = os.path.join(weights_dir or models.WEIGHTS_DIR, models.WEIGHTS[key])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastguide.lab: weights file {path} is missing; run `{models.TRAIN_COMMAND}` "
                                f"to reproduce it")
    return path


def load(key, module, weights_dir=None):
    """Load weights file `key` (see models.WEIGHTS) into `module`; a missing or corrupted file raises an error
    naming the file and the train command."""
    from safetensors.torch import load_file
    path = _weights_path(key, weights_dir)
    try:
        state = load_file(path)
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:  # noqa: BLE001 - safetensors/torch raise various types for a bad file
        raise RuntimeError(f"fastguide.lab: cannot load weights file {path} ({type(exc).__name__}: {exc}); it is "
                           f"corrupted or from another version: run `{models.TRAIN_COMMAND}` to reproduce it") from exc
    return module.eval().requires_grad_(False)


def pipeline(checkpoint="unet", scheduler="ddim", guider=None, weights_dir=None):
    """The digits model as a `DigitsPipeline` (diffusers DiffusionPipeline). checkpoint: "unet" (trained) or
    "unet_early" (a weaker early checkpoint). scheduler: "ddim" (default), "euler", "dpm" or a scheduler."""
    from .digits import DigitsPipeline
    if checkpoint not in ("unet", "unet_early"):
        raise ValueError(f"fastguide.lab.pipeline: checkpoint must be 'unet' or 'unet_early', got {checkpoint!r}")
    unet = load(checkpoint, models.make_unet(), weights_dir)
    if isinstance(scheduler, str):
        scheduler = _default_scheduler(scheduler)
    return DigitsPipeline(unet=unet, scheduler=scheduler, guider=guider)


def _default_scheduler(kind="ddim"):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    kinds = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
    if kind not in kinds:
        raise ValueError(f"fastguide.lab.pipeline: scheduler must be one of {sorted(kinds)} or a scheduler, got {kind!r}")
    # "leading" spacing: with this cosine schedule, t = 999 carries no signal at all
    cls = kinds[kind]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(timestep_spacing="leading", **{k: v for k, v in models.SCHEDULER_CONFIG.items() if k in accepted})


def evaluator(weights_dir=None):
    from .metrics import Evaluator
    return Evaluator(load("eval_classifier", models.EvalClassifier(), weights_dir))


def noisy_classifier(weights_dir=None):
    """p(y | x_t, t) on the lab's noise schedule: `clf(x_t, t)` -> [B, 10] logits (differentiable in x_t)."""
    return load("noisy_classifier", models.NoisyClassifier(), weights_dir)


def ppap_classifier(kind="experts", weights_dir=None):
    """PPAP's guidance classifiers (`models.MultiExpertClassifier`, callable as `clf(x_t, t)` -> [B, 10] logits):
    kind "experts" (one small classifier per noise range, switched by timestep) or "single" (the same small
    classifier for every timestep: the baseline the experts are measured against)."""
    if kind not in ("experts", "single"):
        raise ValueError(f"fastguide.lab.ppap_classifier: kind must be 'experts' or 'single', got {kind!r}")
    key = f"ppap_{kind}"
    path = _weights_path(key, weights_dir)
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            boundaries = f.get_tensor("boundaries").tolist()
    except Exception as exc:  # noqa: BLE001 - a corrupted file raises various types
        raise RuntimeError(f"fastguide.lab: cannot load weights file {path} ({type(exc).__name__}: {exc}); it is "
                           f"corrupted or from another version: run `{models.TRAIN_COMMAND}` to reproduce it") from exc
    return load(key, models.MultiExpertClassifier(boundaries), weights_dir)
