"""CI smoke test of the built distributions (run by .ci/run; not a pytest module).

    python smoke_wheel.py DIST_DIR

checks that the sdist in DIST_DIR carries every C++ source, the Triton kernels, README and LICENSE; that the
wheel carries the compiled extension, fastguide/kernels/*.py and py.typed; then, run from outside the source
tree with that wheel installed (and nothing else but torch), that fastguide imports from site-packages, loads
its C++ extension, `python -m fastguide info` works, and cfg / apg on CPU tensors equal plain torch math.
"""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

FAILED = []


def check(ok, what):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def check_sdist(dist):
    (path,) = glob.glob(os.path.join(dist, "fastguide-*.tar.gz"))
    print(f"sdist {os.path.basename(path)}")
    with tarfile.open(path) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in ("README.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in", "fastguide/_version.py",
              "fastguide/py.typed", "kernels/__init__.py"):
        check(f in names, f"sdist has {f}")
    check(any(n.startswith("csrc/") and n.endswith(".cpp") for n in names), "sdist has csrc/*.cpp")
    check(any(n.startswith("csrc/") and n.endswith(".h") for n in names), "sdist has csrc/*.h")
    # Every C++ file of the checkout this was built from (when run from it), subfolders included.
    src = os.environ.get("FASTGUIDE_SOURCE")
    if src:
        for root, _, files in os.walk(os.path.join(src, "csrc")):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), src).replace(os.sep, "/")
                check(rel in names, f"sdist has {rel}")
        for f in sorted(os.listdir(os.path.join(src, "kernels"))):
            if f.endswith(".py"):
                check(f"kernels/{f}" in names, f"sdist has kernels/{f}")


def check_wheel(dist):
    (path,) = glob.glob(os.path.join(dist, "fastguide-*.whl"))
    print(f"wheel {os.path.basename(path)}")
    names = set(zipfile.ZipFile(path).namelist())
    check(any(n.startswith("fastguide/_C") and n.endswith((".so", ".pyd")) for n in names), "wheel has fastguide/_C*.so")
    check("fastguide/py.typed" in names, "wheel has fastguide/py.typed")
    for f in ("__init__.py", "apg.py", "guidance.py"):
        check(f"fastguide/kernels/{f}" in names, f"wheel has fastguide/kernels/{f}")
    check(any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "wheel has the LICENSE")
    for f in ("digits_unet.safetensors", "digits_unet_early.safetensors", "noisy_classifier.safetensors",
              "eval_classifier.safetensors"):
        check(f"fastguide/lab/weights/{f}" in names, f"wheel has the lab's weights/{f}")
    check("fastguide/lab/run.py" in names, "wheel has fastguide/lab")
    check(not any(n.startswith(("csrc/", "tests/", "kernels/")) for n in names), "wheel has no stray top-level folders")


def check_installed():
    import torch

    import fastguide
    import fastguide.kernels
    from fastguide import ops
    print(f"installed fastguide {fastguide.__version__} at {os.path.dirname(fastguide.__file__)}")
    pkg = os.path.dirname(os.path.abspath(fastguide.__file__))
    check("site-packages" in pkg, "fastguide imports from site-packages, not a source tree")
    check(os.path.isfile(os.path.join(pkg, "py.typed")), "py.typed installed")
    check(fastguide.kernels.__name__ == "fastguide.kernels" and
          os.path.dirname(os.path.abspath(fastguide.kernels.__file__)) == os.path.join(pkg, "kernels"),
          "fastguide.kernels imports from the package")
    check(ops.CPU_BACKEND is not None, f"C++ extension loads ({ops.CPU_ERROR or 'ok'})")
    from importlib import metadata
    check(metadata.version("fastguide") == fastguide.__version__, "installed metadata version == __version__")
    check(any(e.name == "fastguide" and e.value == "fastguide.__main__:main"
              for e in metadata.entry_points(group="console_scripts")), "console script entry point")

    r = subprocess.run([sys.executable, "-m", "fastguide", "info"], capture_output=True, text=True)
    check(r.returncode == 0 and "C++ (fastguide._C)" in r.stdout, "python -m fastguide info")
    print("\n".join("      " + ln for ln in r.stdout.splitlines()[:4]))
    r = subprocess.run([sys.executable, "-m", "fastguide", "bench", "--quick", "--plot", "x.png"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "pip install matplotlib" in r.stderr,
          "fastguide bench --plot without matplotlib: exit 2 naming the install command")

    torch.manual_seed(0)
    c, u = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    ref = u.double() + 7.5 * (c.double() - u.double())
    check((fastguide.cfg(c, u, 7.5).double() - ref).abs().max().item() < 1e-4, "cfg == uncond + s * (cond - uncond)")
    # APG without momentum and clamp (eta = 0): uncond + s * (the part of cond - uncond orthogonal to cond), per sample.
    d = (c - u).double().flatten(1)
    cn = torch.nn.functional.normalize(c.double().flatten(1), dim=1)
    orth = d - (d * cn).sum(1, keepdim=True) * cn
    ref = (u.double().flatten(1) + 7.5 * orth).view_as(c)
    got = fastguide.apg(c, u, 7.5, eta=0.0).double()
    check((got - ref).abs().max().item() < 1e-4, "apg (eta=0) == uncond + s * orthogonal part of (cond - uncond)")
    buf = fastguide.MomentumBuffer(-0.5)
    fastguide.apg(c, u, 7.5, momentum_buffer=buf, norm_threshold=15.0)
    check(torch.isfinite(fastguide.apg(c, u, 7.5, momentum_buffer=buf, norm_threshold=15.0)).all().item(),
          "apg with momentum and norm threshold")


def main():
    if len(sys.argv) > 1:
        check_sdist(sys.argv[1])
        check_wheel(sys.argv[1])
    check_installed()
    if FAILED:
        print(f"wheel smoke test: {len(FAILED)} check(s) failed")
        return 1
    print("wheel smoke test: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
