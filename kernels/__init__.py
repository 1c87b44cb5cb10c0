"""Triton kernels of fastguide (installed as ``fastguide.kernels``; importing it needs triton).

Each module holds one kernel family and plain-tensor launchers that take the op's arguments.
The launchers run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).
"""
