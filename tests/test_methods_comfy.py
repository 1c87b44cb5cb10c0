"""ComfyUI-only methods and two-model guidance: lincomb / diff_stats ops, dual CFG, Perp-Neg, RLG, autoguidance
with a weak model, and the guider route for branches computed by a second model."""
import pytest
import torch
import torch._dynamo.testing

import fastguide
import reference as R
from fastguide import methods, ops
from fastguide.kernels import lincomb as tk
from reference import per_sample, rel_err

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}
DTYPES = list(TOL)


def randn(shape, dtype=torch.float32, strided=False):
    """fp64 normals rounded to dtype; `strided`: a transposed (non-contiguous) view of the same shape."""
    if strided:
        return torch.randn(shape[:-2] + (shape[-1], shape[-2]), dtype=torch.float64).to(dtype).transpose(-1, -2)
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def lincomb64(preds, weights):
    x = [p.double() for p in preds]
    w = [per_sample(v, x[0]) for v in weights]
    return w[0] * x[0] + sum(w[k] * (x[k] - x[0]) for k in range(1, len(x)))


CASES = [  # shape, K, strided
    ((1, 4, 9, 7), 3, False), ((3, 5, 11), 4, True), ((2, 3, 4, 5, 6), 2, False), ((5, 1, 3), 1, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,K,strided", CASES, ids=str)
def test_lincomb_equals_reference(dtype, shape, K, strided):
    preds = [randn(shape, dtype, strided) for _ in range(K)]
    B = shape[0]
    floats = [1.0, 7.5, -6.5, 0.3][:K]
    per = [torch.rand(B, dtype=torch.float64) * 4 for _ in range(K)]  # [B] tensors, one per prediction
    for weights in (floats, per, torch.stack(per, 1).float(), torch.tensor(floats)):
        out = ops.lincomb(preds, weights)
        ref = lincomb64(preds, list(weights.T) if isinstance(weights, torch.Tensor) and weights.dim() == 2 else
                        list(weights))
        assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
        assert rel_err(out, ref) <= TOL[dtype], (weights, rel_err(out, ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_diff_stats_equals_reference(dtype):
    r, a, b = (randn((3, 5, 7, 6), dtype, strided=True) for _ in range(3))
    st = ops.diff_stats(r, a, b)
    da, db = (a.double() - r.double()).flatten(1), (b.double() - r.double()).flatten(1)
    ref = torch.stack([(da * db).sum(1), (da * da).sum(1), (db * db).sum(1)], 1)
    assert st.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and st.shape == (3, 3)
    torch.testing.assert_close(st.double(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-4)
    assert (ops.diff_stats(r[:, :0], a[:, :0], b[:, :0]) == 0).all()  # empty samples: zero sums


def test_triton_kernels():
    """Triton under the interpreter with tiny blocks: several blocks per sample plus a tail, K = 1..4, weight
    tensors with odd strides; the stats with several tiles per group and packed small groups."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    preds = [randn((3, 5, 11)).to(dev) for _ in range(4)]
    w = torch.randn(4, 3, device=dev).T  # [B, K], strides (1, 3)
    for K in (1, 2, 3, 4):
        out = tk.lincomb(preds[:K], w[:, :K], [], block=32)
        assert rel_err(out.cpu(), lincomb64([p.cpu() for p in preds[:K]], list(w[:, :K].T.cpu()))) <= 1e-6
    out = tk.lincomb(preds[:3], None, [1.0, 2.5, -1.5], block=32)
    assert rel_err(out.cpu(), lincomb64([p.cpu() for p in preds[:3]], [1.0, 2.5, -1.5])) <= 1e-6
    for chunk in (16, 64):  # 55 elements per group: 4 tiles; one packed row of groups
        st = tk.diff_stats(*preds[:3], 55, chunk=chunk).cpu()
        ref = ops._eager.diff_stats(*[p.cpu() for p in preds[:3]], 55)
        torch.testing.assert_close(st, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile_without_recompiles():
    c, m, u = (randn((2, 3, 5)) for _ in range(3))
    lc = torch.ops.fastguide.lincomb.default
    torch.library.opcheck(lc, ([u, m, c], None, [1.0, 0.5, 2.0]))
    torch.library.opcheck(lc, ([u, m, c], torch.rand(2, 3), []))
    torch.library.opcheck(torch.ops.fastguide.diff_stats.default, (u, m, c, 15))
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda s, s2, *xs: ops.dual_cfg(*xs, s, s2), backend=counter, fullgraph=True)
    pn = torch.compile(lambda s, *xs: ops.perp_neg(*xs, s, 1.0), backend=counter, fullgraph=True)
    scale, ms = torch.empty(2), torch.empty(())
    for step in range(5):
        scale.copy_(torch.tensor([1.0 + step, 7.5 - step]))
        ms.fill_(1.5 + step / 10)
        ref = R.comfy_dual_cfg(c.double(), m.double(), u.double(), per_sample(scale, c), float(ms))
        assert rel_err(fn(scale, ms, c, m, u), ref) <= 1e-6
        assert rel_err(pn(scale, c, u, m), R.comfy_perp_neg(c.double(), u.double(), m.double(), 1.0,
                                                            per_sample(scale, c))) <= 1e-6
    assert counter.frame_count == 2


def test_bad_input_raises_before_any_kernel():
    c = randn((2, 3, 4))
    with pytest.raises(ValueError, match="preds must be a list of 1 to 4 tensors, got list of 5"):
        ops.lincomb([c] * 5, [1.0] * 5)
    with pytest.raises(ValueError, match="3 weights expected"):
        ops.lincomb([c] * 3, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights tensor must be floating of shape \[3\] or \[2, 3\]"):
        ops.lincomb([c] * 3, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"weights\[1\] must be a float, a 0-d tensor or a tensor of shape \[2\]"):
        ops.lincomb([c] * 2, [1.0, torch.ones(3)])
    with pytest.raises(ValueError, match="middle must have cond's shape"):
        ops.dual_cfg(c, c[:, :2], c, 2.0, 1.5)
    with pytest.raises(TypeError, match="empty must have cond's dtype"):
        ops.perp_neg(c, c, c.double(), 2.0, 1.0)
    with pytest.raises(ValueError, match="model_scale must be finite"):
        ops.two_model_cfg(c, c, c, c, 2.0, float("nan"))


# --- dual CFG / InstructPix2Pix ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True])
def test_dual_cfg_equals_comfyui(dtype, nested):
    c, m, u = (randn((3, 4, 7, 5), dtype, strided=True) for _ in range(3))
    for s1, s2 in ((8.0, 1.5), (torch.tensor([1.0, 4.0, 7.5]), torch.tensor(2.0)), (1.0, 1.0)):
        out = ops.dual_cfg(c, m, u, s1, s2, nested=nested)
        ref = R.comfy_dual_cfg(c.double(), m.double(), u.double(), per_sample(s1, c), per_sample(s2, c), nested)
        assert rel_err(out, ref) <= 2 * TOL[dtype]  # (the expanded weights round once more than ComfyUI's nesting)


def test_dual_cfg_regular_is_instruct_pix2pix():
    text, image, uncond = (randn((2, 4, 8, 8)) for _ in range(3))
    out = ops.dual_cfg(text, image, uncond, 7.5, 1.5)
    assert rel_err(out, R.diffusers_ip2p(*(t.double() for t in (text, image, uncond)), 7.5, 1.5)) <= 1e-6


# --- Perp-Neg -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 9, 7), (3, 5, 6, 4)], ids=str)
def test_perp_neg_equals_comfyui(dtype, shape):
    pos, neg, empty = (randn(shape, dtype, strided=True) for _ in range(3))
    for s, ns in ((7.5, 1.0), (torch.rand(shape[0]) * 8, 2.5)):
        out = ops.perp_neg(pos, neg, empty, s, ns)
        ref = R.comfy_perp_neg(pos.double(), neg.double(), empty.double(), ns, per_sample(s, pos))
        assert rel_err(out, ref) <= 2 * TOL[dtype]
    # per_sample=True: ComfyUI's node applied to each sample alone
    out = ops.perp_neg(pos, neg, empty, 7.5, 1.0, per_sample=True)
    ref = torch.cat([R.comfy_perp_neg(pos[i:i + 1].double(), neg[i:i + 1].double(), empty[i:i + 1].double(), 1.0, 7.5)
                     for i in range(shape[0])])
    assert rel_err(out, ref) <= 2 * TOL[dtype]


def test_perp_neg_zero_positive_direction_stays_finite_where_comfyui_gives_nan():
    """cond == empty (P = 0): ComfyUI divides 0 by |P|^2 = 0 and returns NaN everywhere; fastguide projects
    nothing (perp = N), so out = empty - scale * neg_scale * N."""
    empty, neg = randn((2, 3, 4, 4)), randn((2, 3, 4, 4))
    assert torch.isnan(R.comfy_perp_neg(empty.double(), neg.double(), empty.double(), 1.0, 5.0)).all()
    out = ops.perp_neg(empty, neg, empty, 5.0, 1.0)
    assert rel_err(out, empty.double() - 5.0 * (neg.double() - empty.double())) <= 1e-6


# --- two-model guidance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rlg_equals_paper_formula(dtype):
    c, u, rc, ru = (randn((2, 4, 6, 5), dtype, strided=True) for _ in range(4))
    for s, w in ((5.0, 1.5), (torch.tensor([1.0, 7.0]), torch.tensor([0.0, 2.0]))):
        assert rel_err(ops.two_model_cfg(c, u, rc, ru, s, w), R.rlg64(c, u, rc, ru, s, w)) <= 2 * TOL[dtype]
    # w = 1: the RL model with CFG alone; w = 0: the reference alone
    assert rel_err(ops.two_model_cfg(c, u, rc, ru, 5.0, 1.0), R.guide64("cfg", [c, u], 5.0)) <= 2 * TOL[dtype]
    assert rel_err(ops.two_model_cfg(c, u, rc, ru, 5.0, 0.0), R.guide64("cfg", [rc, ru], 5.0)) <= 2 * TOL[dtype]


# --- the registry ---------------------------------------------------------------------------------------
def test_registry_declares_model_branches():
    rlg, auto = fastguide.METHODS["rlg"], fastguide.METHODS["weak_model"]
    assert rlg.model_keys == ("ref",) and auto.model_keys == ("weak",)
    assert auto.models == {"weak": ("weak", "cond")}
    for name, prompt in (("dual_cfg", {"middle": "middle_prompt"}), ("perp_neg", {"empty": "empty_prompt"})):
        # enable() encodes the extra prompt branch from the method's prompt parameter (tests/test_enable_prompts.py)
        assert fastguide.METHODS[name].enable_ready and fastguide.METHODS[name].prompts == prompt
    assert rlg.enable_ready and auto.enable_ready  # with enable(..., models={...})
    assert all(fastguide.METHODS[n].enable_ready for n in ("cfg", "apg", "pag", "cfg_zero_star", "frequency", "fdg"))
    base = dict(summary="s", peer="p", params={"scale": None}, combine=lambda *a: None)
    with pytest.raises(ValueError, match="must map to \\(model key, one of \\('cond', 'uncond'\\)\\)"):
        methods.register(methods.Method(name="x1", branches=("cond", "w"), models={"w": ("w", "perturbed")}, **base))
    with pytest.raises(ValueError, match="unknown or repeated branches \\['w'\\]"):
        methods.register(methods.Method(name="x2", branches=("cond", "w"), **base))
    with pytest.raises(ValueError, match="model branch 'uncond' .* not a prompt branch"):
        methods.register(methods.Method(name="x3", branches=("cond", "uncond"), models={"uncond": ("m", "cond")},
                                        **base))
    with pytest.raises(ValueError, match="prompt branch 'uncond' of 'x4' must be one of its branches and of "
                                         "\\('middle', 'empty'\\)"):
        methods.register(methods.Method(name="x4", prompts={"uncond": "scale"}, **base))
    with pytest.raises(ValueError, match="prompt branch 'empty' of 'x5' .* map to one of its parameters"):
        methods.register(methods.Method(name="x5", branches=("cond", "uncond", "empty"), prompts={"empty": "nope"},
                                        **base))
    assert not {"x1", "x2", "x3", "x4", "x5"} & set(fastguide.METHODS)


@pytest.mark.parametrize("name", ["dual_cfg", "perp_neg", "rlg", "weak_model"])
def test_combines_equal_their_ops(name):
    m = fastguide.METHODS[name]
    x = {b: randn((2, 3, 4, 4)) for b in m.branches}
    p = m.check_params({**m.example, "scale": 4.0, "rescale": 0.5}, "test")
    out = m.combine(x, p, None, 0)
    if name == "dual_cfg":
        g = R.comfy_dual_cfg(x["cond"].double(), x["middle"].double(), x["uncond"].double(), 4.0, p["middle_scale"])
    elif name == "perp_neg":
        g = R.comfy_perp_neg(x["cond"].double(), x["uncond"].double(), x["empty"].double(), p["neg_scale"], 4.0)
    elif name == "rlg":
        g = R.rlg64(x["cond"], x["uncond"], x["ref"], x["ref_uncond"], 4.0, p["rl_scale"])
    else:
        g = R.guide64("cfg", [x["cond"], x["weak"]], 4.0)
    assert rel_err(out, R.guidance_rescale(g, x["cond"].double(), 0.5)) <= 1e-6
    if name != "weak_model":
        with pytest.raises(ValueError, match="no 'original formulation'"):
            m.combine(x, {**p, "original": True}, None, 0)


# --- the guider route: a branch computed by a second model -----------------------------------------------
def _lab():
    from fastguide import lab
    pipe = lab.pipeline("unet")
    weak = lab.pipeline("unet_early").unet
    return pipe, weak


def _manual(pipe, models, combine, labels, steps, seed):
    """The same sampling loop written out: every branch's network call by hand, then the combine."""
    sch = pipe.scheduler
    sch.set_timesteps(steps)
    x = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed)) * sch.init_noise_sigma
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        for t in sch.timesteps:
            xi = sch.scale_model_input(x, t)
            preds = {name: net(xi, t, class_labels=y).sample for name, (net, y) in
                     {k: (pipe.unet if v[0] is None else models[v[0]], labels if v[1] == "cond" else null)
                      for k, v in combine[0].items()}.items()}
            x = sch.step(combine[1](preds), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", ["weak_model", "rlg"])
def test_guider_runs_the_second_model_for_its_branch(name):
    from fastguide.diffusers import MultiBranchGuidance
    pipe, weak = _lab()
    key = fastguide.METHODS[name].model_keys[0]
    params = {"rl_scale": 1.5} if name == "rlg" else {}
    guider = MultiBranchGuidance(method=name, guidance_scale=2.0, params=params, models={key: weak})
    labels = torch.tensor([3, 7])
    out = pipe(class_labels=labels, guider=guider, num_inference_steps=4, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    if name == "rlg":
        branches = {"cond": (None, "cond"), "uncond": (None, "uncond"), "ref": ("ref", "cond"),
                    "ref_uncond": ("ref", "uncond")}
        fn = lambda x: R.rlg64(x["cond"], x["uncond"], x["ref"], x["ref_uncond"], 2.0, 1.5).float()  # noqa: E731
    else:
        branches = {"cond": (None, "cond"), "weak": ("weak", "cond")}
        fn = lambda x: R.guide64("cfg", [x["cond"], x["weak"]], 2.0).float()  # noqa: E731
    ref = _manual(pipe, {key: weak}, (branches, fn), labels, 4, 0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert getattr(pipe.unet, "_diffusers_hook", None) is None or \
        pipe.unet._diffusers_hook.get_hook("fastguide_model_branch") is None  # the swap is gone after each call
    # the config round-trips without the model; using it without `models` says what is missing
    again = MultiBranchGuidance.from_config(guider.config)
    assert again.method.name == name and again.params == guider.params
    with pytest.raises(ValueError, match=f"needs the model '{key}'"):
        pipe(class_labels=labels, guider=again, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"needs models=\{key: model\} for the keys"):
        MultiBranchGuidance(method=name, models={"other": weak})


# --- ComfyUI's post-CFG nodes: CFGNorm, Mahiro, RenormCFG ------------------------------------------------
CHANNEL_SHAPES = [(1, 4, 9, 7), (3, 5, 6, 4), (2, 16), (2, 3, 2, 5, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
def test_cfg_norm_equals_comfyui(dtype, shape):
    c, u = (randn(shape, dtype, strided=len(shape) > 2) for _ in range(2))
    for s, strength in ((5.0, 1.0), (torch.rand(shape[0]) * 6, 0.7), (1.0, 1.3)):
        out = ops.cfg_norm(c, u, s, strength=strength)
        g = R.comfy_cfg_function(c.double(), u.double(), per_sample(s, c))
        assert rel_err(out, R.comfy_cfg_norm(c.double(), g, strength)) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=str)
def test_mahiro_equals_comfyui(dtype, shape):
    c, u = (randn(shape, dtype, strided=len(shape) > 2) for _ in range(2))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    for s in (5.0, torch.rand(shape[0]) * 6):
        sv = per_sample(s, c)
        cd, ud = c.double(), u.double()
        assert rel_err(ops.mahiro(c, u, s), R.comfy_mahiro(cd, ud, sv, R.comfy_cfg_function(cd, ud, sv))) <= tol
    # per_sample=True: the node run on each sample alone (ComfyUI averages the similarity over the batch)
    ref = torch.cat([R.comfy_mahiro(c[i:i + 1].double(), u[i:i + 1].double(), 4.0,
                                    R.comfy_cfg_function(c[i:i + 1].double(), u[i:i + 1].double(), 4.0))
                     for i in range(shape[0])])
    assert rel_err(ops.mahiro(c, u, 4.0, per_sample=True), ref) <= tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_renorm_cfg_equals_comfyui_per_sample(dtype):
    """ComfyUI's node at batch 1 (its `if` on a norm tensor raises for more samples), applied sample by sample:
    renorm active on some samples and not others, the learned-sigma style channel split, renorm 0 = CFG."""
    c, u = (randn((3, 8, 6, 5), dtype, strided=True) for _ in range(2))
    u[1] = c[1] * 0.9  # |g| < |c|: not renormalised at renorm 1
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    for s, r, ch in ((4.0, 1.0, None), (torch.tensor([2.0, 4.0, 6.0]), 1.5, 4), (4.0, 0.0, None), (1.0, 0.5, 6)):
        out = ops.renorm_cfg(c, u, s, r, channels=ch)
        sv = per_sample(s, c)
        ref = torch.cat([R.comfy_renorm_cfg(c[i:i + 1].double(), u[i:i + 1].double(),
                                            sv[i:i + 1] if isinstance(sv, torch.Tensor) else sv, r, ch or 8)
                         for i in range(3)])
        assert rel_err(out, ref) <= tol, (s, r, ch)
    with pytest.raises(RuntimeError, match="ambiguous"):
        R.comfy_renorm_cfg(c.double(), u.double(), 4.0, 1.0, 8)  # the node itself, at batch 3
    # |g| = 0 (cond == uncond == 0): the node gives NaN (0 / 0), fastguide the zero prediction
    z = torch.zeros(1, 4, 3, 3, dtype=dtype)
    assert torch.isnan(R.comfy_renorm_cfg(z.double(), z.double(), 4.0, 1.0, 4)).all()
    assert (ops.renorm_cfg(z, z, 4.0, 1.0) == 0).all()


def test_triton_channel_kernels():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from fastguide.kernels import channel as tc
    c, u = randn((2, 3, 5, 7)).to(dev), randn((2, 3, 5, 7)).to(dev)
    s = torch.tensor([1.0, 6.5], device=dev)
    # 35 positions in blocks of 16: 3 blocks with a tail; a per-sample and a float scale
    out = tc.cfg_norm(c, u, s, 0.0, 0.8, block=16)
    assert rel_err(out.cpu(), ops._eager.cfg_norm(c.cpu().double(), u.cpu().double(), s.cpu(), 0.0, 0.8)) <= 1e-6
    sim = tc.mahiro_sim(c, u, None, 4.0, block=16)
    torch.testing.assert_close(sim.cpu().double(), ops._eager.mahiro_sim(c.cpu().double(), u.cpu().double(), None, 4.0),
                               rtol=1e-5, atol=1e-6)


def test_channel_ops_opcheck_and_compile():
    c, u = randn((2, 3, 4, 5)), randn((2, 3, 4, 5))
    torch.library.opcheck(torch.ops.fastguide.cfg_norm.default, (c, u, torch.tensor([2.0, 3.0]), 0.0, 0.9))
    torch.library.opcheck(torch.ops.fastguide.mahiro_sim.default, (c, u, None, 4.0))
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda s, c, u: ops.mahiro(c, u, s) + ops.cfg_norm(c, u, s) + ops.renorm_cfg(c, u, s, 1.0),
                       backend=counter, fullgraph=True)
    scale = torch.empty(2)
    for step in range(3):
        scale.copy_(torch.tensor([2.0 + step, 5.0 - step]))
        ref = ops.mahiro(c, u, scale) + ops.cfg_norm(c, u, scale) + ops.renorm_cfg(c, u, scale, 1.0)
        torch.testing.assert_close(fn(scale, c, u), ref)
    assert counter.frame_count == 1


# --- CFG++ samplers: euler_ancestral_cfg_pp, dpmpp_2m_cfg_pp ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cfgpp_euler_ancestral_equals_comfyui(dtype):
    x, c, u, n = (randn((3, 4, 6, 5), dtype, strided=True) for _ in range(4))
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 1.6e-2}[dtype]
    for lam, (sigma, sigma_next), eta, s_noise in ((0.6, (7.3, 4.1), 1.0, 1.0), (torch.tensor([0.2, 0.5, 0.9]),
                                                    (2.0, 0.5), 0.5, 0.8), (0.4, (1.5, 0.0), 1.0, 1.0)):
        out = ops.cfgpp_euler_ancestral_step(x, c, u, lam, sigma, sigma_next, eta=eta, s_noise=s_noise, noise=n)
        ref = R.comfy_euler_ancestral_cfg_pp(x.double(), c.double(), u.double(), per_sample(lam, x), sigma,
                                             sigma_next, eta, s_noise, n.double())
        assert rel_err(out, ref) <= tol
    # eta = 0 is CFG++ Euler; the noise from a generator is torch.randn's draw
    torch.testing.assert_close(ops.cfgpp_euler_ancestral_step(x, c, u, 0.6, 3.0, 2.0, eta=0.0),
                               fastguide.cfgpp_euler_step(x, c, u, 0.6, 3.0, 2.0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(ops.cfgpp_euler_ancestral_step(x, c, u, 0.6, 3.0, 2.0, generator=g1),
                               ops.cfgpp_euler_ancestral_step(x, c, u, 0.6, 3.0, 2.0,
                                                              noise=torch.randn(x.shape, dtype=dtype, generator=g2)))
    with pytest.raises(ValueError, match="0 <= sigma_next <= sigma"):
        ops.cfgpp_euler_ancestral_step(x, c, u, 0.6, 2.0, 3.0)
    with pytest.raises(ValueError, match="noise must have cond's shape"):
        ops.cfgpp_euler_ancestral_step(x, c, u, 0.6, 3.0, 2.0, noise=n[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cfgpp_dpmpp_2m_loop_equals_comfyui(dtype):
    """A 5-step DPM++ 2M CFG++ loop (the last step to sigma 0) with predictions that depend on x: fastguide's
    steps with their state carried by the caller vs ComfyUI's sampler loop, in fp64."""
    shape = (2, 3, 5, 4)
    A, Bm = torch.randn(2, 4, 4, dtype=torch.float64) * 0.3, torch.randn(2, *shape, dtype=torch.float64)

    def eps(i, x):  # cond / uncond predictions: fixed random functions of x
        xx = x.double()
        return (torch.tanh(xx @ A[0]) + Bm[0] * (1 + i)), (torch.tanh(xx @ A[1]) + Bm[1])

    sigmas = [14.6, 6.1, 2.3, 0.7, 0.2, 0.0]
    lam = torch.tensor([0.5, 0.8])
    x0 = randn(shape, torch.float64) * sigmas[0]
    ref = R.comfy_dpmpp_2m_cfg_pp(x0, eps, lam.double().view(-1, 1, 1, 1), sigmas)
    x, old, prev = x0.to(dtype), None, None
    for i in range(len(sigmas) - 1):
        c, u = (e.to(dtype) for e in eps(i, x))
        x, du = ops.cfgpp_dpmpp_2m_step(x, c, u, lam.to(dtype), sigmas[i], sigmas[i + 1], old_uncond_denoised=old,
                                        sigma_prev=prev)
        old, prev = du, sigmas[i]
        assert rel_err(x, ref[i]) <= (1e-5 if dtype == torch.float32 else 1e-12), i
    with pytest.raises(ValueError, match="sigma_prev must be > sigma"):
        ops.cfgpp_dpmpp_2m_step(x, c, u, 0.5, 2.0, 1.0, old_uncond_denoised=du, sigma_prev=1.0)


def test_guider_prompt_branches_read_the_third_tuple_entry():
    """dual_cfg / perp_neg through the guider: the middle / empty batch is entry 2 of the pipeline's data tuples
    (a pipeline that encodes three conditions); a pipeline passing pairs gets a clear error."""
    from fastguide.diffusers import MultiBranchGuidance
    guider = MultiBranchGuidance(method="dual_cfg", guidance_scale=3.0, params={"middle_scale": 2.0})
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    emb = [torch.full((2, 3), float(i)) for i in range(3)]
    batches = guider.prepare_inputs({"sample": torch.zeros(2, 4), "emb": tuple(emb)})
    assert [b.emb[0, 0].item() for b in batches] == [0.0, 2.0, 1.0]  # cond, middle, uncond
    preds = [randn((2, 4, 3, 3)) for _ in range(3)]
    for b, p in zip(batches, preds):
        b.noise_pred = p
    out = guider(batches).pred
    assert rel_err(out, R.comfy_dual_cfg(preds[0].double(), preds[1].double(), preds[2].double(), 3.0, 2.0)) <= 1e-6
    with pytest.raises(ValueError, match=r"branch 'middle' reads entry 2 of the data tuples, but \['emb'\]"):
        guider.prepare_inputs({"emb": tuple(emb[:2])})
    with pytest.raises(ValueError, match="perturbs attention layers"):
        MultiBranchGuidance(method="pag")
