"""The command line: missing optional dependencies stop a run before any work, help shows examples and exit
codes, bad usage exits 2, third-party chatter is hidden and counted. No full benchmark runs here."""
import argparse
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastguide import bench
from fastguide.__main__ import main

# Runs `fastguide bench --quick --plot x.png` with matplotlib unimportable (a meta-path blocker, as if it
# were not installed) and every benchmark entry point booby-trapped: prints the exit code and main()'s time.
NO_MATPLOTLIB = r"""
import sys, time

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
import fastguide.bench
from fastguide.__main__ import main

def ran(*args, **kwargs):
    raise AssertionError("a benchmark ran")

for fn in ("run_bench", "step_bench", "e2e_bench", "median_us", "environment"):
    setattr(fastguide.bench, fn, ran)
t0 = time.perf_counter()
code = main(["bench", "--quick", "--plot", "x.png"])
print(code, round(time.perf_counter() - t0, 1))
"""


def test_plot_without_matplotlib_fails_fast_with_the_install_command(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    code, seconds = r.stdout.split()
    assert code == "2"
    assert float(seconds) < 10, "checking dependencies should take seconds, not a benchmark"
    assert "--plot needs matplotlib" in r.stderr and "pip install matplotlib" in r.stderr
    assert "pip install 'fastguide[bench]'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.png").exists()


def _args(*argv):
    return bench.build_parser().parse_args(list(argv))


def _missing(monkeypatch, *names):
    real = bench._importable
    monkeypatch.setattr(bench, "_importable", lambda name: name not in names and real(name))


def test_missing_diffusers_drops_the_column_and_sections_with_a_note(monkeypatch):
    _missing(monkeypatch, "diffusers")
    a = _args()
    errors, notes, plan = bench.check_dependencies(a, list(bench.IMPLS), list(bench.CASES))
    assert errors == []
    assert "diffusers" not in plan["impls"] and not plan["step"] and not plan["e2e"]
    assert len(notes) == 3 and all("pip install" in n for n in notes)


def test_asking_by_name_for_what_is_missing_is_bad_usage(monkeypatch):
    _missing(monkeypatch, "diffusers", "transformers")
    for argv, needle in ((["--impls", "diffusers"], "--impls diffusers needs diffusers"),
                         (["--quick", "--step", "on"], "--step on needs diffusers"),
                         (["--quick", "--compile-step"], "--compile-step needs diffusers"),
                         (["--quick", "--e2e", "on"], "--e2e on needs diffusers and transformers")):
        a = _args(*argv)
        errors, _, _ = bench.check_dependencies(a, a.impls.split(",") if a.impls else list(bench.IMPLS),
                                                list(bench.CASES))
        assert len(errors) == 1 and needle in errors[0] and "pip install" in errors[0], (argv, errors)


def test_missing_kornia_drops_only_fdgs_diffusers_column(monkeypatch):
    _missing(monkeypatch, "kornia")
    errors, notes, plan = bench.check_dependencies(_args("--quick"), list(bench.IMPLS), list(bench.CASES))
    assert errors == [] and plan["no_diffusers"] == ["fdg"] and "diffusers" in plan["impls"]
    assert len(notes) == 1 and "pip install kornia" in notes[0]


def test_missing_tqdm_gives_plain_progress_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    step, close = bench._progress(4, sys.stderr)
    for label in ("fp32 sdxl cfg: fastguide", "fp32 sdxl cfg: eager", "fp32 sdxl apg: fastguide", "e2e: x"):
        step(label)
    close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[0].endswith("fp32 sdxl cfg") and lines[1].endswith("fp32 sdxl apg")


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["bench", "--help"]])
def test_help_shows_examples_and_exit_codes(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit codes:" in out
    assert "  0  success" in out and "  1  failure" in out and "  2  bad usage" in out
    sub = argv[0] if argv[0] != "--help" else ""
    assert f"fastguide {sub}".strip() in out.split("examples:", 1)[1]


@pytest.mark.parametrize("argv", [["frobnicate"], ["bench", "--nope"], ["bench", "--ops", "nope"],
                                  ["bench", "--dtype", "fp8"], ["bench", "--step", "maybe"], ["info", "extra"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "examples:" in capsys.readouterr().err


def test_bad_usage_exit_code_through_the_interpreter():
    r = subprocess.run([sys.executable, "-m", "fastguide", "bench", "--shapes", "nope"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "unknown shape" in r.stderr


def test_info_works(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastguide ") and "  cfg\n" in out and "    cpu " in out


def test_info_says_where_each_method_runs(capsys):
    """Each registered method's line is followed by its route: enable (classic pipelines) or the guider route only,
    naming the branch enable cannot build or the second model."""
    from fastguide import methods
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, m in methods.METHODS.items():
        i = next(k for k, line in enumerate(lines) if line.startswith(f"  {name} ") and "[equals:" in line)
        route = lines[i + 1].strip()
        assert route.startswith("-> enable: yes" if m.enable_ready else "-> enable: no"), (name, route)
        if not m.enable_ready:
            assert f"MultiBranchGuidance(method={name!r}" in route, route
        for key in m.model_keys:
            assert f"second model ({key!r})" in route and f"models={{{key!r}: ...}}" in route, route
    route = {line.split()[0]: lines[k + 1] for k, line in enumerate(lines) if "[equals:" in line}
    assert "enable: yes with middle_prompt=... (the 'middle' prompt branch" in route["dual_cfg"]
    assert "enable: yes with empty_prompt='' (default)" in route["perp_neg"] and "enable: yes" in route["cfg"]


def test_quiet_hides_profiler_lines_and_warnings_and_sums_them_up(capfd):
    q = bench.QuietThirdParty()
    with q:
        print("progress", file=q.stream, flush=True)
        n = bench.count_launches(lambda: torch.randn(8) + 1, torch.device("cpu"))
        os.write(2, b"USDT:2026-11-23 12:50:55 6299:6299 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"Guiders are currently an experimental feature under active development.\n")
        warnings.warn("something third-party", UserWarning)
    err = capfd.readouterr().err
    assert n >= 1
    assert "progress" in err and "USDT" not in err and "Guiders" not in err and "third-party" not in err
    c = q.counts()
    assert c["torch profiler log lines"] >= 1
    assert any(k.startswith("Guiders are currently") for k in c)
    assert any(k.startswith("UserWarning: something third-party") for k in c)
    line = q.summary()
    assert "\n" not in line and "-v" in line and f"hid {sum(c.values())} lines" in line


def test_quiet_shows_what_it_hid_when_the_run_fails(capfd):
    with pytest.raises(RuntimeError):
        with bench.QuietThirdParty():
            os.write(2, b"context for the failure\n")
            raise RuntimeError("boom")
    assert "context for the failure" in capfd.readouterr().err


def test_verbose_hides_nothing(capfd):
    with bench.QuietThirdParty(enabled=False) as q:
        os.write(2, b"visible\n")
    assert "visible" in capfd.readouterr().err and q.summary() is None


def test_bench_parser_is_shared_by_both_entry_points():
    from fastguide.__main__ import build_parser
    top = build_parser().subcommands["bench"]
    own = bench.build_parser()
    opts = lambda p: sorted(o for a in p._actions for o in a.option_strings)  # noqa: E731
    assert opts(top) == opts(own) and isinstance(own.parse_args([]), argparse.Namespace)


# --- the benchmark's cases: the right floor, and every implementation of a case doing the same job ----------
# The methods added in session 4 (issue 14): diffusers twins and ComfyUI's methods (with RLG and the CFG++ steps).
NEW_CASES = ("mag", "tcfg", "apg_mix", "apg_mix_cfg", "ltx2", "dual_cfg", "perp_neg", "rlg", "cfg_norm", "mahiro",
             "renorm_cfg", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp")


@pytest.mark.parametrize("case,n", [("mag", 3), ("tcfg", 3), ("apg_mix", 5), ("apg_mix_cfg", 5), ("ltx2", 4),
                                    ("dual_cfg", 4), ("perp_neg", 4), ("rlg", 5), ("cfg_norm", 3), ("mahiro", 3),
                                    ("renorm_cfg", 3), ("euler_ancestral_cfg_pp", 5), ("dpmpp_2m_cfg_pp", 6)])
def test_bench_floor_bytes_of_the_new_methods(case, n):
    """Floor = each input read once + the outputs written once (APMix: APG's buffer in and out; DPM++ 2M: x_next
    and uncond_denoised out; Euler ancestral: its noise is an input)."""
    assert bench.CASES[case].bytes_moved(1000, 2) == n * 1000 * 2


def test_every_registered_method_has_a_bench_case():
    # methods whose combine is another case's op: frequency (fresca / frecas), weak_model and autoguidance (cfg's op),
    # seg (pag's)
    covered = {"frequency": "fresca", "weak_model": "cfg", "seg": "pag", "autoguidance": "cfg"}
    from fastguide import methods
    assert set(NEW_CASES) <= set(bench.CASES)
    missing = [m for m in methods.METHODS if covered.get(m, m) not in bench.CASES]
    assert missing == []


def _outputs(fn):
    out = fn()
    return [t.double() for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("shape", [(2, 4, 8, 6), (1, 16, 8)], ids=["4d", "3d"])
@pytest.mark.parametrize("case", NEW_CASES)
def test_bench_peers_compute_the_same_job(case, shape):
    """fastguide, its diffusers / upstream peer and the eager math of a case give one result on one input set
    (so the bench compares like with like); torch.compile of that math is left to the bench itself."""
    c = bench.CASES[case]
    sets = [[torch.randn(shape) for _ in range(c.n_inputs)]]
    ref = _outputs(c.fastguide(sets))
    impls = {"eager": bench._cycled(c.math(sets), sets)}
    if c.diffusers is not None and c.diffusers_applies(shape):
        impls["diffusers"] = c.diffusers(sets)
    if c.upstream is not None:
        impls["upstream"] = bench._cycled(c.upstream(sets), sets)
    # a peer on every shape, except diffusers' MAG on 4-D inputs (it fails there: a matrix norm over 3 dims)
    assert len(impls) == (1 if (case, len(shape)) == ("mag", 4) else 2), impls
    for name, fn in impls.items():
        out = _outputs(fn)
        assert len(out) == len(ref), name
        for o, r in zip(out, ref):
            err = ((o - r).abs().max() / r.abs().max()).item()
            assert err < 1e-5, (case, name, err)
