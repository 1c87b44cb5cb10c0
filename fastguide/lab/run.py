"""`fastguide lab`: every guidance method fastguide has, over a scale sweep, on the shipped digits model.

For each (method, scale) the same initial noise and the same balanced labels (every digit equally often)
are sampled with the lab pipeline; samples are scored by the evaluation classifier (accuracy), the
Fréchet distance to held-out real digits in its feature space (FD: quality and diversity; lower is
better), saturation (pixels outside [-1, 1] before clipping) and contrast; NFEs count denoiser rows
per sample. Prints a table, writes a CSV (--csv) and a PNG (--plot: sample grids and metric curves).
"""
import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import data

EPILOG = """examples:
  fastguide lab --quick                       a few minutes: 200 samples per point
  fastguide lab --methods cfg,apg --csv lab.csv --plot lab.png
  python -m fastguide.lab train               reproduce the shipped weights from seed"""


def _pag_config():
    from diffusers.hooks import LayerSkipConfig
    # the 4x4 mid-block self-attention: PAG replaces its attention map by the identity
    return LayerSkipConfig(indices=[0], fqn="mid_block.attentions", skip_attention_scores=True)


def linear_ag_guider(pipe, scale, steps=None, calibration=100, num_inference_steps=20):
    """A CFG guider with LinearAG calibrated on this pipeline: `calibration` full-CFG samples at `scale` (seed
    123, not the evaluation seed) recorded, then the unconditional pass predicted at `steps` (default: every
    other step, 1, 3, ..., which measured best on the lab: chained predictions drift, see bench/NOTES.md)."""
    from .. import diffusers as fg
    from ..pipelines import LinearAG, fit_linear_ag
    steps = list(range(1, num_inference_steps, 2)) if steps is None else steps
    recorder = fg.ClassifierFreeGuidance(guidance_scale=scale)
    with fg.recording(recorder) as runs:
        pipe(class_labels=labels_for(calibration), num_inference_steps=num_inference_steps, guider=recorder,
             generator=torch.Generator().manual_seed(123), output_type="latent")
    lag = LinearAG(fit_linear_ag(runs, steps), num_inference_steps)
    return fg.ClassifierFreeGuidance(guidance_scale=scale, linear_ag=lag)


def _methods(scheduler=None, pipe=None):
    """name -> (guider factory f(scale), default scales). The guiders are fastguide.diffusers twins of
    diffusers' guiders, i.e. what a user runs in a modular pipeline; the whole-pass savers (AG, interval,
    guiding only the first steps) are CFG guiders with a policy. `scheduler`: the pipeline's (sigmas)."""
    from .. import classifier as fc
    from .. import diffusers as fg
    from ..pipelines import AG
    cg = fc.ClassifierGuidance
    if scheduler is None:
        from . import _default_scheduler
        scheduler = _default_scheduler()
    cfg = fg.ClassifierFreeGuidance
    return {
        "cfg": (lambda s: fg.ClassifierFreeGuidance(guidance_scale=s), (1.0, 2.0, 3.0, 5.0, 8.0)),
        "cfg_rescale": (lambda s: fg.ClassifierFreeGuidance(guidance_scale=s, guidance_rescale=0.7), (3.0, 8.0)),
        "apg": (lambda s: fg.AdaptiveProjectedGuidance(guidance_scale=s, eta=0.0, adaptive_projected_guidance_rescale=2.0,
                                                       adaptive_projected_guidance_momentum=-0.5), (3.0, 8.0)),
        # the same APG on the x0 estimates (the paper's and ComfyUI's space) instead of epsilon
        "apg_x0": (lambda s: fg.AdaptiveProjectedGuidance(guidance_scale=s, eta=0.0, adaptive_projected_guidance_rescale=2.0,
                                                          adaptive_projected_guidance_momentum=-0.5, space="x0",
                                                          scheduler=scheduler), (3.0, 8.0)),
        # CFG-Zero*'s optimised scale; its zero-init (predict 0 at the first steps) is for flow-matching models,
        # where a zero velocity leaves x alone: a zero *epsilon* moves a DDIM sample far off (see bench/NOTES.md)
        "cfg_zero_star": (lambda s: fg.ClassifierFreeZeroStarGuidance(guidance_scale=s, zero_init_steps=0), (3.0, 8.0)),
        "cfg_zero_star_init": (lambda s: fg.ClassifierFreeZeroStarGuidance(guidance_scale=s, zero_init_steps=1), (3.0,)),
        # PAG at every step (diffusers' default window is 1%-20% of the steps); "scale" is PAG's own scale, on the
        # unconditional model (null class, CFG off): PAG's use case, guidance without a condition
        "pag_uncond": (lambda s: fg.PerturbedAttentionGuidance(
            guidance_scale=1.0, perturbed_guidance_scale=s, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
            perturbed_guidance_config=_pag_config()), (0.5, 1.0, 2.0)),
        "pag": (lambda s: fg.PerturbedAttentionGuidance(
            guidance_scale=s, perturbed_guidance_scale=1.0, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
            perturbed_guidance_config=_pag_config()), (3.0,)),
        # classifier guidance (Dhariwal & Nichol: temperatures 1, no schedule) with the lab's noise-conditional classifier, on the
        # unconditional model: the classifier alone steers the null class towards the target digits
        "classifier": (lambda s: fg.ClassifierGuidance(_noisy_classifier(), classifier_scale=s, scheduler=scheduler),
                       (1.0, 3.0, 10.0)),
        # EluCD's calibrated classifier guidance (their DDPM setting: joint temperature 1, marginal 0.5, sine
        # schedule gamma 0.3), on the noisy input and on the x0 estimate (the classifier read at t = 0, as an
        # off-the-shelf clean classifier); PPAP: three small experts switched by timestep, and the single small
        # classifier of the same size
        "elucd": (lambda s: cg(_noisy_classifier(), classifier_scale=s, joint_temperature=1.0, marginal_temperature=0.5,
                               gamma=0.3, scheduler=scheduler), (1.0, 3.0, 10.0)),
        # EluCD's sine schedule alone (temperatures 1): the part of the calibration that helps here
        "elucd_schedule": (lambda s: cg(_noisy_classifier(), classifier_scale=s, gamma=0.3, scheduler=scheduler),
                           (1.0, 3.0, 10.0)),
        "elucd_x0": (lambda s: cg(_noisy_classifier(), classifier_scale=s, joint_temperature=1.0,
                                  marginal_temperature=0.5, gamma=0.3, classifier_input="x0", scheduler=scheduler),
                     (0.1, 0.3, 1.0)),  # the x0 gradient of a clean classifier is steep: 3 already wrecks the samples
        "ppap": (lambda s: cg(_ppap("experts"), classifier_scale=s, scheduler=scheduler), (1.0, 3.0, 10.0)),
        "ppap_single": (lambda s: cg(_ppap("single"), classifier_scale=s, scheduler=scheduler), (1.0, 3.0, 10.0)),
        # GFCG: the reference class's prediction as the negative branch, scale from the classifier (no gradient);
        # alone (NFE 40, like CFG) and on top of CFG 3 (NFE 60)
        "gfcg": (lambda s: fc.GradientFreeClassifierGuidance(_noisy_classifier(), gfcg_scale=s, scheduler=scheduler),
                 (1.0, 3.0, 8.0)),
        "gfcg_cfg3": (lambda s: fc.GradientFreeClassifierGuidance(_noisy_classifier(), gfcg_scale=s, guidance_scale=3.0,
                                                                  scheduler=scheduler), (1.0, 3.0)),
        # dynamic CFG: per sample and step, the smallest candidate scale in {1, 2, 3, 5, 8} up to `scale` whose x0
        # estimate the noisy classifier (at t = 0) gives >= 0.999 to the target, else the most convincing one
        "dynamic_cfg": (lambda s: fc.DynamicCFG(_noisy_classifier(), scales=[c for c in (1.0, 2.0, 3.0, 5.0, 8.0) if c <= s],
                                                threshold=0.999, scheduler=scheduler), (3.0, 8.0)),
        # CFG++ (lambda in [0, 1]) as a guider: DDIM's step of its output is CFG++'s step
        "cfgpp": (lambda s: fg.CFGPlusPlusGuidance(guidance_scale=s, scheduler=scheduler), (0.2, 0.4, 0.6, 0.8)),
        # FreSca on CFG (the registry's "frequency" method through the generic guider): the high band of cond - uncond
        # (outside the centre 2x2 of the 8x8 spectrum) guided at 1.25x the scale, the low band at the scale
        "fresca": (lambda s: fg.MultiBranchGuidance(method="frequency", params={"scale_low": s, "scale_high": 1.25 * s,
                                                                                "cutoff": 1}), (3.0, 8.0)),
        "fdg": (lambda s: fg.FrequencyDecoupledGuidance(guidance_scales=[s, max(s / 2, 1.0)], parallel_weights=[1.0, 1.0]),
                (3.0, 8.0)),
        # Adaptive Guidance with its defaults (cosine of the x0 estimates), and in the prediction (epsilon) space
        "ag": (lambda s: cfg(guidance_scale=s, adaptive=AG(), scheduler=scheduler), (3.0, 5.0, 8.0)),
        "ag_prediction": (lambda s: cfg(guidance_scale=s, adaptive=AG(0.99, space="prediction")), (3.0, 8.0)),
        # fixed baselines AG must beat: guidance limited to a sigma interval; guidance on the first 5 of 20 steps
        "interval": (lambda s: cfg(guidance_scale=s, interval=(0.15, 1.5), scheduler=scheduler), (3.0, 5.0, 8.0)),
        "first_steps": (lambda s: cfg(guidance_scale=s, start=0.0, stop=0.25), (3.0, 5.0, 8.0)),
        # LinearAG: the unconditional pass predicted on every other step, calibrated on 100 other samples
        "linear_ag": (lambda s: linear_ag_guider(pipe, s), (3.0, 5.0, 8.0)),
    }


# sampled with the null class; accuracy is then against the target digits of guiders that take one
# (classifier guidance), undefined (nan) otherwise
UNCONDITIONAL = ("pag_uncond", "classifier", "elucd", "elucd_schedule", "elucd_x0", "ppap", "ppap_single")
_CLASSIFIER = []
_PPAP = {}


def _ppap(kind):
    if kind not in _PPAP:
        from . import ppap_classifier
        _PPAP[kind] = ppap_classifier(kind)
    return _PPAP[kind]


def _noisy_classifier():
    if not _CLASSIFIER:
        from . import noisy_classifier
        _CLASSIFIER.append(noisy_classifier())
    return _CLASSIFIER[0]


@dataclass
class Row:
    method: str
    scale: float
    accuracy: float
    fd: float
    out_of_range: float
    contrast: float
    nfe: float          # denoiser rows per sample
    seconds: float
    n: int


def labels_for(n):
    """n labels, every digit equally often (n a multiple of 10 gives an exactly balanced set)."""
    return torch.arange(n) % data.NUM_CLASSES


def run_point(pipe, evaluator, guider, labels, steps, seed, batch=500, targets=None):
    """Sample len(labels) images with `guider` (same noise for every method: seeded per batch), score them
    against `targets` (default: the labels). A guider with a `target` (classifier guidance) gets the targets."""
    xs, nfe, t0 = [], 0, time.time()
    targets = labels if targets is None else targets
    for k, start in enumerate(range(0, len(labels), batch)):
        lab = labels[start:start + batch]
        if hasattr(guider, "target"):
            guider.target = targets[start:start + batch]
        g = torch.Generator().manual_seed(seed + k)
        out = pipe(class_labels=lab, num_inference_steps=steps, generator=g, guider=guider, output_type="latent")
        xs.append(out.images)
        nfe += out.nfe
    x = torch.cat(xs)
    return x, evaluator(x, targets), nfe / len(labels), time.time() - t0


def sweep(methods, n, steps, seed=0, scales=None, progress=print):
    from . import evaluator, pipeline
    pipe, ev = pipeline(), evaluator()
    table = _methods(pipe.scheduler, pipe)
    labels = labels_for(n)
    rows, grids = [], {}
    for name in methods:
        make, default_scales = table[name]
        lab = torch.full_like(labels, data.NULL_CLASS) if name in UNCONDITIONAL else labels
        for s in (scales or default_scales):
            guider = make(float(s))
            targets = labels if hasattr(guider, "target") else lab
            x, sc, nfe, sec = run_point(pipe, ev, guider, lab, steps, seed, targets=targets)
            rows.append(Row(name, float(s), sc.accuracy, sc.fd, sc.out_of_range, sc.contrast, nfe, sec, sc.n))
            grids[(name, float(s))] = x[:20]
            progress(_fmt(rows[-1]))
    return rows, grids


HEADER = f"{'method':<14} {'scale':>5} {'acc':>6} {'FD':>7} {'sat':>6} {'contr':>6} {'NFE':>5} {'sec':>6}"


def _fmt(r):
    return (f"{r.method:<14} {r.scale:>5.1f} {r.accuracy:>6.3f} {r.fd:>7.3f} {r.out_of_range:>6.3f} {r.contrast:>6.3f} "
            f"{r.nfe:>5.1f} {r.seconds:>6.1f}")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows, grids, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r.method for r in rows))
    fig = plt.figure(figsize=(14, 4 + 1.2 * len(grids) / 4))
    metrics = [("accuracy", "accuracy"), ("fd", "Fréchet distance"), ("out_of_range", "saturation")]
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot(2, 4, i + 1)
        for m in methods:
            pts = [(r.scale, getattr(r, key)) for r in rows if r.method == m]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_title(f"{title} vs scale")
        ax.set_xlabel("scale")
    ax = fig.add_subplot(2, 4, 4)
    for m in methods:
        ax.scatter([r.nfe for r in rows if r.method == m], [r.fd for r in rows if r.method == m], label=m)
    ax.set_title("FD vs NFE per sample")
    ax.legend(fontsize=6)
    # sample grids: 20 samples (digits 0..9 twice) per (method, scale), one row each
    keys = list(grids)
    ax = fig.add_subplot(2, 1, 2)
    rows_img = [torch.cat([(grids[k][j, 0].clamp(-1, 1) + 1) / 2 for j in range(len(grids[k]))], dim=1) for k in keys]
    ax.imshow(torch.cat(rows_img, dim=0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([data.SIZE * (i + 0.5) for i in range(len(keys))])
    ax.set_yticklabels([f"{m} {s:g}" for m, s in keys], fontsize=6)
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="200 samples per point instead of 1000 (a few minutes)")
    p.add_argument("--samples", type=int, default=None, help="samples per (method, scale) point")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20, DDIM)")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all): cfg, cfg_rescale, apg, apg_x0, "
                   "cfg_zero_star, cfg_zero_star_init, pag_uncond, pag, classifier, elucd, elucd_schedule, elucd_x0, ppap, ppap_single, gfcg, "
                   "gfcg_cfg3, dynamic_cfg, cfgpp, fresca, fdg, ag, ag_prediction, interval, first_steps, linear_ag")
    p.add_argument("--scales", default=None, help="comma-separated scales for every method (default: per method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write sample grids and metric curves as PNG (needs matplotlib)")
    return p


def run(a, parser):
    table = _methods()
    methods = a.methods.split(",") if a.methods else list(table)
    unknown = [m for m in methods if m not in table]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {','.join(table)}")
    try:
        scales = [float(s) for s in a.scales.split(",")] if a.scales else None
    except ValueError:
        parser.error(f"--scales: expected comma-separated numbers, got {a.scales!r}")
    needed = {"diffusers": "diffusers", "sklearn": "scikit-learn", "safetensors": "safetensors"}
    if a.plot:
        needed["matplotlib"] = "matplotlib"
    for module, package in needed.items():
        try:
            __import__(module)
        except ImportError:
            parser.error(f"the lab needs {package}: pip install 'fastguide[lab]' (or pip install {package})")
    n = a.samples or (200 if a.quick else 1000)
    print(HEADER)
    rows, grids = sweep(methods, n, a.steps, a.seed, scales)
    if a.csv:
        write_csv(rows, a.csv)
        print(f"wrote {a.csv}")
    if a.plot:
        plot(rows, grids, a.plot)
        print(f"wrote {a.plot}")
    return 0


def main(argv=None):
    p = add_arguments(argparse.ArgumentParser(prog="fastguide lab", description=__doc__, epilog=EPILOG,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(p.parse_args(argv), p)


if __name__ == "__main__":
    sys.exit(main())
