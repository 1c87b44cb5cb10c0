"""Triton kernels of fastguide (installed as ``fastguide.kernels``; importing it needs triton).

Each module holds one kernel family and plain-tensor launchers that take the op's arguments.
The launchers run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).
Each launcher's launch configuration comes from a pure ``_plan_*`` function (see ``_launch.py``), which
``bench/aot.py`` also compiles ahead of time for sm_80 / sm_90 to check registers, spills, shared memory
and grids without a GPU.
"""
