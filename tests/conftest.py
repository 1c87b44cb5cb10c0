"""Test set-up shared by every test module.

* Without a GPU, Triton kernels run under the interpreter on CPU tensors (TRITON_INTERPRET=1 must
  be set before triton is imported, hence here, before fastguide is imported).
* FASTGUIDE_POISON_OUTPUTS=1 makes every kernel fill its output with NaN before writing it, so a
  single element the kernel forgets shows up as a NaN in the comparisons.
"""
import os

os.environ.setdefault("FASTGUIDE_POISON_OUTPUTS", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
