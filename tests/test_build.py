"""Packaging contract: schemas, backends report, fallbacks, the README commands and CI, the benchmark CLI."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

import fastguide
from fastguide import bench, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_registers_a_cpu_kernel_for_every_schema_and_for_nothing_else():
    """The schemas live in ops.SCHEMAS only; the C++ extension registers implementations (TORCH_LIBRARY_IMPL)."""
    if ops.CPU_BACKEND is None:
        pytest.fail(f"C++ extension did not load: {ops.CPU_ERROR}")
    for name, schema in zip(ops.OPS, ops.SCHEMAS):
        assert str(getattr(torch.ops.fastguide, name).default._schema) == f"fastguide::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastguide::{name}", "CPU"), name
    cpu = {n for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU") if n.startswith("fastguide::")}
    assert cpu == {f"fastguide::{name}" for name in ops.OPS}
    # an implementation whose op has no schema (a kernel ops.py lacks) would be a dangling registration
    assert not [d for d in torch._C._dispatch_find_dangling_impls() if "fastguide::" in d]


IMPORT_ORDER_SCRIPT = r"""
import importlib.util, glob, os, sys, torch
pkg = importlib.util.find_spec("fastguide").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("fastguide._C", glob.glob(os.path.join(pkg, "_C*.so"))[0])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
sys.modules["fastguide._C"] = ext
assert any("fastguide::cfg" in d for d in torch._C._dispatch_find_dangling_impls())  # kernels, no schema yet
import fastguide
c, u = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
err = (fastguide.cfg(c, u, 4.0) - (u + 4.0 * (c - u))).abs().max().item()
print(fastguide.backends()["cfg"]["cpu"], err < 1e-5,
      torch._C._dispatch_has_kernel_for_dispatch_key("fastguide::cfg", "CPU"),
      not [d for d in torch._C._dispatch_find_dangling_impls() if "fastguide::" in d])
"""


def test_extension_loaded_before_the_schemas_works():
    """The other import order: the extension's CPU kernels registered before ops.py defines the schemas
    (the usual order, `import fastguide._C` or `import fastguide`, defines them first: every other test)."""
    out = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["C++", "(fastguide._C)", "True", "True", "True"]


def test_triton_kernels_install_inside_fastguide():
    import fastguide.kernels
    assert fastguide.kernels.__name__ == "fastguide.kernels"
    assert os.path.realpath(os.path.dirname(fastguide.kernels.__file__)) == os.path.join(ROOT, "kernels")


def test_info_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "fastguide", "info"], capture_output=True, text=True, check=True).stdout
    for name in ops.OPS:
        assert re.search(rf"^  {name}$", out, re.M)
    assert "C++ (fastguide._C)" in out and "Triton" in out
    from fastguide import _C, METHODS
    assert re.search(rf"^  CPU ISA: {_C.get_cpu_isa()} ", out, re.M)
    assert re.search(r"^  lab: ready \(weights \d+\.\d MB", out, re.M)  # weights shipped, sklearn installed
    for name in METHODS:  # every registered guidance method, with its peer
        assert re.search(rf"^  {name} +.*\[equals: ", out, re.M)


FALLBACK_SCRIPT = r"""
import sys, warnings
sys.modules["fastguide._C"] = None   # extension missing
sys.modules["triton"] = None         # triton missing
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, fastguide
    import fastguide.ops
n_warn = sum("C++ extension unavailable" in str(x.message) for x in w)
c, u = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
ref = u.double() + 4.0 * (c.double() - u.double())
err = (fastguide.cfg(c, u, 4.0).double() - ref).abs().max().item()
b = fastguide.backends()["cfg"]
print(n_warn, err < 1e-5, b["cpu"].startswith("PyTorch eager fallback"), b["cuda"].startswith("PyTorch eager fallback"))
"""


def test_import_without_extension_or_triton_falls_back_and_warns_once():
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "default"}).stdout.split()
    assert out == ["1", "True", "True", "True"]


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("fastguide bench") and cmds[1].endswith("python -m pytest -q tests")
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert cmds[1] in ci


@pytest.mark.parametrize("case,n", [("cfg", 3), ("cfg_rescale", 3), ("pag", 4), ("cfg_zero_star", 3), ("apg", 5),
                                    ("stats", 3), ("fresca", 3), ("frecas", 3), ("fdg", 3)])
def test_bench_floor_bytes(case, n):
    """Floor = each input read once + the outputs written once (APG: cond, uncond, buffer in; buffer, out)."""
    assert bench.CASES[case].bytes_moved(1000, 2) == n * 1000 * 2


def test_bench_quick_cfg_writes_csv_and_png(tmp_path, capsys):
    """`fastguide bench --quick --ops cfg` (the compile peer included) with --csv and --plot."""
    path, png = tmp_path / "out.csv", tmp_path / "out.png"
    assert bench.main(["--quick", "--ops", "cfg", "--csv", str(path), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "cfg" in table and "%floor" in table and "launches" in table
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 1
    r = rows[0]
    for col in ("device", "torch", "triton", "diffusers", "fastguide_rev", "date", "dtype", "dims", "bytes",
                "fastguide_us", "fastguide_iqr_us", "fastguide_GBps", "fastguide_launches", "diffusers_us",
                "eager_us", "compile_us", "floor_us", "pct_floor", "x_diffusers", "x_eager", "x_compile"):
        assert r[col], col
    assert r["dims"] == "2x4x128x128" and r["dtype"] == "fp32" and float(r["fastguide_us"]) > 0
    assert r["fastguide_launches"] == "1" and int(r["diffusers_launches"]) >= 3  # fused vs sub, mul, add
    assert int(r["bytes"]) == 3 * 2 * 4 * 128 * 128 * 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nope"])


def test_step_bench_on_tiny_unet():
    rows = bench.step_bench(torch.device("cpu"), latent=8, min_run_time=0.01)
    assert [r["guidance"] for r in rows] == list(bench.STEP_GUIDANCE)
    for r in rows:
        assert r["denoiser_ms"] > 0 and 0 < r["fastguide_share"] < 1 and r["step_speedup"] > 0
    assert "step speed-up" in bench.format_step_table(rows)


def test_e2e_bench_counts_network_evaluations():
    rows = bench.e2e_bench(torch.device("cpu"), steps=(10,), size=8)
    by = {r["policy"]: r for r in rows}
    assert by["cfg"]["nfe"] == 20 and by["cfg"]["nfe_skipped"] == 0 and by["cfg"]["rel_l2_latents"] == 0
    for name, r in by.items():
        assert r["nfe"] + r["nfe_skipped"] == 20 and r["wall_s"] > 0, name
    assert by["interval(middle)"]["nfe_skipped"] == 3  # sigmas of steps 2..8 lie inside: steps 0, 1, 9 skip
    assert by["linear_ag"]["nfe_skipped"] == 2  # steps 1 and 3 of the first half
    assert "PSNR" in bench.format_e2e_table(rows)


def test_ci_smoke_tests_the_wheel_outside_the_tree():
    """After the README's tests, .ci/run builds sdist + wheel and runs tests/smoke_wheel.py against the wheel
    installed in a fresh environment; the smoke script is no pytest module (it needs the installed wheel)."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m build --no-isolation" in ci and "smoke_wheel.py" in ci
    assert ci.index("python -m pytest -q tests") < ci.rindex("smoke_wheel.py")
    assert os.path.isfile(os.path.join(ROOT, "tests", "smoke_wheel.py"))  # not test_*.py: pytest leaves it alone
