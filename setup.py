"""Build fastguide: the C++ extension (op schemas + fused CPU kernels) and the Triton kernels.

Build against the torch that is already installed, without build isolation:

    pip install torch==2.13.0            # or any torch >= 2.4 you already have
    pip install --no-build-isolation -e .

An isolated build would pull a second (multi-GB CUDA) torch just to compile this.
If the C++ build fails, the package still imports and falls back to plain PyTorch
(see `python -m fastguide info`); set FASTGUIDE_REQUIRE_EXT=1 to make a failed build fatal.
"""
import os
import platform
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only without torch
    sys.exit("fastguide's build needs torch installed first: pip install torch, then "
             "pip install --no-build-isolation -e .")


def _cpu_flags():
    """-O3 plus the widest x86 vector ISA the build machine has (the extension is built where it runs)."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        if " avx2 " in info and " fma " in info and " f16c " in info:
            flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


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


setup(
    packages=["fastguide", "fastguide.kernels"],
    # Triton kernels live in the top-level kernels/ folder but install as fastguide.kernels.
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "fastguide._C",
            sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            extra_compile_args=_cpu_flags(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)},
)
