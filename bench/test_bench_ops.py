"""pytest-benchmark suite over the same cases as `fastguide bench` (kept out of the default test run).

    pytest bench/ --benchmark-only                      # CPU (or CUDA when available)
    pytest bench/ --benchmark-only -k "sdxl and apg"    # a subset
    pytest bench/ --benchmark-only --benchmark-json out.json

Each case/shape/implementation is one benchmark; `extra_info` carries the floor bytes so GB/s can be
computed from the JSON. CUDA timings include a synchronize per call (pytest-benchmark times on the host).
"""
import pytest
import torch

from fastguide import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = ("sdxl", "sd15", "flux", "sd3", "video")
IMPLS = ("fastguide", "diffusers", "upstream", "eager", "compile")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(bench.CASES))
def test_op(benchmark, case, shape, impl):
    c = bench.CASES[case]
    if not c.applies(bench.SHAPES[shape]):
        pytest.skip(f"{case} is not defined on {shape} {bench.SHAPES[shape]} (e.g. fdg needs [B, C, H, W])")
    if impl == "diffusers" and c.diffusers is None:
        pytest.skip(f"diffusers has no implementation of {case}")
    if impl == "diffusers" and not c.diffusers_applies(bench.SHAPES[shape]):
        pytest.skip(f"diffusers' {case} fails on {shape} {bench.SHAPES[shape]} (MAG: a matrix norm over 3+ dims)")
    if impl == "upstream" and c.upstream is None:
        pytest.skip(f"{case} has no upstream (ComfyUI node / paper) math here: its peer is diffusers' guider")
    sets = bench._input_sets(c, bench.SHAPES[shape], torch.float32, DEVICE)
    if impl == "fastguide":
        fn = c.fastguide(sets)
    elif impl == "diffusers":
        fn = c.diffusers(sets)
    elif impl == "upstream":
        fn = bench._cycled(c.upstream(sets), sets)
    else:
        math_fn = c.math(sets)
        fn = bench._cycled(torch.compile(math_fn, dynamic=False) if impl == "compile" else math_fn, sets)
    fn()  # warm-up / compile
    benchmark.extra_info["floor_bytes"] = c.bytes_moved(sets[0][0].numel(), sets[0][0].element_size())
    benchmark(lambda: (fn(), _sync()))
