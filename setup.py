"""Build fastguide: the C++ extension (the fused CPU kernels; the op schemas are in fastguide/ops.py) and the Triton kernels.

Build against the torch that is already installed, without build isolation:

    pip install torch==2.13.0            # or any torch >= 2.4 you already have
    pip install --no-build-isolation -e .

An isolated build would pull a second (multi-GB CUDA) torch just to compile this.
If the C++ build fails, the package still imports and falls back to plain PyTorch
(see `python -m fastguide info`); set FASTGUIDE_REQUIRE_EXT=1 to make a failed build fatal.
"""
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only without torch
    sys.exit("fastguide's build needs torch installed first: pip install torch, then "
             "pip install --no-build-isolation -e .")


# One set of flags for every source, no -m<isa>: the extension runs on any CPU of its architecture.
# The AVX2 and AVX-512 copies of the kernels get their instruction sets from `#pragma GCC target`
# inside csrc/kernels_avx2.cpp / kernels_avx512.cpp, and csrc/isa.cpp picks one at load time.
# -ffp-contract=off: no a*b+c fused into an FMA, so every copy rounds the same (bitwise-equal results
# for the element-wise ops) and the fp32 CFG combine stays bit for bit diffusers'.
# -g0 overrides Python's default -g: debug info for torch's headers more than doubles each file's compile
# time (42 s -> 18 s for csrc/guidance.cpp on the 2-core CI machine) and makes the .so 20+ MB.
# -fno-math-errno: sqrt may vectorise (nothing reads errno; sqrt stays correctly rounded, so results are unchanged):
# Mahiro's per-element sign-sqrt (csrc/channel.cpp) stays scalar without it, and a pragma does not do it.
CPU_FLAGS = ["-O3", "-g0", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]


class OptionalBuildExt(BuildExtension):
    """A failed C++ build leaves a pure-PyTorch fastguide rather than no fastguide."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if os.environ.get("FASTGUIDE_REQUIRE_EXT") == "1":
                raise
            print(f"WARNING: fastguide C++ extension failed to build ({exc}); "
                  "the CPU ops will use the plain PyTorch fallback.", file=sys.stderr)


# Package metadata (name, version, dependencies, entry points) lives in pyproject.toml's [project].
setup(
    packages=["fastguide", "fastguide.kernels", "fastguide.lab"],
    # Triton kernels live in the top-level kernels/ folder but install as fastguide.kernels.
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "fastguide._C",
            sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            extra_compile_args=CPU_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)},
)
