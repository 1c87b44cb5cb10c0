"""GPU-readiness without a GPU: every Triton specialisation compiles for sm_80 / sm_90 without spills,
within the shared-memory limit, and every grid stays within CUDA's limits (bench/aot.py)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import aot  # noqa: E402
from fastguide.kernels._launch import GRID_MAX, Launch  # noqa: E402


def _ptxas():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(_ptxas()), reason="no ptxas in the triton wheel: cannot compile for CUDA")
def test_aot_ci_subset_compiles_without_spills():
    # A subprocess: this test session runs under TRITON_INTERPRET=1, where @triton.jit yields interpreted
    # functions that triton.compile cannot take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "aot.py"), "--subset", "ci"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "\n0 failures" in r.stdout


def test_grids_within_cuda_limits_on_huge_shapes():
    """Shapes only (meta tensors): a [1, 16, 128, 256, 256] video latent, [1, 3, 8192, 8192] and a tensor of
    more than 2^31 elements. A [B, cdiv(N, 2048)] grid had 131072 blocks on axis y for the first."""
    launches = aot.huge_grid_checks()
    assert {p.kernel.__name__ for *_, p in launches} >= {"_combine", "_moments", "_finalize", "_cfgpp", "_apg_pass1",
                                                          "_apg_coef", "_apg_pass2", "_stats", "_stats_final"}
    for case, shape, dt, p in launches:
        assert len(p.grid) <= 3 and all(0 < g <= m for g, m in zip(p.grid, GRID_MAX)), (case, p.grid)
    big = [p for case, *_, p in launches if case.endswith("2^31+")]
    assert big and max(aot.meta(s, torch.float32).numel() for _, s, *_ in launches) > 2**31


def test_frequency_grids_on_the_matrix_routes_extremes():
    for name, shape in aot.FREQ_PLANES.items():
        for _, plans in aot.frequency_cases(shape, torch.float32):
            for p in plans:
                assert all(g <= m for g, m in zip(p.grid, GRID_MAX)), (name, p.grid)


def test_launch_refuses_a_grid_over_cuda_limits():
    from fastguide.kernels import guidance
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        Launch(guidance._combine, (1, 65536), (), {})
