"""`python -m fastguide.lab train` reproduces the weights; `fastguide lab` (or `python -m fastguide.lab run`)
runs the guidance lab."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import main as train
        return train(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    from .run import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
