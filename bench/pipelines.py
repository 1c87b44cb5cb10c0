"""Per covered pipeline: NFEs and wall time of one sampling run with stock CFG, fastguide CFG with both branches in
one forward (per-branch pipelines) or as two calls, Adaptive Guidance (default AG()) and interval guidance.

    python bench/pipelines.py [--steps 20] [--repeat 3] [--csv PATH]

The pipelines are the tests' tiny random-weight ones (tests/test_enable_branches.py, tests/test_pipelines.py)
at a larger latent size; on random weights only the mechanics (NFEs, calls, wall) mean something, not quality.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fastguide  # noqa: E402
from test_enable_branches import PIPELINES, run  # noqa: E402

SIZES = {"flux": dict(height=128, width=128), "qwenimage": dict(height=128, width=128),
         "wan": dict(height=64, width=64, num_frames=9), "wan2.2": dict(height=64, width=64, num_frames=9),
         "hunyuanvideo": dict(height=64, width=64, num_frames=9)}


def policies(pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    sig = [float(s) for s in pipe.scheduler.sigmas[:steps]]
    return {"stock": None, "cfg batched": {}, "cfg two calls": {"batch_branches": False},
            "ag()": {"adaptive": fastguide.AG()},
            "interval(middle)": {"interval": (sig[int(0.8 * steps)] * (1 - 1e-6), sig[int(0.2 * steps)] * (1 + 1e-6))}}


def bench(name, steps, repeat, batch):
    pipe, args, out = PIPELINES[name](batch=batch)
    pipe.set_progress_bar_config(disable=True)
    args.update(SIZES[name])
    rows = []
    for policy, kw in policies(pipe, steps).items():
        fastguide.disable(pipe)
        if kw is not None:
            fastguide.enable(pipe, guidance="cfg", **kw)
        run(pipe, args, out, steps=2)  # warm-up
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run(pipe, args, out, steps=steps)
            walls.append(time.perf_counter() - t0)
        r = pipe.fastguide_report if kw is not None else None
        rows.append({"pipeline": name, "batch": batch, "policy": policy,
                     "nfe": r.nfe if r else 2 * batch * steps, "nfe_skipped": r.nfe_skipped if r else 0,
                     "batched_steps": r.branch_batched if r else 0, "wall_s": statistics.median(walls)})
    fastguide.disable(pipe)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--csv")
    a = p.parse_args()
    rows = []
    for name in a.pipelines.split(","):
        rows += bench(name, a.steps, a.repeat, a.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps, batch {a.batch}, "
          f"median of {a.repeat}")
    print(f"{'pipeline':<14}{'policy':<18}{'NFE':>5}{'skipped':>9}{'batched':>9}{'wall s':>9}{'vs stock':>10}")
    stock = {}
    for r in rows:
        stock.setdefault(r["pipeline"], r["wall_s"])
        print(f"{r['pipeline']:<14}{r['policy']:<18}{r['nfe']:>5}{r['nfe_skipped']:>9}{r['batched_steps']:>9}"
              f"{r['wall_s']:>9.3f}{r['wall_s'] / stock[r['pipeline']]:>10.2f}")
    if a.csv:
        import csv
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
