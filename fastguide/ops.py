"""fastguide's ops: schemas, fake implementations, autograd, backend registration and public wrappers.

Every op is `torch.ops.fastguide.<name>`, defined here (SCHEMAS: the one place its schema is written)
and dispatched by device through the PyTorch dispatcher:

    CPU    C++ kernel from csrc/ (fastguide._C), registered there with TORCH_LIBRARY_IMPL
    CUDA   Triton kernel from kernels/ (fastguide.kernels), registered below
    other  / a missing backend: the plain-PyTorch implementation in _eager.py
           (CompositeExplicitAutograd; backend-specific kernels take precedence over it)

Autograd: every op but apg, cfg_momentum and guide_weights has a backward formula (_autograd.py,
torch.library.register_autograd); apg and cfg_momentum mutate a momentum buffer and guide_weights is a few flops
per sample, so their callers run the differentiable eager math when a gradient is needed. The public wrappers
validate their arguments (clear errors before any kernel runs) and turn each scale into the schema's pair
`(Tensor? <name>_t, float <name>)`.
"""
import math
import numbers
import warnings

import torch

from . import _autograd, _eager

# The op schemas, defined once (torch.library below); the C++ extension only registers CPU kernels for
# them (tests/test_build.py checks it registers one for each and for nothing else).
# Every scale appears twice: `Tensor? <name>_t` and `float <name>`. A tensor (0-d or [B], on the
# input's device) wins when given: a CUDA graph or a compiled graph can then take a new value each
# step without a recompile or host sync. A Python float needs no allocation.
SCHEMAS = (
    # guidance.cpp: out = f * (base + s1 * (c - alpha u) + s2 * (c - p)), see there.
    "cfg(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float rescale, bool original) -> Tensor",
    "pag(Tensor cond, Tensor uncond, Tensor perturbed, Tensor? scale_t, float scale, Tensor? pag_scale_t, "
    "float pag_scale, float rescale, bool original) -> Tensor",
    "cfg_zero_star(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float rescale, bool original) -> Tensor",
    # APMix's CFG phase: cfg's output (no rescale) and momentum_buffer = (c - u) + momentum * momentum_buffer
    # in place, in one pass (no autograd formula: the wrapper takes the eager math when a gradient is needed).
    "cfg_momentum(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, bool original, float momentum, "
    "Tensor(a!) momentum_buffer) -> Tensor",
    # apg.cpp: norm groups are contiguous runs of group_size elements (the wrapper permutes).
    "apg(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float eta, float norm_threshold, "
    "float momentum, Tensor(a!)? momentum_buffer, int group_size, bool original) -> Tensor",
    # [G, 7] fp32: <c,u>, |c|^2, |u|^2, <c,g>, |g|^2, cos(c,u), cos(c,g).
    "guidance_stats(Tensor cond, Tensor uncond, Tensor? guided, int group_size) -> Tensor",
    # frequency.cpp: low(x) = sum_t ah[t] @ x @ aw[t]^T over the last two dims (see fastguide/frequency.py).
    "frequency_cfg(Tensor cond, Tensor uncond, Tensor ah, Tensor aw, Tensor? low_t, float low, Tensor? high_t, "
    "float high, bool original) -> Tensor",
    "frequency_split(Tensor x, Tensor ah, Tensor aw) -> Tensor",
    # cfgpp.cpp: x_next = a x + b (u + scale (c - u)) + c u (the coefficients come from the wrappers).
    "cfgpp_step(Tensor x, Tensor cond, Tensor uncond, float a, float b, float c, Tensor? scale_t, float scale) -> Tensor",
    # lincomb.cpp (schemas defined here only): out = w0 p0 + sum_k wk (pk - p0), weights [K] / [B, K] or floats;
    # diff_stats: [G, 3] <a-r, b-r>, |a-r|^2, |b-r|^2 per group (fp32; fp64 for fp64 inputs).
    "lincomb(Tensor[] preds, Tensor? weights_t, float[] weights) -> Tensor",
    "diff_stats(Tensor base, Tensor a, Tensor b, int group_size) -> Tensor",
    # channel.cpp: statistics along dim 1 at each position of [B, C, S...] (ComfyUI's CFGNorm, Mahiro).
    "cfg_norm(Tensor cond, Tensor uncond, Tensor? scale_t, float scale, float strength) -> Tensor",
    "mahiro_sim(Tensor cond, Tensor uncond, Tensor? scale_t, float scale) -> Tensor",
    # weights.cpp: [B, K] per-sample coefficients of a multi-pass method (WEIGHT_METHODS) from its [B, k] stats.
    "guide_weights(Tensor stats, int method, Tensor? scale_t, float scale, Tensor? scale2_t, float scale2, "
    "float param) -> Tensor",
)
OPS = tuple(s.split("(", 1)[0] for s in SCHEMAS)

# "DEF": this module owns the namespace; a second definition anywhere (a stale extension built with
# TORCH_LIBRARY) is an error at import rather than two diverging copies.
_lib = torch.library.Library("fastguide", "DEF")
for _schema in SCHEMAS:
    _lib.define(_schema)

# --- backends ---------------------------------------------------------------------------------
try:
    from . import _C  # noqa: F401  (registers the CPU kernels; loads before or after the schemas alike)

    CPU_BACKEND, CPU_ERROR = "C++ (fastguide._C)", None
except ImportError as exc:  # extension not built, or built against another torch
    CPU_BACKEND, CPU_ERROR = None, f"{type(exc).__name__}: {exc}"
    warnings.warn(f"fastguide: C++ extension unavailable ({CPU_ERROR}); CPU ops use the plain PyTorch "
                  "fallback. Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)

try:
    import triton

    from .kernels import apg as _triton_apg
    from .kernels import cfgpp as _triton_cfgpp
    from .kernels import frequency as _triton_frequency
    from .kernels import guidance as _triton_guidance
    from .kernels import channel as _triton_channel
    from .kernels import lincomb as _triton_lincomb
    from .kernels import weights as _triton_weights

    _TRITON = {"cfg": _triton_guidance, "pag": _triton_guidance, "cfg_zero_star": _triton_guidance,
               "cfg_momentum": _triton_guidance,
               "apg": _triton_apg, "guidance_stats": _triton_apg,
               "frequency_cfg": _triton_frequency, "frequency_split": _triton_frequency,
               "cfgpp_step": _triton_cfgpp, "lincomb": _triton_lincomb, "diff_stats": _triton_lincomb,
               "cfg_norm": _triton_channel, "mahiro_sim": _triton_channel, "guide_weights": _triton_weights}
    CUDA_BACKEND, CUDA_ERROR = f"Triton {triton.__version__}", None
except Exception as exc:  # noqa: BLE001 - triton missing or broken: fall back, say why
    _TRITON, CUDA_BACKEND, CUDA_ERROR = {}, None, f"{type(exc).__name__}: {exc}"

for _name in OPS:
    _lib.impl(_name, getattr(_eager, _name), "CompositeExplicitAutograd")
    if _name in _TRITON:
        _lib.impl(_name, getattr(_TRITON[_name], _name), "CUDA")


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


def _fake_stats(cond, uncond, guided, group_size):
    # group_size 0 (an empty input): one empty group per sample, as the kernels define it
    groups = cond.numel() // group_size if group_size else cond.shape[0]
    return cond.new_empty((groups, 7), dtype=torch.float32)


def _fake_lincomb(preds, weights_t, weights):
    return torch.empty(preds[0].shape, dtype=preds[0].dtype, device=preds[0].device)


def _fake_diff_stats(base, a, b, group_size):
    groups = base.numel() // group_size if group_size else base.shape[0]
    return base.new_empty((groups, 3), dtype=torch.float64 if base.dtype == torch.float64 else torch.float32)


def _fake_mahiro_sim(cond, uncond, scale_t, scale):
    return cond.new_empty((cond.shape[0],), dtype=torch.float64 if cond.dtype == torch.float64 else torch.float32)


def _fake_guide_weights(stats, method, scale_t, scale, scale2_t, scale2, param):
    return stats.new_empty((stats.shape[0], _eager.WEIGHT_COLS[method]))


_FAKES = {"guidance_stats": _fake_stats, "lincomb": _fake_lincomb, "diff_stats": _fake_diff_stats,
          "mahiro_sim": _fake_mahiro_sim, "guide_weights": _fake_guide_weights}
for _name in OPS:
    torch.library.register_fake(f"fastguide::{_name}", _FAKES.get(_name, _fake), lib=_lib)


# --- autograd ------------------------------------------------------------------------------------
def _no_autograd(name):
    """The Autograd kernel of an op without a formula: an error when a gradient is needed (instead of
    PyTorch's fallback, which warns and returns None gradients), the kernels otherwise."""
    handle = getattr(torch.ops.fastguide, name).default._handle

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise RuntimeError(f"fastguide::{name} has no autograd formula; call the public wrapper "
                               f"fastguide.{name}(...) (differentiable), or detach the inputs")
        return handle.redispatch_boxed(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


for _name in OPS:
    if _name in _autograd.FORMULAS:
        _setup, _backward = _autograd.FORMULAS[_name]
        torch.library.register_autograd(f"fastguide::{_name}", _backward, setup_context=_setup, lib=_lib)
    else:
        _lib.impl(_name, _no_autograd(_name), "Autograd", with_keyset=True)


# --- argument checks ---------------------------------------------------------------------------
# The dtypes every backend implements (float8 and complex pass `is_floating_point`/fail in the kernels).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _finite(op, **values):
    """Each value a finite real number. Under torch.compile a Python float may be symbolic, and
    `math.isfinite` on it would break the graph: it is not checked there (like a tensor scale)."""
    if torch.compiler.is_compiling():
        return
    for name, v in values.items():
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"fastguide.{op}: {name} must be a finite float, got {v!r}")

def _check_pair(op, cond, other, name):
    # One boolean chain on the hot path (these wrappers run every sampler step); the detailed
    # diagnosis only when it fails.
    try:
        if (cond.dtype in DTYPES and cond.dim() >= 2 and other.shape == cond.shape
                and other.dtype == cond.dtype and other.device == cond.device):
            return
    except AttributeError:
        pass
    if not isinstance(cond, torch.Tensor) or not isinstance(other, torch.Tensor):
        raise TypeError(f"fastguide.{op}: cond and {name} must be tensors, "
                        f"got {type(cond).__name__} and {type(other).__name__}")
    if cond.dtype not in DTYPES:
        raise TypeError(f"fastguide.{op}: cond must be a floating tensor of dtype float32, float16, bfloat16 or "
                        f"float64, got {cond.dtype}" + (" (convert float8 inputs with .float() first)"
                                                        if cond.is_floating_point() else ""))
    if cond.dim() < 2:
        raise ValueError(f"fastguide.{op}: cond must have >= 2 dims with batch first, got shape {tuple(cond.shape)}")
    if other.shape != cond.shape:
        raise ValueError(f"fastguide.{op}: {name} must have cond's shape {tuple(cond.shape)}, "
                         f"got {tuple(other.shape)} (nothing is broadcast)")
    if other.dtype != cond.dtype:
        raise TypeError(f"fastguide.{op}: {name} must have cond's dtype {cond.dtype}, got {other.dtype}")
    raise ValueError(f"fastguide.{op}: {name} must be on cond's device {cond.device}, got {other.device}")


def _scale(op, name, value, cond):
    """A scale as the schema's (tensor or None, float) pair."""
    if torch.compiler.is_compiling() and not isinstance(value, torch.Tensor):
        # A Python float reaching a custom op's `float` argument is specialised: every new value
        # would recompile. As a 0-d tensor it is a graph input instead (dynamo makes a changing float
        # symbolic after its first recompile; the multiply keeps it symbolic). Not checked for
        # finiteness here, like any tensor scale.
        return torch.ones((), dtype=_eager._acc(cond), device=cond.device) * value, 0.0
    if type(value) is float and math.isfinite(value):  # hot path: no ABC isinstance
        return None, value
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
    if type(rescale) is float and (torch.compiler.is_compiling() or math.isfinite(rescale)):
        return rescale
    if not isinstance(rescale, numbers.Real) or not math.isfinite(float(rescale)):
        raise ValueError(f"fastguide.{op}: rescale must be a finite float (0 disables it), got {rescale!r}")
    return float(rescale)


# --- public wrappers ---------------------------------------------------------------------------
_BACKEND_KEYS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                 "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}
_SCALARS = frozenset((float, int, bool, type(None)))
_LIST_SCALARS = frozenset((float,))


class _Op:
    """What the wrappers call: the OpOverload `torch.ops.fastguide.<name>.default` (`.default` skips the
    overload lookup), entered below the Autograd key when no gradient can be needed. The Autograd kernels
    are Python functions (register_autograd), and entering one costs 10-40 us a call on CPU, more than the
    whole kernel at small sizes; plain CPU / CUDA tensors outside torch.compile, functorch transforms,
    dispatch modes and the profiler, with no input requiring grad (or grad mode off), go straight to the
    backend kernel."""
    __slots__ = ("op", "_handle")

    def __init__(self, op):
        self.op = op
        self._handle = op._handle  # (OpOverload.redispatch looks the schema up again on every call)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        grad = torch.is_grad_enabled()
        device = None
        for a in args:
            # lincomb's Tensor[] preds and float[] weights: each element checked like an argument (floats only)
            items, scalars = (a, _LIST_SCALARS) if type(a) is list else ((a,), _SCALARS)
            for x in items:
                t = type(x)
                if t is torch.Tensor:
                    if grad and x.requires_grad:
                        return self.op(*args)
                    if device is None:
                        device = x.device.type
                elif t not in scalars:  # a tensor subclass (FakeTensor, Parameter, ...): the full dispatch
                    return self.op(*args)
        keys = _BACKEND_KEYS.get(device)
        if (keys is None or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled()):
            return self.op(*args)  # (a redispatch records no profiler event for the op itself)
        return self._handle.redispatch_boxed(keys, *args)


_op = {name: _Op(getattr(torch.ops.fastguide, name).default) for name in OPS}

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
    return _op["cfg"](cond, uncond, st, s, _rescale("cfg", rescale), bool(original))


def pag(cond, uncond, perturbed, scale, pag_scale, *, rescale=0.0, original=False):
    """Perturbed-attention guidance combined with CFG:
    `base + scale * (cond - uncond) + pag_scale * (cond - perturbed)`, base = uncond (cond if `original`),
    then guidance rescale. Equals diffusers' `PerturbedAttentionGuidance.forward` with both enabled.
    """
    _check_pair("pag", cond, uncond, "uncond")
    _check_pair("pag", cond, perturbed, "perturbed")
    st, s = _scale("pag", "scale", scale, cond)
    pt, p = _scale("pag", "pag_scale", pag_scale, cond)
    return _op["pag"](cond, uncond, perturbed, st, s, pt, p, _rescale("pag", rescale), bool(original))


def cfg_zero_star(cond, uncond, scale, *, rescale=0.0, original=False):
    """CFG-Zero*: CFG on `alpha * uncond`, alpha = <cond, uncond> / (|uncond|^2 + 1e-8) per sample over
    all non-batch dims. Equals diffusers' `ClassifierFreeZeroStarGuidance.forward` past its zero-init steps.
    Two passes over memory (per-sample dot products first).
    """
    _check_pair("cfg_zero_star", cond, uncond, "uncond")
    st, s = _scale("cfg_zero_star", "scale", scale, cond)
    return _op["cfg_zero_star"](cond, uncond, st, s, _rescale("cfg_zero_star", rescale), bool(original))


def rescale(pred, cond, rescale):
    """diffusers' `rescale_noise_cfg(pred, cond, rescale)` as a fused two-pass op (finite at std 0).

    It is the CFG kernel with scale 0 (guided = pred) and `rescale`; `cfg(..., rescale=r)` fuses it.
    """
    _check_pair("rescale", cond, pred, "pred")
    return _op["cfg"](cond, pred, None, 0.0, _rescale("rescale", rescale), False)


# --- APG -------------------------------------------------------------------------------------
class MomentumBuffer:
    """APG's momentum state: a running average that `fastguide.apg` updates **in place**.

    Like diffusers' `MomentumBuffer`, it starts at 0, so the first step's running average equals
    cond - uncond. The tensor is allocated on first use with cond's shape, dtype and device and then
    never reallocated (CUDA-graph and torch.compile safe); `reset()` zeroes it in place for a new
    trajectory. Using it with inputs of another shape/dtype/device is an error, not a silent reset.
    A plain tensor passed as `momentum_buffer=` (with `momentum=`) is updated in place the same way.
    """

    def __init__(self, momentum):
        _finite("MomentumBuffer", momentum=momentum)
        self.momentum = float(momentum)
        self.running_average = None

    def reset(self):
        if self.running_average is not None:
            self.running_average.zero_()

    def _tensor_for(self, cond):
        """(tensor, fresh): the bound tensor, or a new zero one that `_bind` keeps once the call succeeded
        (a failed first call must not tie the buffer to that call's shape or dtype)."""
        if self.running_average is None:
            return torch.zeros(cond.shape, dtype=cond.dtype, device=cond.device), True
        return self.running_average, False

    def _bind(self, tensor):
        if self.running_average is None:  # (a concurrent first call may have bound one already)
            self.running_average = tensor

    def __repr__(self):
        state = "empty" if self.running_average is None else f"{tuple(self.running_average.shape)} " \
                                                              f"{self.running_average.dtype}"
        return f"fastguide.MomentumBuffer(momentum={self.momentum}, running_average={state})"


def _momentum_state(op, momentum, momentum_buffer, cond):
    """(buffer tensor or None, momentum float, MomentumBuffer to bind the tensor to after success or None),
    validated before any kernel touches the state."""
    if momentum_buffer is None:
        if momentum is not None:
            raise ValueError(f"fastguide.{op}: momentum={momentum!r} needs momentum_buffer= to carry the running "
                             f"average between steps: pass momentum_buffer=fastguide.MomentumBuffer({momentum!r})")
        return None, 0.0, None
    bind = None
    if isinstance(momentum_buffer, MomentumBuffer):
        if momentum is not None and float(momentum) != momentum_buffer.momentum:
            raise ValueError(f"fastguide.{op}: momentum={momentum!r} disagrees with the MomentumBuffer's "
                             f"momentum={momentum_buffer.momentum}; pass one of them")
        (buf, fresh), mom = momentum_buffer._tensor_for(cond), momentum_buffer.momentum
        bind = momentum_buffer if fresh else None
    elif isinstance(momentum_buffer, torch.Tensor):
        if momentum is None:
            raise ValueError(f"fastguide.{op}: a momentum_buffer tensor needs momentum= (a float)")
        buf, mom = momentum_buffer, momentum
    else:
        raise TypeError(f"fastguide.{op}: momentum_buffer must be a fastguide.MomentumBuffer or a tensor, "
                        f"got {type(momentum_buffer).__name__}")
    _finite(op, momentum=mom)
    if buf.shape != cond.shape or buf.dtype != cond.dtype or buf.device != cond.device:
        raise ValueError(f"fastguide.{op}: momentum_buffer must match cond (shape {tuple(cond.shape)}, {cond.dtype}, "
                         f"{cond.device}), got shape {tuple(buf.shape)}, {buf.dtype}, {buf.device}; for a new "
                         "trajectory of another shape use a new MomentumBuffer")
    if not buf.is_contiguous():
        raise ValueError(f"fastguide.{op}: momentum_buffer must be contiguous (it is updated in place)")
    return buf, float(mom), bind


def _norm_groups(op, x, norm_dim):
    """(permutation or None, group size, kept dims) for diffusers' `norm_dim` (None: all non-batch dims).

    Kernels see norm groups as contiguous runs; when the reduced dims are not trailing, the inputs
    are permuted (reduced dims last) and packed, which costs one extra copy of each.
    """
    nd = x.dim()
    if norm_dim is None:
        reduced = list(range(1, nd))
    else:
        dims = [norm_dim] if isinstance(norm_dim, int) else list(norm_dim)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"fastguide.{op}: norm_dim must be None, an int or a non-empty tuple of ints, "
                             f"got {norm_dim!r}")
        bad = [d for d in dims if not -nd <= d < nd]
        if bad:
            raise ValueError(f"fastguide.{op}: norm_dim {norm_dim!r} out of range for a {nd}-d input "
                             f"(valid: {-nd}..{nd - 1})")
        reduced = sorted({d % nd for d in dims})
        if len(reduced) != len(dims):
            raise ValueError(f"fastguide.{op}: norm_dim {norm_dim!r} names a dim twice")
    kept = [d for d in range(nd) if d not in reduced]
    K = 1
    for d in reduced:  # (a loop, not math.prod over a generator: dynamo traces it)
        K *= x.shape[d]
    perm = None if reduced == list(range(nd - len(reduced), nd)) else kept + reduced
    return perm, K, kept


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def apg(cond, uncond, scale, *, eta=1.0, norm_threshold=0.0, momentum=None, momentum_buffer=None, norm_dim=None,
        rescale=0.0, original=False):
    """Adaptive Projected Guidance (Sadat et al.) as one fused two-pass op.

    Equals diffusers' `normalized_guidance(cond, uncond, scale, momentum_buffer, eta, norm_threshold,
    original, norm_dim)` followed by guidance rescale when `rescale > 0`
    (`AdaptiveProjectedGuidance.forward`), without its float64 round trip:
        m = cond - uncond  (with momentum: running = m + momentum * running; m = running)
        m *= min(1, norm_threshold / |m|)            when norm_threshold > 0
        parallel = <m, c> c / max(|c|, 1e-12)^2;  update = (m - parallel) + eta * parallel
        out = uncond + scale * update                (cond + ... when original)
    Norms are over `norm_dim` (None: all non-batch dims; an int or tuple like diffusers).
    Momentum state: `momentum_buffer=fastguide.MomentumBuffer(momentum)` (or a tensor of cond's shape
    plus `momentum=`), updated in place; it is validated before anything is written.
    Differentiable in cond, uncond and a tensor scale (through the plain-PyTorch math when a gradient is
    needed); the momentum state is not: its previous value is a constant of this step.
    """
    _check_pair("apg", cond, uncond, "uncond")
    st, s = _scale("apg", "scale", scale, cond)
    _finite("apg", eta=eta, norm_threshold=norm_threshold)
    if norm_threshold < 0:
        raise ValueError(f"fastguide.apg: norm_threshold must be >= 0 (0 disables the norm clamp), got {norm_threshold}")
    r = _rescale("apg", rescale)
    perm, K, kept = _norm_groups("apg", cond, norm_dim)
    if st is not None and st.dim() == 1 and 0 not in kept:
        raise ValueError("fastguide.apg: a per-sample scale needs groups inside samples; norm_dim "
                         f"{norm_dim!r} reduces over the batch dim")
    buf, mom, bind = _momentum_state("apg", momentum, momentum_buffer, cond)
    if cond.numel() == 0:  # no groups to normalise (an empty feature dim): nothing to compute or carry
        return torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)
    # A gradient needed: the same math in differentiable plain PyTorch (the fused op mutates the buffer and
    # has no formula). The buffer gets the same values in place, detached: no gradient flows into earlier
    # steps through the momentum state.
    grad = torch.is_grad_enabled() and (cond.requires_grad or uncond.requires_grad
                                        or (st is not None and st.requires_grad))
    run = _eager.apg if grad else _op["apg"]
    if buf is None and not grad and torch.compiler.is_compiling():
        # inductor cannot lower an optional mutable argument given None ("getitem is not an OpOverload"):
        # under torch.compile a zero scratch buffer with momentum 0 (stored = m) stands in for "no momentum".
        buf, mom = torch.zeros_like(cond), 0.0
    args = (st, s, float(eta), float(norm_threshold), mom)
    if perm is None:
        out = run(cond, uncond, *args, buf, K, bool(original))
    else:
        inv = _inverse(perm)
        bp = buf.permute(perm).contiguous() if buf is not None else None
        out = run(cond.permute(perm), uncond.permute(perm), *args, bp, K, bool(original))
        out = out.permute(inv).contiguous()
        if buf is not None:
            buf.copy_(bp.permute(inv))
    if bind is not None:
        bind._bind(buf)
    if r > 0:
        out = _op["cfg"](cond, out, None, 0.0, r, False)  # = rescale(out, cond, r)
    return out


# --- statistics for adaptive methods ---------------------------------------------------------------
class GuidanceStats:
    """Per-group fp32 statistics (device tensors, no host sync), shaped like the kept dims of norm_dim.

    Fields are views into the op's single [..., 7] result, made when read: `cond_dot_uncond`,
    `cond_sq`, `uncond_sq`, `cos_cond_uncond`, and with `guided`: `cond_dot_guided`, `guided_sq`,
    `cos_cond_guided` (None without `guided`). `raw` is the whole [..., 7] tensor.
    """
    __slots__ = ("raw", "has_guided")
    _COLUMNS = {"cond_dot_uncond": 0, "cond_sq": 1, "uncond_sq": 2, "cond_dot_guided": 3, "guided_sq": 4,
                "cos_cond_uncond": 5, "cos_cond_guided": 6}
    _GUIDED = ("cond_dot_guided", "guided_sq", "cos_cond_guided")

    def __init__(self, raw, has_guided):
        self.raw, self.has_guided = raw, has_guided

    def __getattr__(self, name):
        col = GuidanceStats._COLUMNS.get(name)
        if col is None:
            raise AttributeError(f"GuidanceStats has no field {name!r}; fields: {list(GuidanceStats._COLUMNS)}")
        if name in GuidanceStats._GUIDED and not self.has_guided:
            return None
        return self.raw[..., col]

    def __repr__(self):
        return f"GuidanceStats(groups={tuple(self.raw.shape[:-1])}, guided={self.has_guided})"


def guidance_stats(cond, uncond, guided=None, *, norm_dim=None):
    """<cond,uncond>, |cond|^2, |uncond|^2 and cos(cond, uncond) per group, plus <cond,guided>, |guided|^2
    and cos(cond, guided) when `guided` is given, in one fused pass (fp32 sums, deterministic).

    Groups as in `apg`'s norm_dim (None: one group per sample, shape [B]). Cosines follow
    `F.cosine_similarity` (each norm clamped at 1e-8). Adaptive Guidance compares cos(cond, guided)
    with a threshold to decide when to stop evaluating the unconditional branch.
    Differentiable: the backward formula works on the inputs in fp32 (fp64 for fp64 inputs); the values
    themselves stay fp32 sums, so a loss on them is as precise as fp32.
    """
    _check_pair("guidance_stats", cond, uncond, "uncond")
    if guided is not None:
        _check_pair("guidance_stats", cond, guided, "guided")
    perm, K, kept = _norm_groups("guidance_stats", cond, norm_dim)
    if K == 0:  # empty groups: zero sums and, like F.cosine_similarity of empty vectors, zero cosines
        return GuidanceStats(torch.zeros([cond.shape[d] for d in kept] + [7], dtype=torch.float32,
                                         device=cond.device), guided is not None)
    xs = [x if x is None or perm is None else x.permute(perm) for x in (cond, uncond, guided)]
    raw = _op["guidance_stats"](xs[0], xs[1], xs[2], K)
    return GuidanceStats(raw.view([cond.shape[d] for d in kept] + [7]), guided is not None)


# --- CFG++ sampler steps ---------------------------------------------------------------------------
def _cfgpp_args(op, x, cond, uncond, scale, allow_extrapolation):
    _check_pair(op, cond, uncond, "uncond")
    _check_pair(op, cond, x, "x")
    st, s = _scale(op, "scale", scale, cond)
    if st is None and not allow_extrapolation and not 0.0 <= s <= 1.0:
        raise ValueError(f"fastguide.{op}: CFG++ takes scale (lambda) in [0, 1], got {s}; "
                         "pass allow_extrapolation=True to use it outside")
    return st, s


def cfgpp_euler_step(x, cond, uncond, scale, sigma, sigma_next, *, allow_extrapolation=False):
    """One CFG++ Euler step (Chung et al. 2024; ComfyUI's `sample_euler_cfg_pp`) for epsilon predictions in
    sigma space (diffusers' EulerDiscreteScheduler, k-diffusion): the clean estimate uses the guided
    epsilon g = uncond + scale * (cond - uncond), the renoising uses the unconditional one:
        x0 = x - sigma * g;   x_next = x0 + sigma_next * uncond.
    `scale` is CFG++'s lambda in [0, 1] (a float, 0-d or [B] tensor). One fused pass over x, cond, uncond.
    """
    st, s = _cfgpp_args("cfgpp_euler_step", x, cond, uncond, scale, allow_extrapolation)
    _finite("cfgpp_euler_step", sigma=sigma, sigma_next=sigma_next)
    return _op["cfgpp_step"](x, cond, uncond, 1.0, -float(sigma), float(sigma_next), st, s)


def cfgpp_ddim_step(x, cond, uncond, scale, alpha_prod_t, alpha_prod_prev, *, allow_extrapolation=False):
    """One deterministic CFG++ DDIM step (eta = 0) for epsilon predictions (diffusers' DDIMScheduler):
        x0 = (x - sqrt(1 - a_t) g) / sqrt(a_t);   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) uncond,
    g = uncond + scale * (cond - uncond), a = alphas_cumprod. One fused pass.
    """
    st, s = _cfgpp_args("cfgpp_ddim_step", x, cond, uncond, scale, allow_extrapolation)
    _finite("cfgpp_ddim_step", alpha_prod_t=alpha_prod_t, alpha_prod_prev=alpha_prod_prev)
    at, ap = float(alpha_prod_t), float(alpha_prod_prev)
    if not (0.0 < at <= 1.0 and 0.0 < ap <= 1.0):
        raise ValueError(f"fastguide.cfgpp_ddim_step: alphas_cumprod values must be in (0, 1], got {at}, {ap}")
    return _op["cfgpp_step"](x, cond, uncond, math.sqrt(ap / at), -math.sqrt(ap) * math.sqrt(1.0 - at) / math.sqrt(at),
                             math.sqrt(1.0 - ap), st, s)


# --- multi-branch methods: K predictions, per-sample weights ------------------------------------------
MAX_PREDS = 4  # lincomb's kernels take 1 to 4 predictions


def _named(op, cond, **others):
    """Each named prediction against cond (same shape, dtype, device); errors name the argument."""
    for name, x in others.items():
        _check_pair(op, cond, x, name)


def _preds(op, preds):
    if type(preds) in (list, tuple) and 1 <= len(preds) <= MAX_PREDS:  # hot path: one pass, no per-pair call
        p0 = preds[0]
        try:
            if p0.dtype in DTYPES and p0.dim() >= 2 and all(
                    p.shape == p0.shape and p.dtype == p0.dtype and p.device == p0.device for p in preds):
                return list(preds)
        except AttributeError:
            pass
    if not isinstance(preds, (list, tuple)) or not 1 <= len(preds) <= MAX_PREDS:
        raise ValueError(f"fastguide.{op}: preds must be a list of 1 to {MAX_PREDS} tensors, "
                         f"got {type(preds).__name__}" + (f" of {len(preds)}" if isinstance(preds, (list, tuple)) else ""))
    for k in range(len(preds)):
        _check_pair(op, preds[0], preds[k], f"preds[{k}]")
    return list(preds)


def _weights(op, weights, p0, K):
    """(weights_t or None, floats) for lincomb: K floats stay floats (no allocation); anything holding a
    tensor becomes one [K] or [B, K] tensor in the arithmetic dtype (per-sample weights stay on device)."""
    if isinstance(weights, torch.Tensor):
        if not (weights.is_floating_point() and (weights.shape == (K,) or weights.shape == (p0.shape[0], K))):
            raise ValueError(f"fastguide.{op}: weights tensor must be floating of shape [{K}] or "
                             f"[{p0.shape[0]}, {K}], got {weights.dtype} {tuple(weights.shape)}")
        if weights.device != p0.device:
            raise ValueError(f"fastguide.{op}: weights must be on the predictions' device {p0.device}, got {weights.device}")
        return weights, []
    if (type(weights) in (list, tuple) and len(weights) == K and all(type(w) is float for w in weights)
            and all(map(math.isfinite, weights)) and not torch.compiler.is_compiling()):
        return None, list(weights)  # hot path: K finite floats (under torch.compile they become tensors below)
    if not isinstance(weights, (list, tuple)) or len(weights) != K:
        raise ValueError(f"fastguide.{op}: {K} weights expected (one per prediction), got {weights!r}")
    pairs = [_scale(op, f"weights[{k}]", w, p0) for k, w in enumerate(weights)]
    if all(t is None for t, _ in pairs):
        return None, [v for _, v in pairs]
    acc, B = _eager._acc(p0), p0.shape[0]
    cols = [(t.to(acc).expand(B) if t is not None else torch.full((B,), v, dtype=acc, device=p0.device))
            for t, v in pairs]
    return torch.stack(cols, 1), []


def lincomb(preds, weights):
    """`w0 p0 + sum_{k>=1} wk (pk - p0)` over 1 to 4 predictions of one shape, in one fused pass.

    The affine mixes of guidance (CFG: [u, c] with weights [1, s]; dual CFG; Perp-Neg; two-model guidance)
    have w0 = 1; the differences are taken first, like CFG's `u + s (c - u)`. `weights`: K floats, 0-d or
    [B] tensors (a list), or one [K] / [B, K] tensor; a tensor changes value without a recompile. Arithmetic
    in fp32 (fp64 for fp64 inputs); out has p0's shape and dtype, contiguous.
    """
    return _lincomb("lincomb", _preds("lincomb", preds), weights)


def _lincomb(op, preds, weights):
    """lincomb on predictions already checked by the caller."""
    wt, ws = _weights(op, weights, preds[0], len(preds))
    if wt is None and (torch.compiler.is_compiling()
                       or (torch.is_grad_enabled() and any(p.requires_grad for p in preds))):
        # a tensor: no recompile per value; and the autograd formula's form (float[] gets no gradient slot)
        wt, ws = torch.tensor(ws, dtype=_eager._acc(preds[0]), device=preds[0].device), []
    return _op["lincomb"](preds, wt, ws)


# guide_weights' methods: name -> id (csrc/weights.cpp's enum; the output columns are _eager.WEIGHT_COLS).
WEIGHT_METHODS = {"mag": 0, "mag_original": 1, "tcfg": 2, "tcfg_original": 3, "perp_neg": 4, "perp_neg_batch": 5,
                  "mahiro": 6, "mahiro_batch": 7, "renorm_cfg": 8}


def _guide_weights(stats, method, scale, scale2=(None, 0.0), param=0.0):
    """The [B, K] per-sample coefficients of a multi-pass method (WEIGHT_METHODS) from its statistics pass, in one
    op call (scales: the (tensor or None, float) pairs of `_scale`). The op has no autograd formula: when a
    gradient is needed the same math runs as differentiable torch ops (fastguide/_eager.py)."""
    m = WEIGHT_METHODS[method]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (stats, scale[0], scale2[0])):
        return _eager.guide_weights(stats, m, *scale, *scale2, float(param))
    return _op["guide_weights"](stats, m, *scale, *scale2, float(param))


def diff_stats(base, a, b):
    """Per sample, `<a - base, b - base>`, `|a - base|^2`, `|b - base|^2` as a [B, 3] tensor (fp32 sums;
    fp64 for fp64 inputs), one fused pass, on device (no host sync). Perp-Neg's projection of its
    negative direction on its positive one."""
    _check_pair("diff_stats", base, a, "a")
    _check_pair("diff_stats", base, b, "b")
    K = base[0].numel()
    if K == 0:
        return torch.zeros((base.shape[0], 3), dtype=_eager._acc(base), device=base.device)
    return _op["diff_stats"](base, a, b, K)


def _acc_scale(op, name, value, like):
    """A scale as a float, or a [B] / 0-d tensor in the arithmetic dtype (for building lincomb weights)."""
    t, v = _scale(op, name, value, like)
    return v if t is None else t.to(_eager._acc(like))


def dual_cfg(cond, middle, uncond, scale, middle_scale, *, nested=False):
    """Dual CFG over three predictions: ComfyUI's `DualCFGGuider` and InstructPix2Pix.

        regular: uncond + middle_scale (middle - uncond) + scale (cond - middle)
        nested:  uncond + middle_scale (t - uncond),  t = middle + scale (cond - middle)

    ComfyUI: cond = cond1, middle = cond2, uncond = negative, scale = cfg_conds, middle_scale =
    cfg_cond2_negative. diffusers' InstructPix2Pix: cond = text+image, middle = image only, uncond = neither,
    scale = guidance_scale, middle_scale = image_guidance_scale (regular). Scales: floats, 0-d or [B] tensors.
    One fused pass.
    """
    op = "dual_cfg"
    _named(op, cond, middle=middle, uncond=uncond)
    s1, s2 = _acc_scale(op, "scale", scale, cond), _acc_scale(op, "middle_scale", middle_scale, cond)
    if nested:  # uncond + s2 (1 - s1) (middle - uncond) + s2 s1 (cond - uncond)
        return _lincomb(op, [uncond, middle, cond], [1.0, s2 * (1 - s1), s2 * s1])
    return _lincomb(op, [uncond, middle, cond], [1.0, s2 - s1, s1])


def perp_neg(cond, uncond, empty, scale, neg_scale, *, per_sample=False):
    """Perp-Neg (Armandpour et al. 2023) as ComfyUI's `PerpNegGuider` computes it:

        P = cond - empty;  N = uncond - empty;  perp = N - (<N, P> / |P|^2) P
        out = empty + scale (P - neg_scale perp)

    `uncond` is the negative prompt's prediction, `empty` the empty prompt's. ComfyUI sums <N, P> and |P|^2
    over the whole batch (one projection for every sample); `per_sample=True` projects each sample on its
    own. Where |P| = 0 ComfyUI divides 0 by 0 (NaN everywhere); here the projection is 0 (perp = N).
    Two passes: the dot products (diff_stats), then one lincomb, with the weights between them in one small op
    (guide_weights); no host sync.
    """
    op = "perp_neg"
    _named(op, cond, uncond=uncond, empty=empty)
    s, ns = _scale(op, "scale", scale, cond), _scale(op, "neg_scale", neg_scale, cond)
    K = math.prod(cond.shape[1:])  # (not cond[0].numel(): an aten::select per call)
    st = (_op["diff_stats"](empty, cond, uncond, K) if K
          else torch.zeros((cond.shape[0], 3), dtype=_eager._acc(cond), device=cond.device))  # <P, N>, |P|^2, |N|^2
    # weights [1, s (1 + ns alpha), -s ns], alpha = <N, P> / |P|^2 (summed over the batch unless per_sample)
    w = _guide_weights(st, "perp_neg" if per_sample else "perp_neg_batch", s, ns)
    return _op["lincomb"]([empty, cond, uncond], w, [])


def two_model_cfg(cond, uncond, ref_cond, ref_uncond, scale, model_scale):
    """Guidance between two models, each with CFG: `g_ref + model_scale (g - g_ref)`, g = uncond + scale
    (cond - uncond) from the pipeline's model, g_ref likewise from the second (reference) model.

    Reinforcement Learning Guidance (Jin et al. 2025): the pipeline's model is the RL-fine-tuned one, the
    reference its base model; model_scale = 1 is the RL model alone, 0 the base, > 1 extrapolates. Without
    CFG (a single conditional prediction per model) it is `fastguide.cfg(cond, ref_cond, model_scale)`, which
    is also autoguidance with a weak model (Karras et al. 2024). One fused pass over the four predictions.
    """
    op = "two_model_cfg"
    _named(op, cond, uncond=uncond, ref_cond=ref_cond, ref_uncond=ref_uncond)
    s, w = _acc_scale(op, "scale", scale, cond), _acc_scale(op, "model_scale", model_scale, cond)
    # anchored at ref_uncond: (1-w) s (ref_cond - ru) + w (1-s) (uncond - ru) + w s (cond - ru)
    return _lincomb(op, [ref_uncond, ref_cond, uncond, cond], [1.0, (1 - w) * s, w * (1 - s), w * s])


# --- ComfyUI's post-CFG nodes -------------------------------------------------------------------------
# ComfyUI applies them to the denoised (x0) predictions of its samplers; these ops take whatever predictions
# they are given (pass x0 predictions to match the nodes on an epsilon or velocity model).
def cfg_norm(cond, uncond, scale, *, strength=1.0):
    """ComfyUI's CFGNorm on CFG: g = uncond + scale (cond - uncond), then at each position (the vector along
    dim 1, the channels) g * clamp(|cond| / (|g| + 1e-8), 0, 1) * strength. One fused kernel (the channel
    sums, then the output; [B, C, ...] inputs, a 2-D [B, C] input is one position per sample)."""
    _check_pair("cfg_norm", cond, uncond, "uncond")
    st, s = _scale("cfg_norm", "scale", scale, cond)
    _finite("cfg_norm", strength=strength)
    return _op["cfg_norm"](cond, uncond, st, s, float(strength))


def mahiro(cond, uncond, scale, *, per_sample=False):
    """ComfyUI's Mahiro guidance (`nodes_mahiro.py`), with g = uncond + scale (cond - uncond):

        sim = mean cos(ssqrt(scale uncond), ssqrt((scale cond + g) / 2)),  ssqrt(x) = sign(x) sqrt(|x|),
              cosines along dim 1 (channels) at each position, F.cosine_similarity's eps
        k = 2 (sim + 1);  out = (k g + (4 - k) scale cond) / 4 = scale cond + k (1 - scale) / 4 uncond

    ComfyUI averages sim over the whole batch (one k for every sample); `per_sample=True` takes each sample's
    own. Two passes: the channel cosines (one fused reduction), then one lincomb, with the weights between them in
    one small op (guide_weights); no host sync.
    """
    op = "mahiro"
    _check_pair(op, cond, uncond, "uncond")
    st, s = _scale(op, "scale", scale, cond)
    sim = _op["mahiro_sim"](cond, uncond, st, s)  # [B], fp32 (fp64 for fp64 inputs)
    # weights [s + k (1 - s) / 4, s] on [uncond, cond], k = 2 (sim + 1) (sim: the batch mean unless per_sample)
    w = _guide_weights(sim, "mahiro" if per_sample else "mahiro_batch", (st, s))
    return _op["lincomb"]([uncond, cond], w, [])


def renorm_cfg(cond, uncond, scale, renorm, *, channels=None):
    """Lumina 2's renormalised CFG, ComfyUI's RenormCFG below its `cfg_trunc` (above it the node returns cond):

        g = uncond + scale (cond - uncond) on the first `channels` channels (None: all), the others are cond's;
        if renorm > 0 and |g| >= renorm |cond|: g *= renorm |cond| / |g|     (norms per sample over the guided part)

    ComfyUI's `if` on a norm tensor works at batch 1 only; here each sample is renormalised on its own. Where
    |g| = 0 the node divides 0 by 0 (NaN); here g (zero) is returned. Two passes: guidance_stats (|cond|^2,
    |uncond|^2, <cond, uncond>, from which |g|^2 follows; fp64 sums for fp64 inputs) and one lincomb.
    """
    op = "renorm_cfg"
    _check_pair(op, cond, uncond, "uncond")
    _finite(op, renorm=renorm)
    if channels is not None:
        C = cond.shape[1]
        if not isinstance(channels, int) or isinstance(channels, bool) or not 1 <= channels <= C:
            raise ValueError(f"fastguide.{op}: channels must be None or an int in 1..{C} (cond's dim 1), got {channels!r}")
        if channels < C:
            guided = renorm_cfg(cond[:, :channels], uncond[:, :channels], scale, renorm)
            return torch.cat([guided, cond[:, channels:].to(guided.dtype)], 1)
    if not renorm > 0:
        return _lincomb(op, [uncond, cond], [1.0, _acc_scale(op, "scale", scale, cond)])
    # |g|^2 = (1 - s)^2 |u|^2 + 2 s (1 - s) <c, u> + s^2 |c|^2 (its rounding grows like (2s - 1)^2 eps for c ~ u);
    # weights [f, f s], f = min(1, renorm |c| / |g|), in guide_weights (fp64 math)
    w = _guide_weights(_gram_stats(cond, uncond), "renorm_cfg", _scale(op, "scale", scale, cond), param=float(renorm))
    return _op["lincomb"]([uncond, cond], w, [])


def _gram_stats(cond, uncond):
    """[B, k >= 3] per sample <c, u>, |c|^2, |u|^2 (guidance_stats' first columns: one fused pass, fp32 sums);
    float64 inputs get float64 sums. For guide_weights; the caller has checked the pair."""
    if cond.dtype == torch.float64:
        c, u = cond.flatten(1), uncond.flatten(1)
        return torch.stack([(c * u).sum(1), (c * c).sum(1), (u * u).sum(1)], 1)
    K = math.prod(cond.shape[1:])
    if K == 0:
        return torch.zeros((cond.shape[0], 3), dtype=torch.float32, device=cond.device)
    return _op["guidance_stats"](cond, uncond, None, K)


# --- CFG++ variants of ComfyUI's ancestral and second-order samplers (epsilon predictions, sigma space) ----
def _ancestral_step(sigma, sigma_next, eta):
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def cfgpp_euler_ancestral_step(x, cond, uncond, scale, sigma, sigma_next, *, eta=1.0, s_noise=1.0, noise=None,
                               generator=None, allow_extrapolation=False):
    """One step of ComfyUI's `sample_euler_ancestral_cfg_pp` for epsilon predictions (its `alpha_s = alpha_t = 1`):

        x0 = x - sigma g  (g = uncond + scale (cond - uncond));  x_next = x0 + sigma_down uncond + s_noise sigma_up n

    sigma_down / sigma_up from k-diffusion's `get_ancestral_step(sigma, sigma_next, eta)`; sigma_next = 0 returns
    x0. The noise n is `noise` (a tensor of x's shape) or drawn with `generator` (like ComfyUI's
    default_noise_sampler: torch.randn of x's shape, dtype and device). One fused pass (`cfgpp_step`), plus one
    in-place add of the noise when sigma_up > 0. eta = 0 is `cfgpp_euler_step`."""
    op = "cfgpp_euler_ancestral_step"
    st, s = _cfgpp_args(op, x, cond, uncond, scale, allow_extrapolation)
    _finite(op, sigma=sigma, sigma_next=sigma_next, eta=eta, s_noise=s_noise)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not (sigma > 0 and 0 <= sigma_next <= sigma) or eta < 0:
        raise ValueError(f"fastguide.{op}: needs sigma > 0, 0 <= sigma_next <= sigma and eta >= 0, got sigma={sigma}, "
                         f"sigma_next={sigma_next}, eta={eta}")
    if noise is not None:
        _check_pair(op, x, noise, "noise")
    if sigma_next == 0:  # ComfyUI's denoising step: x = denoised
        return _op["cfgpp_step"](x, cond, uncond, 1.0, -sigma, 0.0, st, s)
    sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, float(eta))
    out = _op["cfgpp_step"](x, cond, uncond, 1.0, -sigma, sigma_down, st, s)
    if eta > 0 and s_noise > 0 and sigma_up > 0:
        if noise is None:
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        out.add_(noise, alpha=float(s_noise) * sigma_up)
    return out


def cfgpp_dpmpp_2m_step(x, cond, uncond, scale, sigma, sigma_next, *, old_uncond_denoised=None, sigma_prev=None,
                        allow_extrapolation=False):
    """One step of ComfyUI's `sample_dpmpp_2m_cfg_pp` (DPM-Solver++(2M) with CFG++) for epsilon predictions.

    With D = x - sigma g (g = uncond + scale (cond - uncond)), Du = x - sigma uncond, h = log(sigma / sigma_next):
        first step (old_uncond_denoised None) or sigma_next = 0:  x_next = D - e^-h Du + e^-h x
        otherwise, r = log(sigma_prev / sigma) / h:  x_next = ... - expm1(-h) / (2 r) (D - old_uncond_denoised)
    Returns (x_next, Du): pass Du back as `old_uncond_denoised` (with `sigma_prev=sigma`) on the next step.
    Two fused passes: the step (`cfgpp_step` on the first step, one lincomb of x, cond, uncond and the previous
    Du otherwise) and Du (one lincomb).
    """
    op = "cfgpp_dpmpp_2m_step"
    st, s = _cfgpp_args(op, x, cond, uncond, scale, allow_extrapolation)
    _finite(op, sigma=sigma, sigma_next=sigma_next)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not (sigma > 0 and 0 <= sigma_next <= sigma):
        raise ValueError(f"fastguide.{op}: needs sigma > 0 and 0 <= sigma_next <= sigma, got {sigma}, {sigma_next}")
    if old_uncond_denoised is not None:
        _check_pair(op, x, old_uncond_denoised, "old_uncond_denoised")
        _finite(op, sigma_prev=sigma_prev)
        if not float(sigma_prev) > sigma:
            raise ValueError(f"fastguide.{op}: sigma_prev must be > sigma ({sigma}) with old_uncond_denoised, "
                             f"got {sigma_prev!r}")
    uncond_denoised = _lincomb(op, [uncond, x], [1.0 - sigma, 1.0])  # x - sigma u, the differences first
    e = sigma_next / sigma  # exp(-h)
    if old_uncond_denoised is None or sigma_next == 0:  # D - e Du + e x = x - sigma g + e sigma u
        return _op["cfgpp_step"](x, cond, uncond, 1.0, -sigma, e * sigma, st, s), uncond_denoised
    h = math.log(sigma / sigma_next)
    r = math.log(float(sigma_prev) / sigma) / h
    k = -math.expm1(-h) / (2 * r)
    # x_next = (1 + k) x - sigma (1 + k) g + e sigma u - k Du_old, g = u + lam (c - u); anchored at x
    lam = _acc_scale(op, "scale", scale, cond)
    wc = -sigma * (1 + k) * lam
    wu = -sigma * (1 + k) * (1 - lam) + e * sigma
    return _lincomb(op, [x, cond, uncond, old_uncond_denoised],
                    [1.0 + k + wc + wu - k, wc, wu, -k]), uncond_denoised
