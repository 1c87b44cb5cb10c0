"""Command line: `fastguide info` (which backends are live) and `fastguide bench` (see bench.py)."""
import sys


def info():
    import torch

    from . import __version__, ops
    print(f"fastguide {__version__}  (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    for name, per_device in ops.backends().items():
        print(f"  {name}")
        for device, backend in per_device.items():
            print(f"    {device:<6} {backend}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else "help"
    if cmd == "info":
        return info()
    if cmd == "bench":
        from .bench import main as bench_main
        return bench_main(argv)
    print("usage: fastguide {info,bench} [options]   (fastguide bench --help)")
    return 0 if cmd in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
