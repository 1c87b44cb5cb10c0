"""fastguide.classifier: the classifier-based guiders against float64 references of their formulas (and EluCD's
code for its calibrated log-probability), run through the guider protocol as a pipeline runs them; bad input."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import fastguide
from fastguide import classifier as fc

SHAPE = (3, 2, 4, 4)
NULL = 5  # the toy denoiser's null class


def _sched():
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2")


class Toy(torch.nn.Module):
    """A linear classifier p(y | x, t) over 4 classes, mildly timestep dependent (float64 weights)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, math.prod(SHAPE[1:]), generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return (x.double().flatten(1) @ self.w.T + self.b) * (1 + 0.0005 * t)


class Denoiser(torch.nn.Module):
    """eps(x | label): a different smooth function per class label, so branches differ."""

    def forward(self, sample, t, class_labels):
        k = class_labels.to(sample.dtype).view(-1, *[1] * (sample.dim() - 1))
        return torch.sin(sample * (1 + 0.3 * k)) + 0.1 * k


def run_step(guider, x, y, t, step=3, steps=10, null=NULL):
    """One step of the guider protocol as DigitsPipeline runs it (one denoiser call per batch)."""
    den = Denoiser()
    guider.set_state(step=step, num_inference_steps=steps, timestep=t)
    batches = guider.prepare_inputs({"sample": x, "class_labels": (y, torch.full_like(y, null))})
    for b in batches:
        guider.prepare_models(den)
        b.noise_pred = den(b.sample, t, class_labels=b.class_labels)
        guider.cleanup_models(den)
    return guider(batches).pred, batches


def vp(t):
    ab = _sched().alphas_cumprod[int(t)].double()
    return ab, (1 - ab).sqrt()


# --- ClassifierGuidance (EluCD) ---------------------------------------------------------------------------
def elucd_code_logp(logits, y, tj, tm):
    """EluCD's DDPM code (scripts/classifier_sample.py, design_cond_fn): log(exp(z*T1)[y] / sum exp(z*T2))."""
    num = torch.exp(logits * tj)[torch.arange(len(y)), y]
    return torch.log(num / torch.exp(logits * tm).sum(1))


@pytest.mark.parametrize("tj,tm,gamma,cfg,inp", [
    (1.0, 1.0, 0.0, 3.0, "x_t"),    # Dhariwal & Nichol
    (1.0, 0.5, 0.3, 1.0, "x_t"),    # EluCD's DDPM setting, no CFG
    (2.0, 0.0, 0.0, 4.0, "x_t"),    # joint term only
    (1.0, 0.5, 0.3, 2.0, "x0"),     # off-the-shelf classifier on the x0 estimate
])
def test_classifier_guidance_equals_elucd(tj, tm, gamma, cfg, inp):
    clf = Toy()
    g = fc.ClassifierGuidance(clf, classifier_scale=2.5, joint_temperature=tj, marginal_temperature=tm, gamma=gamma,
                              classifier_input=inp, guidance_scale=cfg, scheduler=_sched())
    x = torch.randn(SHAPE)
    y = torch.tensor([0, 3, 1])
    t = torch.tensor(700)
    ours, batches = run_step(g, x, y, t)
    assert len(batches) == (2 if cfg != 1 else 1)
    den = Denoiser()
    c, u = den(x.double(), t, y), den(x.double(), t, torch.full_like(y, NULL))
    ab, s1 = vp(700)
    if inp == "x0":
        leaf = ((x.double() - s1 * c) / ab.sqrt()).requires_grad_(True)
        logits = clf(leaf, torch.zeros(3))
    else:
        leaf = x.double().requires_grad_(True)
        logits = clf(leaf, t)
    (grad,) = torch.autograd.grad(elucd_code_logp(logits, y, tj, tm).sum(), leaf)
    w = 2.5 * (1 + gamma * math.sin(math.pi * 700 / 1000))
    ref = (u + cfg * (c - u) if cfg != 1 else c) - w * s1 * grad
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)


def test_classifier_guidance_temperature_one_is_dhariwal_and_zero_scale_is_cfg():
    clf = Toy()
    x, y, t = torch.randn(SHAPE), torch.tensor([1, 1, 2]), torch.tensor(400)
    ours, _ = run_step(fc.ClassifierGuidance(clf, classifier_scale=1.5, scheduler=_sched()), x, y, t)
    xr = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.log_softmax(clf(xr, t), -1)[torch.arange(3), y].sum(), xr)
    c = Denoiser()(x.double(), t, y)
    torch.testing.assert_close(ours.double(), c - 1.5 * vp(400)[1] * grad, atol=2e-5, rtol=2e-5)
    off, _ = run_step(fc.ClassifierGuidance(clf, classifier_scale=0.0, guidance_scale=3.0, scheduler=_sched()), x, y, t)
    plain, _ = run_step(fastguide.diffusers.ClassifierFreeGuidance(guidance_scale=3.0), x, y, t)
    torch.testing.assert_close(off, plain)


def test_classifier_guidance_is_reexported_and_round_trips(tmp_path):
    assert fastguide.diffusers.ClassifierGuidance is fc.ClassifierGuidance
    g = fc.ClassifierGuidance(Toy(), classifier_scale=4.0, joint_temperature=1.0, marginal_temperature=0.5, gamma=0.3,
                              classifier_input="x0", guidance_scale=2.0, scheduler=_sched())
    g.save_pretrained(tmp_path)
    again = fc.ClassifierGuidance.from_pretrained(tmp_path)
    assert (again.classifier_scale, again.marginal_temperature, again.gamma, again.classifier_input,
            again.guidance_scale) == (4.0, 0.5, 0.3, "x0", 2.0)
    assert again.classifier is None
    again.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(500))
    with pytest.raises(ValueError, match="no classifier"):
        again.forward(torch.randn(SHAPE))


@pytest.mark.parametrize("cls", [fc.ClassifierGuidance, fc.GradientFreeClassifierGuidance, fc.DynamicCFG])
def test_bad_input_names_the_argument(cls):
    with pytest.raises(ValueError, match="scheduler=pipe.scheduler"):
        cls(Toy())
    with pytest.raises(ValueError, match="epsilon-prediction"):
        cls(Toy(), scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="classifier must be a callable"):
        cls("clf", scheduler=_sched())
    with pytest.raises(TypeError, match="adaptive"):  # no skipping policy: the classifier term needs every step
        cls(Toy(), scheduler=_sched(), adaptive=fastguide.AG())
    g = cls(Toy(), scheduler=_sched())
    with pytest.raises(ValueError, match="target labels"):  # labels of the wrong batch size
        g.target = torch.tensor([0])
        run_step(g, torch.randn(SHAPE), torch.tensor([0, 1, 2]), torch.tensor(300))


def test_bad_scales_and_temperatures():
    with pytest.raises(ValueError, match="temperatures must be >= 0"):
        fc.ClassifierGuidance(Toy(), marginal_temperature=-1.0, scheduler=_sched())
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        fc.ClassifierGuidance(Toy(), gamma=float("nan"), scheduler=_sched())
    with pytest.raises(ValueError, match="classifier_input"):
        fc.ClassifierGuidance(Toy(), classifier_input="x", scheduler=_sched())
    with pytest.raises(ValueError, match="gfcg_scale must be >= 0"):
        fc.GradientFreeClassifierGuidance(Toy(), gfcg_scale=-1.0, scheduler=_sched())
    with pytest.raises(ValueError, match="scales must be a non-empty list"):
        fc.DynamicCFG(Toy(), scales=(), scheduler=_sched())
    g = fc.GradientFreeClassifierGuidance(Toy(), scheduler=_sched())
    g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(500))
    with pytest.raises(ValueError, match="class_labels"):
        g.prepare_inputs({"sample": torch.randn(SHAPE)})


# --- GFCG ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_gfcg_reference_class_scale_and_combine(cfg):
    clf = Toy(1)
    g = fc.GradientFreeClassifierGuidance(clf, gfcg_scale=4.0, guidance_scale=cfg, scheduler=_sched())
    x, y, t = torch.randn(SHAPE), torch.tensor([0, 2, 3]), torch.tensor(600)
    ours, batches = run_step(g, x, y, t)
    assert len(batches) == g.num_conditions == (3 if cfg != 1 else 2)
    p = torch.softmax(clf(x.double(), t), -1)
    ref_cls, w = [], []
    for i in range(3):
        others = [(p[i, k].item(), k) for k in range(4) if k != y[i]]
        pr, kr = max(others)
        ref_cls.append(kr)
        w.append(4.0 * min(pr / p[i, y[i]].item(), 1.0))
    assert batches[-1].class_labels.tolist() == ref_cls and (batches[-1].class_labels != y).all()
    den = Denoiser()
    c, u = den(x.double(), t, y), den(x.double(), t, torch.full_like(y, NULL))
    r = den(x.double(), t, torch.tensor(ref_cls))
    w = torch.tensor(w, dtype=torch.float64).view(-1, 1, 1, 1)
    ref = (u + cfg * (c - u) if cfg != 1 else c) + w * (c - r)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)
    mean_w, frac = g.corrections()
    assert mean_w == pytest.approx(w.mean().item() / 4.0, rel=1e-5) and 0 <= frac <= 1


def test_gfcg_confident_classifier_applies_no_guidance():
    """A classifier sure of the target gives w ~ 0: GFCG then returns the conditional prediction (no correction)."""
    sure = lambda x, t: torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 4).double() * 50.0
    g = fc.GradientFreeClassifierGuidance(sure, gfcg_scale=8.0, scheduler=_sched())
    x, y, t = torch.randn(SHAPE), torch.tensor([0, 1, 2]), torch.tensor(300)
    ours, _ = run_step(g, x, y, t)
    torch.testing.assert_close(ours, Denoiser()(x, t, y), atol=1e-5, rtol=1e-5)
    assert g.corrections() == (pytest.approx(0.0, abs=1e-9), 0.0)


# --- DynamicCFG ----------------------------------------------------------------------------------------
def test_dynamic_cfg_picks_the_smallest_sufficient_scale_per_sample():
    clf = Toy(2)
    scales = (5.0, 1.0, 2.0)  # sorted by the guider
    x, y, t = torch.randn(SHAPE), torch.tensor([0, 1, 3]), torch.tensor(500)
    den = Denoiser()
    c, u = den(x.double(), t, y), den(x.double(), t, torch.full_like(y, NULL))
    ab, s1 = vp(500)
    with torch.no_grad():
        conf = {s: torch.softmax(clf((x.double() - s1 * (u + s * (c - u))) / ab.sqrt(), torch.zeros(3)), -1)
                [torch.arange(3), y] for s in (1.0, 2.0, 5.0)}
    threshold = float(conf[2.0].median())  # some samples pass at a small scale, some do not
    g = fc.DynamicCFG(clf, scales=scales, threshold=threshold, scheduler=_sched())
    ours, _ = run_step(g, x, y, t)
    want = []
    for i in range(3):
        ok = [s for s in (1.0, 2.0, 5.0) if conf[s][i] >= threshold]
        want.append(ok[0] if ok else max((1.0, 2.0, 5.0), key=lambda s: conf[s][i].item()))
    assert g.chosen_scales()[0].tolist() == want and len(set(want)) > 1
    w = torch.tensor(want, dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(ours.double(), u + w * (c - u), atol=2e-5, rtol=2e-5)


def test_dynamic_cfg_custom_evaluator():
    calls = []

    def evaluator(x0, t, y):  # prefers the largest scale: the norm of x0 grows with it here
        calls.append(x0.shape[0])
        return x0.flatten(1).norm(dim=1)

    g = fc.DynamicCFG(scales=(1.0, 3.0), threshold=1e9, evaluator=evaluator, scheduler=_sched())
    run_step(g, torch.randn(SHAPE), torch.tensor([0, 1, 2]), torch.tensor(500))
    assert calls == [6]  # one batched call for both candidates
    assert g.chosen_scales().shape == (1, 3)


# --- PPAP's experts --------------------------------------------------------------------------------------
def test_timestep_experts_route_by_timestep():
    experts = [lambda x, t, k=k: torch.full((x.shape[0], 4), float(k)) for k in range(3)]
    r = fc.TimestepExperts((0, 250, 550, 1000), experts)
    x = torch.randn(4, 2, 4, 4)
    assert [r(x, torch.tensor(v))[0, 0].item() for v in (0, 249, 250, 549, 550, 999, 1200)] == [0, 0, 1, 1, 2, 2, 2]
    out = r(x, torch.tensor([900, 10, 300, 10]))
    assert out[:, 0].tolist() == [2.0, 0.0, 1.0, 0.0]
    assert sum(r.calls) == 7 + 3
    with pytest.raises(ValueError, match="4 increasing timesteps for 3 experts"):
        fc.TimestepExperts((0, 500, 1000), experts)
    with pytest.raises(TypeError, match="callable"):
        fc.TimestepExperts((0, 1000), ["nope"])


def test_classifier_guidance_with_experts_uses_the_expert_of_each_step():
    a, b = Toy(3), Toy(4)
    r = fc.TimestepExperts((0, 500, 1000), [a, b])
    x, y = torch.randn(SHAPE), torch.tensor([0, 1, 2])
    for t, single in ((torch.tensor(200), a), (torch.tensor(800), b)):
        ours, _ = run_step(fc.ClassifierGuidance(r, classifier_scale=2.0, scheduler=_sched()), x, y, t)
        ref, _ = run_step(fc.ClassifierGuidance(single, classifier_scale=2.0, scheduler=_sched()), x, y, t)
        torch.testing.assert_close(ours, ref)
    assert r.calls == [1, 1]
