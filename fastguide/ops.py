"""fastguide's ops: schemas, fake implementations, backend registration and public wrappers.

Every op is `torch.ops.fastguide.<name>`, dispatched by device through the PyTorch dispatcher:

    CPU    C++ kernel from csrc/ (fastguide._C), registered there with TORCH_LIBRARY_IMPL
    CUDA   Triton kernel from kernels/ (fastguide.kernels), registered below
    other  / a missing backend: the plain-PyTorch implementation in _eager.py
           (CompositeExplicitAutograd; backend-specific kernels take precedence over it)

The public wrappers validate their arguments (clear errors before any kernel runs) and turn each
scale into the schema's pair `(Tensor? <name>_t, float <name>)`.
"""
import math
import numbers
import warnings

import torch

from . import _eager

# Must equal csrc/guidance.h kSchemas (tests/test_build.py checks); used when _C is missing.
SCHEMAS = (
    "cfg(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float rescale, bool original) -> Tensor",
    "pag(Tensor cond, Tensor uncond, Tensor perturbed, Tensor? scale_t, float scale, Tensor? pag_scale_t, "
    "float pag_scale, float rescale, bool original) -> Tensor",
    "cfg_zero_star(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float rescale, bool original) -> Tensor",
)
OPS = tuple(s.split("(", 1)[0] for s in SCHEMAS)

# --- backends ---------------------------------------------------------------------------------
try:
    from . import _C  # noqa: F401  (defines the schemas and the CPU kernels)

    CPU_BACKEND, CPU_ERROR = "C++ (fastguide._C)", None
except ImportError as exc:  # extension not built, or built against another torch
    CPU_BACKEND, CPU_ERROR = None, f"{type(exc).__name__}: {exc}"
    warnings.warn(f"fastguide: C++ extension unavailable ({CPU_ERROR}); CPU ops use the plain PyTorch "
                  "fallback. Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)

try:
    import triton

    from .kernels import guidance as _triton_guidance

    CUDA_BACKEND, CUDA_ERROR = f"Triton {triton.__version__}", None
except Exception as exc:  # noqa: BLE001 - triton missing or broken: fall back, say why
    _triton_guidance, CUDA_BACKEND, CUDA_ERROR = None, None, f"{type(exc).__name__}: {exc}"

_lib = torch.library.Library("fastguide", "FRAGMENT")
if CPU_BACKEND is None:
    for _schema in SCHEMAS:
        _lib.define(_schema)
for _name in OPS:
    _lib.impl(_name, getattr(_eager, _name), "CompositeExplicitAutograd")
    if _triton_guidance is not None:
        _lib.impl(_name, getattr(_triton_guidance, _name), "CUDA")


def backends():
    """{op: {device: backend}}: which implementation serves each op on each device type."""
    fallback = "PyTorch eager fallback"
    cpu = CPU_BACKEND or f"{fallback} ({CPU_ERROR})"
    if CUDA_BACKEND is None:
        cuda = f"{fallback} ({CUDA_ERROR})"
    elif not torch.cuda.is_available():
        cuda = f"{CUDA_BACKEND} (no CUDA device visible)"
    else:
        cuda = CUDA_BACKEND
    return {name: {"cpu": cpu, "cuda": cuda, "other": fallback} for name in OPS}


# --- fake implementations (torch.compile, opcheck, meta tensors) --------------------------------
def _fake(cond, *args):
    return torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)


for _name in OPS:
    torch.library.register_fake(f"fastguide::{_name}", _fake, lib=_lib)


# --- argument checks ---------------------------------------------------------------------------
def _check_pair(op, cond, other, name):
    if not isinstance(cond, torch.Tensor) or not isinstance(other, torch.Tensor):
        raise TypeError(f"fastguide.{op}: cond and {name} must be tensors, "
                        f"got {type(cond).__name__} and {type(other).__name__}")
    if not cond.is_floating_point():
        raise TypeError(f"fastguide.{op}: cond must be a floating tensor (fp32, fp16, bf16), got {cond.dtype}")
    if cond.dim() < 2:
        raise ValueError(f"fastguide.{op}: cond must have >= 2 dims with batch first, got shape {tuple(cond.shape)}")
    if other.shape != cond.shape:
        raise ValueError(f"fastguide.{op}: {name} must have cond's shape {tuple(cond.shape)}, "
                         f"got {tuple(other.shape)} (nothing is broadcast)")
    if other.dtype != cond.dtype:
        raise TypeError(f"fastguide.{op}: {name} must have cond's dtype {cond.dtype}, got {other.dtype}")
    if other.device != cond.device:
        raise ValueError(f"fastguide.{op}: {name} must be on cond's device {cond.device}, got {other.device}")


def _scale(op, name, value, cond):
    """A scale as the schema's (tensor or None, float) pair."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"fastguide.{op}: {name} must be a float tensor, got {value.dtype}")
        if not (value.dim() == 0 or (value.dim() == 1 and value.shape[0] == cond.shape[0])):
            raise ValueError(f"fastguide.{op}: {name} must be a float, a 0-d tensor or a tensor of shape "
                             f"[{cond.shape[0]}] (one per sample), got shape {tuple(value.shape)}")
        if value.device != cond.device:
            raise ValueError(f"fastguide.{op}: {name} must be on cond's device {cond.device}, got {value.device}")
        return value, 0.0
    if not isinstance(value, numbers.Real):
        raise TypeError(f"fastguide.{op}: {name} must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"fastguide.{op}: {name} must be finite, got {value}")
    return None, value


def _rescale(op, rescale):
    if not isinstance(rescale, numbers.Real) or not math.isfinite(float(rescale)):
        raise ValueError(f"fastguide.{op}: rescale must be a finite float (0 disables it), got {rescale!r}")
    return float(rescale)


# --- public wrappers ---------------------------------------------------------------------------
def cfg(cond, uncond, scale, *, rescale=0.0, original=False):
    """Classifier-free guidance: `uncond + scale * (cond - uncond)` (`cond + ...` when `original`),
    then diffusers' guidance rescale when `rescale > 0`.

    Equals diffusers' `ClassifierFreeGuidance(scale, rescale, original).forward(cond, uncond).pred`,
    except that a guided prediction with zero std is returned unrescaled instead of NaN.
    `scale`: float, 0-d tensor or [B] tensor on cond's device. Arithmetic in fp32; out has cond's
    shape and dtype. One pass over memory without rescale, two with it.
    """
    _check_pair("cfg", cond, uncond, "uncond")
    st, s = _scale("cfg", "scale", scale, cond)
    return torch.ops.fastguide.cfg(cond, uncond, st, s, _rescale("cfg", rescale), bool(original))


def pag(cond, uncond, perturbed, scale, pag_scale, *, rescale=0.0, original=False):
    """Perturbed-attention guidance combined with CFG:
    `base + scale * (cond - uncond) + pag_scale * (cond - perturbed)`, base = uncond (cond if `original`),
    then guidance rescale. Equals diffusers' `PerturbedAttentionGuidance.forward` with both enabled.
    """
    _check_pair("pag", cond, uncond, "uncond")
    _check_pair("pag", cond, perturbed, "perturbed")
    st, s = _scale("pag", "scale", scale, cond)
    pt, p = _scale("pag", "pag_scale", pag_scale, cond)
    return torch.ops.fastguide.pag(cond, uncond, perturbed, st, s, pt, p, _rescale("pag", rescale), bool(original))


def cfg_zero_star(cond, uncond, scale, *, rescale=0.0, original=False):
    """CFG-Zero*: CFG on `alpha * uncond`, alpha = <cond, uncond> / (|uncond|^2 + 1e-8) per sample over
    all non-batch dims. Equals diffusers' `ClassifierFreeZeroStarGuidance.forward` past its zero-init steps.
    Two passes over memory (per-sample dot products first).
    """
    _check_pair("cfg_zero_star", cond, uncond, "uncond")
    st, s = _scale("cfg_zero_star", "scale", scale, cond)
    return torch.ops.fastguide.cfg_zero_star(cond, uncond, st, s, _rescale("cfg_zero_star", rescale),
                                             bool(original))
