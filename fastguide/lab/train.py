"""`python -m fastguide.lab train`: reproduce the lab's weights from seed (CPU, minutes).

The models, each trained from `data.load("train")` only:
  * the diffusion UNet: epsilon prediction, cosine schedule, 15% condition dropout to the null class so
    CFG works, AdamW, EMA (with warm-up) -- saved after `--steps` and at `--early-steps` (a weaker model);
  * the noise-conditional classifier p(y | x_t, t) for classifier guidance (timesteps uniform in 0..999);
  * the evaluation classifier: scikit-learn's MLPClassifier on the clean training digits, tested on the
    held-out split;
  * PPAP's demonstration (`--ppap-steps`, 0 skips it; `--only-ppap` retrains just these): three small noisy
    classifiers, one per timestep range, distilled without labels from the noise-conditional classifier read on
    clean images, and one classifier of the same size for every timestep (the baseline).
Writes safetensors files (tensors + a little metadata: steps, seed, held-out scores) to `--out`.
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from . import data, models


def _ema_update(ema, model, n, decay):
    d = min(decay, (1 + n) / (10 + n))  # warm-up: early checkpoints are not dominated by the initialisation
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def _save(module, path, **meta):
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})
    os.chmod(path, 0o644)  # package data: readable by everyone who installs it


def train_unet(out, steps, early_steps, seed, batch=128, lr=1e-3, dropout=0.15, log=print):
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    x0_all, y_all = data.load("train")
    sched = DDPMScheduler(**models.SCHEDULER_CONFIG)
    model = models.make_unet()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # linear warm-up over 100 steps, cosine decay to 10% of lr
    lr_at = lambda n: lr * min(1.0, (n + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(n / steps * 3.14159265)).item()))
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for n in range(steps):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        x0, y = x0_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=g) < dropout] = data.NULL_CLASS
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, t, class_labels=y).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, n, 0.999)
        losses.append(loss.item())
        if (n + 1) % 250 == 0:
            log(f"  unet step {n + 1}/{steps}: loss {sum(losses[-250:]) / 250:.4f} ({time.time() - t0:.0f} s)")
        if n + 1 == early_steps:
            _save(ema, os.path.join(out, models.WEIGHTS["unet_early"]), steps=n + 1, seed=seed)
    heldout = _heldout_eps_mse(ema, sched, seed)
    _save(ema, os.path.join(out, models.WEIGHTS["unet"]), steps=steps, seed=seed, heldout_eps_mse=f"{heldout:.4f}")
    return {"unet_steps": steps, "unet_seconds": round(time.time() - t0, 1), "unet_heldout_eps_mse": round(heldout, 4)}


@torch.no_grad()
def _heldout_eps_mse(model, sched, seed):
    x0, y = data.load("heldout")
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return F.mse_loss(model(sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise).item()


def train_noisy_classifier(out, steps, seed, batch=256, lr=1e-3, log=print):
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    x0_all, y_all = data.load("train")
    sched = DDPMScheduler(**models.SCHEDULER_CONFIG)
    clf = models.NoisyClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    for n in range(steps):
        idx = torch.randint(0, len(x0_all), (batch,), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        xt = sched.add_noise(x0_all[idx], torch.randn((batch, 1, data.SIZE, data.SIZE), generator=g), t)
        loss = F.cross_entropy(clf(xt, t), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # held-out accuracy at a few noise levels: how much the classifier still sees
    x0, y = data.load("heldout")
    acc = {}
    with torch.no_grad():
        for tv in (0, 100, 300, 500, 700, 900):
            t = torch.full((len(x0),), tv)
            xt = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            acc[tv] = round((clf(xt, t).argmax(1) == y).float().mean().item(), 3)
    log(f"  noisy classifier: {steps} steps, held-out accuracy by timestep {acc} ({time.time() - t0:.0f} s)")
    _save(clf, os.path.join(out, models.WEIGHTS["noisy_classifier"]), steps=steps, seed=seed,
          heldout_accuracy_by_t=json.dumps(acc))
    return {"noisy_classifier_steps": steps, "noisy_classifier_heldout_accuracy_by_t": acc}


def _train_ranged(clf, lo, hi, steps, teacher, sched, x0_all, g, batch=256, lr=1e-3):
    """Fit `clf` (a NoisyClassifier) on timesteps in [lo, hi) to the teacher's soft predictions on the clean
    image: PPAP's data-free knowledge transfer, no labels used."""
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        x0 = x0_all[torch.randint(0, len(x0_all), (batch,), generator=g)]
        with torch.no_grad():
            target = torch.softmax(teacher(x0, torch.zeros(batch, dtype=torch.int64)), dim=-1)
        t = torch.randint(lo, hi, (batch,), generator=g)
        xt = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        loss = F.cross_entropy(clf(xt, t), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_ppap(out, steps, seed, teacher, log=print):
    """PPAP's multi-expert guidance ("Towards Practical Plug-and-Play Diffusion Models"): one small noisy
    classifier per timestep range of models.PPAP_BOUNDARIES, each distilled for `steps` steps from `teacher`
    (an off-the-shelf classifier read on clean images: the shipped noisy classifier at t = 0) without labels;
    and the baseline, one classifier of the same size trained as long as all experts together on every
    timestep. Held-out accuracy (against the true labels) per timestep is logged and stored."""
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    x0_all, _ = data.load("train")
    sched = DDPMScheduler(**models.SCHEDULER_CONFIG)
    b = models.PPAP_BOUNDARIES
    experts = models.MultiExpertClassifier(b)
    single = models.MultiExpertClassifier((0, sched.config.num_train_timesteps))
    g = torch.Generator().manual_seed(seed + 3)
    t0 = time.time()
    for i, expert in enumerate(experts.experts):
        _train_ranged(expert, b[i], b[i + 1], steps, teacher, sched, x0_all, g)
    _train_ranged(single.experts[0], 0, sched.config.num_train_timesteps, steps * len(experts.experts), teacher, sched,
                  x0_all, g)
    x0, y = data.load("heldout")
    acc = {"experts": {}, "single": {}}
    with torch.no_grad():
        for tv in (0, 100, 300, 500, 700, 900):
            t = torch.full((len(x0),), tv)
            xt = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            for name, clf in (("experts", experts), ("single", single)):
                acc[name][tv] = round((clf(xt, t).argmax(1) == y).float().mean().item(), 3)
    log(f"  PPAP: {len(experts.experts)} experts x {steps} steps (boundaries {b}) and one single classifier: held-out "
        f"accuracy by timestep {acc} ({time.time() - t0:.0f} s)")
    for name, clf in (("experts", experts), ("single", single)):
        _save(clf, os.path.join(out, models.WEIGHTS[f"ppap_{name}"]), steps=steps, seed=seed,
              heldout_accuracy_by_t=json.dumps(acc[name]))
    return {"ppap_expert_steps": steps, "ppap_boundaries": list(b), "ppap_heldout_accuracy_by_t": acc,
            "ppap_seconds": round(time.time() - t0, 1)}


def train_eval_classifier(out, seed, log=print):
    from sklearn.neural_network import MLPClassifier
    x_tr, y_tr = data.load("train")
    x_ho, y_ho = data.load("heldout")
    px = lambda x: data.to_pixels(x).flatten(1).numpy() / 16.0
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, alpha=1e-3, random_state=seed)
    mlp.fit(px(x_tr), y_tr.numpy())
    clf = models.EvalClassifier(hidden=64)
    with torch.no_grad():  # fold sklearn's /16 input scaling into the first layer: the module reads pixels 0..16
        clf.hidden.weight.copy_(torch.tensor(mlp.coefs_[0].T, dtype=torch.float32) / 16.0)
        clf.hidden.bias.copy_(torch.tensor(mlp.intercepts_[0], dtype=torch.float32))
        clf.out.weight.copy_(torch.tensor(mlp.coefs_[1].T, dtype=torch.float32))
        clf.out.bias.copy_(torch.tensor(mlp.intercepts_[1], dtype=torch.float32))
        acc = (clf(data.to_pixels(x_ho)).argmax(1) == y_ho).float().mean().item()
    log(f"  evaluation classifier (sklearn MLPClassifier, 64 hidden): held-out accuracy {acc:.3f}")
    _save(clf, os.path.join(out, models.WEIGHTS["eval_classifier"]), seed=seed, heldout_accuracy=f"{acc:.4f}")
    return {"eval_classifier_heldout_accuracy": round(acc, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastguide.lab train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=models.WEIGHTS_DIR, help="folder for the weights (default: the package's)")
    p.add_argument("--steps", type=int, default=3000, help="diffusion UNet training steps (default 3000)")
    p.add_argument("--early-steps", type=int, default=500, help="step of the early checkpoint (default 500)")
    p.add_argument("--classifier-steps", type=int, default=3000, help="noisy classifier steps (default 3000)")
    p.add_argument("--ppap-steps", type=int, default=1500,
                   help="steps per PPAP expert (default 1500; the single baseline gets experts x steps); 0 skips them")
    p.add_argument("--only-ppap", action="store_true",
                   help="train only PPAP's classifiers (from the noisy classifier already in --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if not 0 < a.early_steps <= a.steps:
        p.error(f"--early-steps must be in (0, --steps={a.steps}], got {a.early_steps}")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    path = os.path.join(a.out, "train_summary.json")
    if a.only_ppap:
        if a.ppap_steps <= 0:
            p.error("--only-ppap needs --ppap-steps > 0")
        with open(path) as f:
            summary = json.load(f)
    else:
        summary = {"seed": a.seed, "torch": torch.__version__}
        summary.update(train_eval_classifier(a.out, a.seed))
        summary.update(train_noisy_classifier(a.out, a.classifier_steps, a.seed))
    if a.ppap_steps > 0:
        from . import noisy_classifier
        summary.update(train_ppap(a.out, a.ppap_steps, a.seed, noisy_classifier(a.out)))
    if not a.only_ppap:
        summary.update(train_unet(a.out, a.steps, a.early_steps, a.seed))
        summary["total_seconds"] = round(time.time() - t0, 1)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote the weights to {a.out} in {time.time() - t0:.0f} s")
    return 0
