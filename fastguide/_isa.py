"""Which copy of the C++ CPU kernels runs: baseline, avx2 (AVX2 + FMA + F16C) or avx512 (F, BW, VL).

The extension holds one copy of every element loop per ISA and uses the widest this CPU supports
(csrc/isa.cpp). `FASTGUIDE_CPU_ISA=baseline|avx2|avx512`, read when `fastguide._C` is imported, forces
one; an unknown or unsupported value makes every CPU op call raise a ValueError that says so.
`fastguide._C.set_cpu_isa(name)` switches at run time (process-wide), `use(name)` for a block.
"""
import contextlib
import os


def describe():
    """One line for `fastguide info`: the copy in use and what this CPU supports, or why there is none."""
    try:
        from . import _C
    except ImportError as exc:
        return f"n/a (C++ extension unavailable: {exc})"
    supported = ", ".join(_C.supported_cpu_isas())
    env = os.environ.get("FASTGUIDE_CPU_ISA")
    how = f"FASTGUIDE_CPU_ISA={env}" if env else "the widest supported"
    try:
        return f"{_C.get_cpu_isa()} ({how}; this CPU supports: {supported})"
    except ValueError as exc:
        return f"none, CPU ops raise: {exc}"


@contextlib.contextmanager
def use(name):
    """Run the CPU ops of the block on the kernel copy `name`, then restore the previous one."""
    from . import _C

    previous = _C.get_cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)
