"""Launch plans shared by the kernel families.

Every launcher builds its launches with a pure `_plan_*` function: tensors in (real, or `meta` tensors
for bench/aot.py), a list of `Launch` out. The real call runs them; bench/aot.py compiles the very same
(kernel, argument types, constexprs, num_warps, num_stages) ahead of time for sm_80 / sm_90 and checks
registers, spills, shared memory and the grid, so the check cannot drift from what runs.
"""
import dataclasses
import os

import torch
import triton
import triton.language as tl

# Set by the test suite: outputs start as NaN so an element a kernel forgets shows up.
POISON = os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1"

# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
GRID_MAX = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: object          # the @triton.jit function
    grid: tuple
    args: tuple             # positional, non-constexpr arguments (tensors, ints, floats)
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if any(g > m for g, m in zip(self.grid, GRID_MAX)) or len(self.grid) > 3:
            raise ValueError(f"fastguide: {self.kernel.__name__} grid {self.grid} exceeds CUDA's limits {GRID_MAX}")

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def scalar(value, ACC: tl.constexpr):
    """A float kernel argument (annotated tl.float64: exact for fp64 inputs) as an ACC scalar. tl.full rather
    than .to(): under TRITON_INTERPRET the argument stays a Python float, which tl.full also converts exactly."""
    return tl.full([], value, ACC)


def run(plans):
    for launch in plans:
        launch()


def acc_dtype(dtype):
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise (fp16 / bf16 / fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def scale_arg(t, value, like):
    """(pointer tensor, float value, element stride, has_tensor) for a scale given as a tensor or a float.

    The stride is the tensor's own (a `scale[::2]` view, or 0 for an expanded / 0-d scale); the float
    goes to kernel parameters annotated tl.float64, so fp64 inputs see it unrounded.
    """
    if t is None:
        return like, float(value), 0, False
    return t, 0.0, (t.stride(0) if t.dim() == 1 else 0), True


def new_output(like):
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if POISON and out.device.type != "meta":
        out.fill_(float("nan"))
    return out


def warps_for(elements):
    """num_warps for a 1-D tile of `elements`: 16 elements (four 16-byte fp32 vectors) per thread, 1..8 warps."""
    return max(1, min(8, elements // 512))
