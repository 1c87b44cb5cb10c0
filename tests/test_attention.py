"""Identity-attention PAG processor against diffusers' PAG processors and guider path."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
from diffusers.models.attention_processor import (Attention, AttnProcessor2_0, JointAttnProcessor2_0,
                                                  PAGCFGIdentitySelfAttnProcessor2_0,
                                                  PAGCFGJointAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0)
from torch.utils._python_dispatch import TorchDispatchMode

from fastguide import attention
from fastguide.bench import tiny_unet


def tiny_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4).eval()


class SDPACounter:
    """Records the batch size of every scaled_dot_product_attention call."""

    def __init__(self, monkeypatch):
        self.batches = []
        real = F.scaled_dot_product_attention

        def counted(q, *args, **kwargs):
            self.batches.append(q.shape[0])
            return real(q, *args, **kwargs)
        monkeypatch.setattr(F, "scaled_dot_product_attention", counted)


@pytest.mark.parametrize("chunks,theirs", [(3, PAGCFGIdentitySelfAttnProcessor2_0), (2, PAGIdentitySelfAttnProcessor2_0)])
def test_self_attention_equals_diffusers_pag_processor(chunks, theirs, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(2 * chunks, 37, 32)
    with torch.no_grad():
        ref = theirs()(attn, x)
        counter = SDPACounter(monkeypatch)
        out = attention.IdentityPAGProcessor(chunks=chunks)(attn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counter.batches == [2 * chunks - 2]  # the 2 perturbed rows never reach SDPA


def test_perturbed_rows_are_to_out_of_v_and_other_rows_plain_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=4, dim_head=8).eval()
    x = torch.randn(5, 11, 16)
    with torch.no_grad():
        out = attention.IdentityPAGProcessor(perturbed=2)(attn, x)
        torch.testing.assert_close(out[3:], attn.to_out[0](attn.to_v(x[3:])))
        torch.testing.assert_close(out[:3], AttnProcessor2_0()(attn, x[:3]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention.IdentityPAGProcessor(perturbed=0)(attn, x), AttnProcessor2_0()(attn, x),
                                   rtol=1e-5, atol=1e-6)


def test_unet_with_pag_layers_equals_diffusers():
    unet = tiny_unet("cpu")
    x = torch.randn(3, 4, 16, 16)
    emb = torch.randn(3, 7, 32)
    layers = ["mid", "up_blocks.1.attentions.1"]
    with torch.no_grad():
        attention.apply_pag(unet, layers, attention.IdentityPAGProcessor(chunks=3))
        ours = unet(x, 10, encoder_hidden_states=emb).sample
        attention.remove_pag(unet)
        plain = unet(x, 10, encoder_hidden_states=emb).sample
        for name, m in attention.self_attention_layers(unet):
            if any(s in name for s in ("mid", "up_blocks.1.attentions.1")):
                m.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
        theirs = unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[:2], plain[:2], rtol=1e-4, atol=1e-5)  # unperturbed rows untouched
    assert (ours[2] - plain[2]).abs().max() > 1e-3  # the perturbed row really changed


def _joint_inputs(attn, batch, n_img, n_txt):
    torch.manual_seed(1)
    return torch.randn(batch, n_img, attn.query_dim), torch.randn(batch, n_txt, attn.query_dim)


def test_joint_attention_equals_diffusers_guider_path(monkeypatch):
    """SD3 joint attention: unperturbed rows = stock JointAttnProcessor2_0, perturbed rows = diffusers'
    skip_attention_scores path (SDPA replaced by V), for image and text tokens."""
    model = tiny_sd3()
    for attn in (model.transformer_blocks[0].attn, model.transformer_blocks[1].attn):  # last block: context_pre_only
        hs, ctx = _joint_inputs(attn, 3, 64, 7)
        with torch.no_grad():
            ref_img, ref_ctx = JointAttnProcessor2_0()(attn, hs[:2], ctx[:2]) if not attn.context_pre_only else \
                (JointAttnProcessor2_0()(attn, hs[:2], ctx[:2]), None)
            with AttentionScoreSkipFunctionMode():
                ptb = JointAttnProcessor2_0()(attn, hs[2:], ctx[2:])
            counter = SDPACounter(monkeypatch)
            out = attention.IdentityPAGProcessor(chunks=3)(attn, hs, ctx)
            monkeypatch.undo()  # the reference path identifies SDPA by identity
        out_img, out_ctx = out if isinstance(out, tuple) else (out, None)
        ptb_img = ptb[0] if isinstance(ptb, tuple) else ptb
        ref_img = ref_img if isinstance(ref_img, torch.Tensor) else ref_img[0]
        torch.testing.assert_close(out_img[:2], ref_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_img[2:], ptb_img, rtol=1e-5, atol=1e-6)
        if not attn.context_pre_only:
            torch.testing.assert_close(out_ctx[:2], ref_ctx, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_ctx[2:], ptb[1], rtol=1e-5, atol=1e-6)
        assert counter.batches == [2]


class PeakNumel(TorchDispatchMode):
    """The largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


def _joint_peak(processor, attn, n_img):
    hs, ctx = _joint_inputs(attn, 3, n_img, 7)
    with torch.no_grad(), PeakNumel() as mode:
        processor(attn, hs, ctx)
    return mode.peak


def test_joint_memory_has_no_quadratic_term():
    """diffusers' PAGCFGJointAttnProcessor2_0 builds a seq x seq mask (issue #8861); ours stays linear."""
    attn = tiny_sd3().transformer_blocks[0].attn
    ours = [_joint_peak(attention.IdentityPAGProcessor(), attn, n) for n in (256, 1024)]
    theirs = [_joint_peak(PAGCFGJointAttnProcessor2_0(), attn, n) for n in (256, 1024)]
    assert ours[1] / ours[0] < 4.5            # 4x the tokens: linear growth
    assert theirs[1] / theirs[0] > 12          # quadratic growth in diffusers
    assert ours[1] < (1024 + 7) ** 2 <= theirs[1]  # their seq x seq mask


def test_apply_pag_selection_and_errors():
    model = tiny_sd3()
    proc = attention.apply_pag(model, [1])
    assert model.transformer_blocks[1].attn.processor is proc
    assert not isinstance(model.transformer_blocks[0].attn.processor, attention.IdentityPAGProcessor)
    attention.apply_pag(model, r"transformer_blocks\.0\.")
    assert isinstance(model.transformer_blocks[0].attn.processor, attention.IdentityPAGProcessor)
    attention.remove_pag(model)
    assert all(not isinstance(m.processor, attention.IdentityPAGProcessor)
               for _, m in attention.self_attention_layers(model))
    with pytest.raises(ValueError, match="matches no self-attention layer; available: transformer_blocks.0.attn"):
        attention.apply_pag(model, ["mid"])
    with pytest.raises(ValueError, match="out of range"):
        attention.apply_pag(model, [5])
