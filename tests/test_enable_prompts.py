"""`fastguide.enable` with an extra prompt branch (issue 14): Perp-Neg's empty prompt and dual CFG's middle prompt,
encoded by the pipeline's own text encoder(s) and run as a third part of the one denoiser forward per step
([uncond, cond, extra], 3B rows). Each against a hand loop that calls the same UNet once per branch and combines
with the float64 ComfyUI transcriptions of tests/reference.py, on tiny SD / SDXL pipelines with tiny CLIP encoders."""
import functools
import json
import os
import tempfile

import pytest
import torch

import fastguide
import reference as R
from test_pipelines import STEPS, assert_close, inputs, make_sd, make_sd3, make_sdxl

SCALE = 5.0
SEQ = 5  # the tokenizer's model_max_length: the length of inputs()'s prompt_embeds
VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "p", "h", "c", "lo", "l</w>", "w</w>", "r</w>",
         "t</w>", "o</w>", "a</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
         "<|startoftext|>", "<|endoftext|>"]


@functools.lru_cache(maxsize=None)
def _vocab_files():
    d = tempfile.mkdtemp(prefix="fastguide-tok-")
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(VOCAB)}, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    return os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")


def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer(*_vocab_files(), model_max_length=SEQ)


def text_encoder(hidden, seed, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SEQ, projection_dim=projection or hidden,
                         bos_token_id=VOCAB.index("<|startoftext|>"), eos_token_id=VOCAB.index("<|endoftext|>"),
                         pad_token_id=VOCAB.index("<|endoftext|>"))
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def make_sd_text():
    """make_sd with a tiny CLIP text encoder (16-wide, 5 tokens: inputs('sd')'s embedding shape)."""
    sd = make_sd()
    return type(sd)(**{**sd.components, "text_encoder": text_encoder(16, 1), "tokenizer": tokenizer()},
                    requires_safety_checker=False)


def make_sdxl_text():
    """make_sdxl with its two text encoders (8 + 8 wide hidden states -> 16; pooled projection 8)."""
    xl = make_sdxl()
    return type(xl)(**{**xl.components, "text_encoder": text_encoder(8, 1), "tokenizer": tokenizer(),
                       "text_encoder_2": text_encoder(8, 2, projection=8), "tokenizer_2": tokenizer()})


MAKERS = {"sd": make_sd_text, "sdxl": make_sdxl_text}


def encode(pipe, kind, text):
    """`text` encoded by hand the way SD / SDXL do it (the reference for what enable encodes): SD the last hidden
    state, SDXL the penultimate hidden states of both encoders side by side and the second encoder's projection."""
    texts = [text] if isinstance(text, str) else text
    with torch.no_grad():
        ids = pipe.tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt").input_ids
        if kind == "sd":
            return pipe.text_encoder(ids)[0], None
        one = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        two = pipe.text_encoder_2(ids, output_hidden_states=True)
        return torch.cat([one, two.hidden_states[-2]], -1), two.text_embeds


def run(pipe, kind, scale=SCALE, **kw):
    with torch.no_grad():
        return pipe(**{**inputs(kind), **kw}, num_inference_steps=STEPS, guidance_scale=scale, output_type="latent",
                    height=16, width=16).images


def hand_loop(pipe, kind, embeds, combine, latents=None):
    """Euler sampling around the bare UNet, ONE CALL PER BRANCH: embeds maps each branch to (encoder_hidden_states,
    SDXL's pooled); combine(preds, step) -> guided prediction from the per-branch predictions."""
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    x = (inputs(kind)["latents"] if latents is None else latents) * sch.init_noise_sigma
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])  # SDXL: original size, crop, target size
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            inp = sch.scale_model_input(x, t)
            preds = {}
            for branch, (emb, pooled) in embeds.items():
                added = None if kind == "sd" else {"text_embeds": pooled, "time_ids": time_ids.expand(x.shape[0], 6)}
                preds[branch] = pipe.unet(inp, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
            x = sch.step(combine(preds, i).float(), t, x).prev_sample
    return x


def close_per_branch(ours, ref):
    """Enabled (one forward of 3B rows) against the hand loop's per-branch calls (B rows each): the UNet's fp32 result
    depends on the batch it runs in (CPU GEMM / conv blocking). Measured on perp_neg SD: 3.1e-6 of the latents'
    scale (the same loop with one 3B forward: 1.5e-7, and with an fp32 combine instead of the fp64 one: 1e-7), so
    the bound is 2e-5 of that scale; a wrong row or embedding moves the result by O(1) of it."""
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5 * ref.abs().max().item())


def call_embeds(kind):
    kw = inputs(kind)
    return {"cond": (kw["prompt_embeds"], kw.get("pooled_prompt_embeds")),
            "uncond": (kw["negative_prompt_embeds"], kw.get("negative_pooled_prompt_embeds"))}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_perp_neg_equals_hand_loop(kind):
    """ComfyUI PerpNegGuider: cond = the prompt, uncond = the negative prompt, empty = "" through the pipeline's text
    encoder(s); the batch-wide projection of ComfyUI's perp_neg."""
    pipe = MAKERS[kind]()
    fastguide.enable(pipe, guidance="perp_neg", neg_scale=0.8)
    ours = run(pipe, kind)
    assert pipe.fastguide_report.nfe == 3 * STEPS and pipe.fastguide_report.steps == STEPS  # one forward of 3B rows
    fastguide.disable(pipe)
    embeds = {**call_embeds(kind), "empty": encode(pipe, kind, "")}
    ref = hand_loop(pipe, kind, embeds, lambda p, i: R.comfy_perp_neg(
        p["cond"].double(), p["uncond"].double(), p["empty"].double(), 0.8, SCALE))
    close_per_branch(ours, ref)
    cfg = hand_loop(pipe, kind, embeds, lambda p, i: p["uncond"] + SCALE * (p["cond"] - p["uncond"]))
    assert (ours - cfg).abs().max() > 1e-3 * cfg.abs().max()  # the empty branch is used


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("nested", [False, True])
def test_dual_cfg_middle_prompt_equals_hand_loop(kind, nested):
    """ComfyUI DualCFGGuider with cond2 = middle_prompt (middle_scale = its cfg_conds2_negative scale)."""
    pipe = MAKERS[kind]()
    fastguide.enable(pipe, guidance="dual_cfg", middle_prompt="newer", middle_scale=2.0, nested=nested)
    ours = run(pipe, kind)
    assert pipe.fastguide_report.nfe == 3 * STEPS
    fastguide.disable(pipe)
    embeds = {**call_embeds(kind), "middle": encode(pipe, kind, "newer")}
    ref = hand_loop(pipe, kind, embeds, lambda p, i: R.comfy_dual_cfg(
        p["cond"].double(), p["middle"].double(), p["uncond"].double(), SCALE, 2.0, nested=nested))
    close_per_branch(ours, ref)


def test_prompt_lists_and_images_per_prompt_keep_the_row_order():
    """Two prompts, two images each, one middle prompt per prompt: the denoiser rows are [p0, p0, p1, p1] per part,
    and each middle prompt goes to its prompt's rows."""
    pipe = make_sd_text()
    fastguide.enable(pipe, guidance="dual_cfg", middle_prompt=["wider", "newer"])
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    with torch.no_grad():
        ours = pipe(prompt=["low", "lowest"], negative_prompt=["er", "lo"], num_images_per_prompt=2, latents=latents,
                    num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent", height=16, width=16).images
    assert pipe.fastguide_report.nfe == 3 * 4 * STEPS
    fastguide.disable(pipe)
    rows = lambda texts: encode(pipe, "sd", texts)[0].repeat_interleave(2, 0)  # noqa: E731
    embeds = {"cond": (rows(["low", "lowest"]), None), "uncond": (rows(["er", "lo"]), None),
              "middle": (rows(["wider", "newer"]), None)}
    ref = hand_loop(pipe, "sd", embeds, lambda p, i: R.comfy_dual_cfg(
        p["cond"].double(), p["middle"].double(), p["uncond"].double(), SCALE, 1.5), latents=latents)
    close_per_branch(ours, ref)


def test_perp_neg_without_negative_prompt_equals_empty_negative_prompt():
    """No negative prompt: SD encodes "" as the uncond, so uncond == empty in content; still ComfyUI's formula."""
    pipe = make_sd_text()
    fastguide.enable(pipe, guidance="perp_neg")
    kw = dict(prompt="low", latents=inputs("sd")["latents"])
    none = run(pipe, "sd", **kw, prompt_embeds=None, negative_prompt_embeds=None)
    empty = run(pipe, "sd", **kw, prompt_embeds=None, negative_prompt_embeds=None, negative_prompt="")
    torch.testing.assert_close(none, empty, rtol=0, atol=0)
    # uncond - empty = 0: Perp-Neg's perpendicular part is 0 and the result is CFG against the empty prompt
    fastguide.enable(pipe, guidance="cfg")
    assert_close(none, run(pipe, "sd", **kw, prompt_embeds=None, negative_prompt_embeds=None))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_embeddings_instead_of_a_prompt(kind):
    """middle_prompt / empty_prompt as embeddings (SDXL: (embeddings, pooled)) on a pipeline without text encoders:
    the same result as the prompt encoded by the pipeline that has them."""
    with_text = MAKERS[kind]()
    bare = {"sd": make_sd, "sdxl": make_sdxl}[kind]()
    emb, pooled = encode(with_text, kind, "newer")
    given = emb if kind == "sd" else (emb, pooled)
    fastguide.enable(with_text, guidance="dual_cfg", middle_prompt="newer")
    fastguide.enable(bare, guidance="dual_cfg", middle_prompt=given)
    assert_close(run(bare, kind), run(with_text, kind))
    empty = encode(with_text, kind, "")
    fastguide.enable(with_text, guidance="perp_neg")
    fastguide.enable(bare, guidance="perp_neg", empty_prompt=empty[0] if kind == "sd" else empty)
    assert_close(run(bare, kind), run(with_text, kind))


def test_disable_restores_stock_and_a_second_pipeline_on_the_same_unet_is_unaffected():
    p1 = make_sd_text()
    p2 = type(p1)(**p1.components, requires_safety_checker=False)
    stock = run(p2, "sd")
    fastguide.enable(p1, guidance="perp_neg")
    alone_perp = run(p1, "sd")
    torch.testing.assert_close(run(p2, "sd"), stock, rtol=0, atol=0)  # stock pipeline on the hooked UNet
    fastguide.enable(p2, guidance="dual_cfg", middle_prompt="newer")
    alone_dual = run(p2, "sd")
    for _ in range(2):  # interleaved: each pipeline's extra prompt stays its own
        torch.testing.assert_close(run(p1, "sd"), alone_perp, rtol=0, atol=0)
        torch.testing.assert_close(run(p2, "sd"), alone_dual, rtol=0, atol=0)
    fastguide.disable(p1)
    fastguide.disable(p2)
    assert "forward" not in p1.unet.__dict__
    torch.testing.assert_close(run(p1, "sd"), stock, rtol=0, atol=0)


def test_clear_errors_before_anything_changes():
    from test_enable_models import make_ip2p
    pipe = make_sd_text()
    with pytest.raises(ValueError, match=r"guidance='dual_cfg' on StableDiffusionPipeline needs middle_prompt=\.\.\..*"
                                         r"enable\(pipe, guidance='dual_cfg', middle_prompt='a photo'\)"):
        fastguide.enable(pipe, guidance="dual_cfg")
    with pytest.raises(ValueError, match=r"middle_prompt must be a str, a non-empty list of str .* got int"):
        fastguide.enable(pipe, guidance="dual_cfg", middle_prompt=3)
    with pytest.raises(ValueError, match=r"adaptive/interval/linear_ag .* guidance='perp_neg'"):
        fastguide.enable(pipe, guidance="perp_neg", adaptive=fastguide.AG())
    with pytest.raises(ValueError, match=r"adaptive/interval/linear_ag .* guidance='dual_cfg'"):
        fastguide.enable(pipe, guidance="dual_cfg", middle_prompt="low", interval=(0.5, 5.0))
    assert not fastguide.pipelines.is_enabled(pipe)
    with pytest.raises(ValueError, match=r"encodes empty_prompt='' with the pipeline's text encoder, and "
                                         r"StableDiffusionPipeline has tokenizer=None.*float tensor \[n, seq, dim\]"):
        fastguide.enable(make_sd(), guidance="perp_neg")
    with pytest.raises(ValueError, match=r"tuple of two float tensors; got Tensor\[1, 5, 16\]"):
        fastguide.enable(make_sdxl(), guidance="dual_cfg", middle_prompt=torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match=r"needs the 'empty' prompt branch, which enable builds on StableDiffusion"
                                         r"Pipeline.*not on StableDiffusion3Pipeline.*MultiBranchGuidance\(method="
                                         r"'perp_neg'"):
        fastguide.enable(make_sd3(), guidance="perp_neg")
    with pytest.raises(ValueError, match=r"middle branch is its image condition; middle_prompt= does not apply"):
        fastguide.enable(make_ip2p(), guidance="dual_cfg", middle_prompt="newer")
    with pytest.raises(ValueError, match="middle_prompt= is for fastguide.enable"):
        fastguide.diffusers.MultiBranchGuidance(method="dual_cfg", params={"middle_prompt": "newer"})
    # checked at the call, before the pipeline does any work; the pipeline stays enabled and usable
    fastguide.enable(pipe, guidance="dual_cfg", middle_prompt=["low", "lo", "er"])
    with pytest.raises(ValueError, match="middle_prompt holds 3 prompts, the call 1: give one, or one per prompt"):
        run(pipe, "sd")
    fastguide.enable(pipe, guidance="dual_cfg", middle_prompt=torch.zeros(1, 7, 16))
    with pytest.raises(ValueError, match=r"middle_prompt's embeddings are \[1, 7, 16\], the call's prompt_embeds "
                                         r"\[1, 5, 16\]"):
        run(pipe, "sd")
    fastguide.enable(pipe, guidance="dual_cfg", middle_prompt="newer")
    assert torch.isfinite(run(pipe, "sd")).all() and pipe.fastguide_report.nfe == 3 * STEPS
