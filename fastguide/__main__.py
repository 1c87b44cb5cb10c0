"""Command line: `fastguide info` (which backends are live) and `fastguide bench` (see bench.py)."""
import argparse
import sys

from ._version import __version__

EXIT_CODES = """exit codes:
  0  success
  1  failure: an error while running (its traceback is printed)
  2  bad usage: an unknown command, option or name, or an optional dependency the options need is missing"""

EPILOG = f"""examples:
  fastguide info                  which backend (C++, Triton, PyTorch fallback) serves each op here
  fastguide bench --quick         fastguide against diffusers / ComfyUI, eager, torch.compile, the memcpy floor
  fastguide bench --help          every benchmark option
  fastguide lab --quick           every guidance method measured on the shipped digits model (minutes)
  python -m fastguide info        the same without the console script

{EXIT_CODES}"""

INFO_EPILOG = f"""examples:
  fastguide info
  python -m fastguide info        (the same, without the console script on PATH)

{EXIT_CODES}"""


def info():
    import torch

    from . import _isa, methods, ops
    print(f"fastguide {__version__}  (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    print(f"  CPU ISA: {_isa.describe()}")
    print(f"  lab: {_lab_status()}")
    print("ops:")
    for name, per_device in ops.backends().items():
        print(f"  {name}")
        for device, backend in per_device.items():
            print(f"    {device:<6} {backend}")
    print("guidance methods (fastguide.METHODS), and where each runs: fastguide.enable(pipe, guidance=NAME) on a "
          "classic pipeline, or only the guider route (fastguide.diffusers guiders):")
    for name, m in methods.METHODS.items():
        print(f"  {name:<14} {m.summary}  [equals: {m.peer}]")
        print(f"  {'':<14} -> {_route(m)}")
    return 0


def _route(m):
    """Where a registered method runs: `enable` on classic pipelines (`Method.enable_ready`: every branch comes
    from the pipeline's own batch, a second model passed as models=, or an extra prompt enable encodes), or only as
    a guider."""
    models = f"models={{{', '.join(repr(k) + ': ...' for k in m.model_keys)}}}" if m.model_keys else ""
    guider = "fastguide.diffusers." + (m.twin or f"MultiBranchGuidance(method={m.name!r}{', ' + models if models else ''})")
    if m.enable_ready:
        second = f" with {models} (a second model ({', '.join(repr(k) for k in m.model_keys)}))" if models else ""
        for branch, param in m.prompts.items():  # an extra prompt, encoded by the pipeline's text encoder(s)
            given = f"{param}=..." if m.params[param] is None else f"{param}={m.params[param]!r} (default)"
            ip2p = "; StableDiffusionInstructPix2PixPipeline: its image condition" if branch == "middle" else ""
            second += (f" with {given} (the {branch!r} prompt branch, encoded by the pipeline's text encoder(s): "
                       f"StableDiffusion / StableDiffusionXL pipelines{ip2p})")
        return f"enable: yes{second}; guider route: {guider}"
    from . import methods
    need = sorted(set(m.branches) - set(methods.ENABLE_BRANCHES) - set(m.models) - set(m.prompts))
    where = " (enable: StableDiffusionInstructPix2PixPipeline's [text, image, uncond] batch)" if need == ["middle"] else ""
    return (f"enable: no, needs the {' and '.join(repr(b) for b in need)} prompt branch{'es' if len(need) > 1 else ''}"
            f"{where}; guider route only: {guider}")


def _lab_status():
    """Whether `fastguide lab` can run here: its weights shipped, its optional dependencies importable."""
    import importlib.util
    import os

    from .lab import models
    missing = [f for f in models.WEIGHTS.values() if not os.path.isfile(os.path.join(models.WEIGHTS_DIR, f))]
    if missing:
        return f"weights missing ({', '.join(missing)}): run `{models.TRAIN_COMMAND}`"
    deps = [pkg for mod, pkg in (("sklearn", "scikit-learn"), ("safetensors", "safetensors"), ("diffusers", "diffusers"))
            if importlib.util.find_spec(mod) is None]
    size = sum(os.path.getsize(os.path.join(models.WEIGHTS_DIR, f)) for f in models.WEIGHTS.values()) / 1e6
    if deps:
        return f"weights present ({size:.1f} MB), needs {', '.join(deps)}: pip install 'fastguide[lab]'"
    return f"ready (weights {size:.1f} MB; `fastguide lab --quick`)"


def build_parser():
    from . import bench

    p = argparse.ArgumentParser(prog="fastguide", description="fastguide: fused guidance ops for diffusion samplers.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fastguide {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,lab}")
    info_p = sub.add_parser("info", help="list the backend serving each op on each device",
                   description="List which backend serves each op on each device: the C++ extension (CPU), Triton "
                               "(CUDA) or the plain PyTorch fallback, with the reason when one is missing.",
                   epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_p = bench.add_arguments(sub.add_parser("bench", help="benchmark each op against its peers and the memory floor",
                                                 description=bench.__doc__, epilog=bench.EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    from .lab import run as lab_run
    lab_p = lab_run.add_arguments(sub.add_parser("lab", help="measure every guidance method on the shipped digits model",
                                                 description=lab_run.__doc__, epilog=lab_run.EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    p.subcommands = {"info": info_p, "bench": bench_p, "lab": lab_p}  # run() reports usage errors with the subcommand's usage
    return p


def main(argv=None):
    """Entry point of the `fastguide` console script; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    p = build_parser()
    a = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if a.command == "info":
        return info()
    if a.command == "bench":
        from . import bench
        return bench.run(a, p.subcommands["bench"])
    if a.command == "lab":
        from .lab import run as lab_run
        return lab_run.run(a, p.subcommands["lab"])
    p.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
