"""Identity-attention PAG for diffusers `Attention` modules, without chunk/cat of the batch and without masks.

Perturbed-attention guidance (Ahn et al.) replaces the self-attention map of chosen layers by the
identity for a "perturbed" copy of the conditional batch, i.e. attention output = V. diffusers does it
with processors that chunk the batch, `torch.cat` the unperturbed parts back together, run attention,
and `torch.cat` the outputs; for SD3's joint attention it builds a full seq x seq -inf mask
(diffusers issue #8861). `IdentityPAGProcessor` instead:
  * projects V once for the whole batch;
  * projects Q and K only for the unperturbed rows (a view of the batch: rows [0, B - p));
  * runs SDPA on those rows and writes the result into their rows of V in place;
  * applies `to_out` (and `to_add_out`) once to the whole batch.
The last p rows never touch Q, K or SDPA: their output is to_out(V). Memory is O(seq), not O(seq^2).
For joint (SD3/Flux-style) attention the perturbed rows' image and text tokens both output their V,
which is diffusers' guider path (`LayerSkipConfig(skip_attention_scores=True)`).

    fastguide.attention.apply_pag(pipe.unet, ["mid", "down_blocks.1"])    # regex on module names
    fastguide.attention.apply_pag(pipe.transformer, [3, 7])               # indices of self-attention layers
    fastguide.attention.remove_pag(pipe.unet)
"""
import math
import re

import torch
import torch.nn.functional as F


class IdentityPAGProcessor:
    """Attention processor: the last `perturbed` rows of the batch get identity attention.

    `perturbed=None` means `batch // chunks` rows (chunks=3: [uncond, cond, cond_perturbed] as in
    diffusers' CFG+PAG pipelines; chunks=2: [cond, cond_perturbed]). Set `perturbed=0` to run plain attention.
    """

    kind = "processor"  # how `fastguide.enable` switches it on a layer (see `switch`)

    def __init__(self, perturbed=None, chunks=3):
        self.perturbed = perturbed
        self.chunks = chunks

    @staticmethod
    def layers(model, specs):
        """{name: module} of the layers of `model` this perturbation goes on: `select_layers`."""
        return select_layers(model, [specs] if isinstance(specs, (str, int)) else list(specs))

    @staticmethod
    def switch(module, select):
        """Put a SwitchedPerturbation(select, its processor) on the attention `module` (`fastguide.enable`, on a
        denoiser several pipelines may share); returns the function that puts its processor back."""
        saved = module.processor
        module.set_processor(SwitchedPerturbation(select, saved))
        return lambda: module.set_processor(saved)

    def _rows(self, batch):
        p = batch // self.chunks if self.perturbed is None else int(self.perturbed)
        if not 0 <= p <= batch:
            raise ValueError(f"IdentityPAGProcessor: {p} perturbed rows in a batch of {batch}")
        return batch - p

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if getattr(attn, "add_q_proj", None) is not None:
            return self._joint(attn, hidden_states, encoder_hidden_states)
        if encoder_hidden_states is not None:
            raise ValueError("IdentityPAGProcessor applies to self-attention layers; this layer got "
                             "encoder_hidden_states (cross-attention)")
        return self._self(attn, hidden_states, attention_mask, temb)

    @staticmethod
    def _heads(x, rows, attn):
        return x.view(rows, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    @staticmethod
    def _norm_qk(attn, query, key):
        """The layer's q / k norms, when it has them."""
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key

    def _query_key(self, attn, x, n):
        """Q and K of the n unperturbed rows, per head, with the layer's q/k norms when it has them."""
        return self._norm_qk(attn, self._heads(attn.to_q(x), n, attn), self._heads(attn.to_k(x), n, attn))

    def _self(self, attn, hidden_states, attention_mask, temb):
        """diffusers' AttnProcessor2_0 around `_attend` (spatial / group norm, 4-D inputs, output projection,
        residual, rescale)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = attn.to_out[1](attn.to_out[0](self._attend(attn, hidden_states, attention_mask)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, hidden_states, attention_mask):
        """Self-attention of [batch, seq, dim] tokens, before the output projection."""
        batch, seq, _ = hidden_states.shape
        n = self._rows(batch)
        value = attn.to_v(hidden_states)  # every row: the perturbed rows' attention output is V
        if n:
            query, key = self._query_key(attn, hidden_states[:n], n)  # a view: no copy of the batch
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, seq, batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])[:n]
            out = F.scaled_dot_product_attention(query, key, self._heads(value[:n], n, attn), attn_mask=mask,
                                                 dropout_p=0.0, is_causal=False)
            value[:n] = out.transpose(1, 2).reshape(n, seq, -1).to(value.dtype)
        return value

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]
        n = self._rows(batch)
        value = attn.to_v(hidden_states)
        ctx_value = attn.add_v_proj(encoder_hidden_states) if encoder_hidden_states is not None else None
        if n:
            query, key = self._query_key(attn, hidden_states[:n], n)
            v = self._heads(value[:n], n, attn)
            if ctx_value is not None:
                e = encoder_hidden_states[:n]
                cq, ck = self._heads(attn.add_q_proj(e), n, attn), self._heads(attn.add_k_proj(e), n, attn)
                if attn.norm_added_q is not None:
                    cq = attn.norm_added_q(cq)
                if attn.norm_added_k is not None:
                    ck = attn.norm_added_k(ck)
                query, key = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2)
                v = torch.cat([v, self._heads(ctx_value[:n], n, attn)], dim=2)
            out = F.scaled_dot_product_attention(query, key, v, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(n, out.shape[2], -1)
            value[:n] = out[:, :n_img].to(value.dtype)
            if ctx_value is not None:
                ctx_value[:n] = out[:, n_img:].to(ctx_value.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](value))
        if ctx_value is None:
            return hidden_states
        if not attn.context_pre_only:
            ctx_value = attn.to_add_out(ctx_value)
        return hidden_states, ctx_value


def seg_blur_(query, blur_sigma, blur_threshold_inf=9999.0):
    """Smoothed Energy Guidance's query blur, in place on `query` [B, N, C] (the output of `to_q`; the first
    isqrt(N)^2 tokens are a square image, the rest is left alone): a Gaussian blur of width `blur_sigma` over
    the image grid, per channel (depthwise conv, reflect padding, kernel ceil(6 sigma) rounded to odd, at most
    the grid size), or, for `blur_sigma > blur_threshold_inf` ("infinite" blur), every token replaced by the
    channel's mean. That is the official SEG code (SusungHong/SEG-SDXL pipeline_seg.py, blur of the
    per-head query laid out as [B, heads * head_dim, H, W], the same channels). diffusers 0.42's
    `_gaussian_blur_2d` swaps the two branches (tests/test_diffusers_twins.py documents it)."""
    if not blur_sigma > 0:
        raise ValueError(f"fastguide SEG: blur_sigma must be > 0, got {blur_sigma!r}")
    b, seq, ch = query.shape
    side = math.isqrt(seq)
    grid = query[:, :side * side]
    if seq == 0 or b == 0:
        return query
    if blur_sigma > blur_threshold_inf:
        grid.copy_(grid.mean(dim=1, keepdim=True).expand_as(grid))
        return query
    k = math.ceil(6 * blur_sigma) + 1 - math.ceil(6 * blur_sigma) % 2
    k = min(k, side - (side % 2 - 1))
    half = (k - 1) / 2
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=k) / blur_sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(query)
    kernel = torch.matmul(k1[:, None], k1[None, :]).expand(ch, 1, k, k)
    img = grid.permute(0, 2, 1).reshape(b, ch, side, side)
    img = F.conv2d(F.pad(img, [k // 2] * 4, mode="reflect"), kernel, groups=ch)
    grid.copy_(img.reshape(b, ch, side * side).permute(0, 2, 1))
    return query


class SEGProcessor(IdentityPAGProcessor):
    """Attention processor for Smoothed Energy Guidance (Hong, NeurIPS 2024): the last `perturbed` rows of the
    batch attend with blurred queries (`seg_blur_` of their `to_q` output, image tokens only on joint SD3-style
    layers), the other rows with plain attention. One Q/K/V projection and one SDPA for the whole batch; the
    blur is written into the perturbed rows of the query in place: no chunk / cat of the batch (diffusers'
    guider runs a separate batch with hooks on `to_q`; the official pipeline chunks and concatenates).
    `perturbed=None`: batch // chunks rows, like IdentityPAGProcessor."""

    def __init__(self, blur_sigma=9999999.0, blur_threshold_inf=9999.0, perturbed=None, chunks=3):
        if not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0 or not math.isfinite(blur_sigma):
            raise ValueError(f"fastguide.attention.SEGProcessor: blur_sigma must be a finite float > 0, "
                             f"got {blur_sigma!r}")
        super().__init__(perturbed, chunks)
        self.blur_sigma, self.blur_threshold_inf = float(blur_sigma), float(blur_threshold_inf)

    def _query(self, attn, x):
        query = attn.to_q(x)
        n = self._rows(query.shape[0])
        if n < query.shape[0]:
            seg_blur_(query[n:], self.blur_sigma, self.blur_threshold_inf)  # rows of a contiguous tensor: a view
        return query

    def _attend(self, attn, hidden_states, attention_mask):
        batch, seq, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key = self._norm_qk(attn, self._heads(self._query(attn, hidden_states), batch, attn),
                                   self._heads(attn.to_k(hidden_states), batch, attn))
        value = self._heads(attn.to_v(hidden_states), batch, attn)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        return out.transpose(1, 2).reshape(batch, seq, -1).to(query.dtype)

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key = self._norm_qk(attn, self._heads(self._query(attn, hidden_states), batch, attn),
                                   self._heads(attn.to_k(hidden_states), batch, attn))
        value = self._heads(attn.to_v(hidden_states), batch, attn)
        e = encoder_hidden_states
        if e is not None:
            cq, ck = self._heads(attn.add_q_proj(e), batch, attn), self._heads(attn.add_k_proj(e), batch, attn)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2)
            value = torch.cat([value, self._heads(attn.add_v_proj(e), batch, attn)], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, out.shape[2], -1).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, :n_img]))
        if e is None:
            return hidden_states
        ctx = out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return hidden_states, ctx


def self_attention_layers(model):
    """[(name, Attention)] of the self-attention modules of a diffusers model, in module order."""
    from diffusers.models.attention_processor import Attention
    def is_self(name, m):
        joint = getattr(m, "add_q_proj", None) is not None  # SD3/Flux joint attention: image + text tokens
        return joint or (not m.is_cross_attention and not name.endswith("attn2"))
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention) and is_self(name, m)]


def _pick(candidates, layers, what, where="fastguide.attention.apply_pag"):
    """{name: module} of `candidates` ([(name, module)]) selected by `layers`: strings are regular expressions
    searched in the names, ints index the list. Raises, listing the candidates, when a spec matches nothing."""
    chosen = {}
    for spec in layers:
        if isinstance(spec, int) and not isinstance(spec, bool):
            if not -len(candidates) <= spec < len(candidates):
                raise ValueError(f"{where}: layer index {spec} out of range: {len(candidates)} {what}s")
            hits = [candidates[spec]]
        elif isinstance(spec, str):
            hits = [(nm, m) for nm, m in candidates if re.search(spec, nm)]
        else:
            raise TypeError(f"{where}: layers must be str or int, got {spec!r}")
        if not hits:
            names = ", ".join(nm for nm, _ in candidates[:12]) + (" ..." if len(candidates) > 12 else "")
            raise ValueError(f"{where}: layer {spec!r} matches no {what}; available: {names}")
        chosen.update(hits)
    return chosen


def select_layers(model, layers):
    """{name: Attention} of the self-attention layers of `model` selected by `layers`: strings are regular
    expressions searched in module names (like diffusers' pag_applied_layers, e.g. "mid", "down_blocks.1",
    r"transformer_blocks\\.3\\b"), ints index `self_attention_layers(model)`. Raises, listing the available
    layers, when a spec matches nothing; changes nothing."""
    if isinstance(layers, (str, int)):
        layers = [layers]
    candidates = self_attention_layers(model)
    if not candidates:
        raise ValueError(f"fastguide.attention.apply_pag: {type(model).__name__} has no self-attention layers")
    return _pick(candidates, layers, "self-attention layer")


def apply_pag(model, layers, processor=None):
    """Put `processor` (default: a new IdentityPAGProcessor()) on the self-attention layers selected by
    `layers` (see `select_layers`). Returns the processor. The replaced processors are kept for `remove_pag`.
    """
    chosen = select_layers(model, layers)
    processor = processor if processor is not None else IdentityPAGProcessor()
    saved = getattr(model, "_fastguide_pag_saved", {})
    for name, module in chosen.items():
        saved.setdefault(name, module.processor)
        module.set_processor(processor)
    model._fastguide_pag_saved = saved
    return processor


class _Gated:
    """The processor's perturbation while `self.gate()` is true, the layer's own processor (`self.fallback`)
    otherwise."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.gate():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if temb is not None:  # pass on only what the layer was given: not every processor takes temb
            kwargs["temb"] = temb
        return self.fallback(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


class GatedPAGProcessor(_Gated, IdentityPAGProcessor):
    """Identity-attention PAG on one layer only while `gate()` is true; the layer's own processor
    (`fallback`) otherwise. `fastguide.enable` puts these on a denoiser that several pipelines may share,
    so the perturbed rows exist only in the calls of the pipeline that asked for PAG on this layer."""

    def __init__(self, gate, fallback, perturbed=None, chunks=3):
        super().__init__(perturbed, chunks)
        self.gate, self.fallback = gate, fallback


class SwitchedPerturbation:
    """One layer of a denoiser that several pipelines may share (`fastguide.enable`): `select()` returns the
    perturbation the running pipeline's call wants on this layer (an IdentityPAGProcessor for PAG, a
    SEGProcessor for SEG, ...) or None, and then the layer's own processor (`fallback`) runs."""

    def __init__(self, select, fallback):
        self.select, self.fallback = select, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        proc = self.select()
        if proc is not None:
            return proc(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if temb is not None:  # pass on only what the layer was given: not every processor takes temb
            kwargs["temb"] = temb
        return self.fallback(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


class GatedSEGProcessor(_Gated, SEGProcessor):
    """SEGProcessor while `gate()` is true, `fallback` otherwise (GatedPAGProcessor's role, for SEG)."""

    def __init__(self, gate, fallback, blur_sigma=9999999.0, blur_threshold_inf=9999.0, perturbed=None, chunks=3):
        super().__init__(blur_sigma, blur_threshold_inf, perturbed, chunks)
        self.gate, self.fallback = gate, fallback


def remove_pag(model):
    """Restore the processors `apply_pag` replaced."""
    saved = getattr(model, "_fastguide_pag_saved", {})
    modules = dict(model.named_modules())
    for name, proc in saved.items():
        modules[name].set_processor(proc)
    model._fastguide_pag_saved = {}


# --- diffusers' layer skipping (AutoGuidance), on some rows of the batch --------------------------------------
_ABSENT = object()
SKIPS = {"block": (True, True), "attention": (True, False), "ff": (False, True)}  # -> LayerSkipConfig's
# (skip_attention, skip_ff)


def transformer_blocks(model):
    """[(name, block)] of the transformer blocks of a diffusers model, in module order: the modules whose class
    diffusers' layer-skip hooks know (its TransformerBlockRegistry: BasicTransformerBlock -- inside the
    `attentions` of SD / SDXL UNets and in PixArt --, JointTransformerBlock, Flux's, Wan's, ...)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    TransformerBlockRegistry._register()
    known = tuple(TransformerBlockRegistry._registry)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, known)]


class LayerSkip:
    """diffusers' `LayerSkipConfig` (diffusers.hooks.layer_skip) on the rows [start, stop) of the batch only, the
    other rows running the layers as they are: diffusers' AutoGuidance ("bad model" = layers skipped) on the
    uncond rows of the pipeline's one [uncond, cond] forward (`fastguide.enable(pipe, guidance="autoguidance")`).

    skip="block": the whole transformer block (skip_attention and skip_ff); "attention": its self-attention
    modules (not the cross-attention); "ff": its feed-forward modules. Those rows, at dropout=1, get what
    diffusers' TransformerBlockSkipHook / AttentionProcessorSkipHook / FeedForwardSkipHook return: the module's
    input hidden_states; the module runs on the other rows only. At dropout < 1 the module runs on every row
    and its output on those rows goes through F.dropout(p=dropout) (scaled by 1 / (1 - dropout), as diffusers'
    hooks do on the whole batch): the same distribution, another random stream than diffusers' (which draws
    its mask for the uncond batch alone). Block skipping at dropout < 1 also drops out the block's feed-forward
    output, as diffusers' hooks do (it registers both).

    Layers: `layers(model, specs)` picks transformer blocks (`transformer_blocks`) as `select_layers` picks
    attention layers: strings are regular expressions searched in the block names ("mid", "down_blocks.1",
    r"transformer_blocks\\.3\\b"), ints index the blocks in module order (on DiTs with one stack of blocks --
    PixArt, SD3 -- diffusers' `auto_guidance_layers` indices)."""

    kind = "forward"  # enable switches it by wrapping the modules' forward (see `switch`)

    def __init__(self, skip="block", dropout=1.0):
        where = "fastguide autoguidance"
        if skip not in SKIPS:
            raise ValueError(f"{where}: skip must be one of {sorted(SKIPS)}, got {skip!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{where}: dropout must be a float in [0, 1] (1: the layers skipped, diffusers' "
                             f"LayerSkipConfig), got {dropout!r}")
        self.skip, self.dropout = skip, float(dropout)
        self.rows = None  # (start, stop, batch) while a denoiser call perturbs rows [start, stop) of `batch`

    def layers(self, model, specs):
        """{name: module} of the modules to switch: the chosen blocks, or their self-attention / feed-forward
        modules (and, for blocks at dropout < 1, their feed-forward modules too, as diffusers hooks them)."""
        from diffusers.hooks._common import _ATTENTION_CLASSES, _FEEDFORWARD_CLASSES
        where = "fastguide autoguidance"
        specs = [specs] if isinstance(specs, (str, int)) else list(specs)
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"{where}: {type(model).__name__} has no transformer blocks that diffusers' layer "
                             f"skipping knows")
        chosen = _pick(blocks, specs, "transformer block", where)
        attention, ff = SKIPS[self.skip]
        out = {}
        for name, block in chosen.items():
            if attention and ff:
                out[name] = block
            for sub, m in block.named_modules():
                full = f"{name}.{sub}"
                if attention and not ff and isinstance(m, _ATTENTION_CLASSES) and not m.is_cross_attention:
                    if getattr(m, "add_q_proj", None) is not None:
                        raise ValueError(f"{where}: skip='attention' on {full}, a joint (image + text) attention "
                                         f"layer, is not supported: use skip='block' or 'ff'")
                    out[full] = m
                if ff and isinstance(m, _FEEDFORWARD_CLASSES) and (not attention or not self._whole):
                    out[full] = m
        return out

    @property
    def _whole(self):
        return math.isclose(self.dropout, 1.0)  # diffusers' own test for "skipped" (not dropped out)

    def switch(self, module, select):
        """Wrap `module.forward` (an instance attribute, as diffusers' hooks do): while `select()` returns a
        LayerSkip with rows set, those rows are skipped; otherwise the module runs as it is. Returns the undo
        (which leaves a pass-through when someone wrapped the module after us)."""
        from diffusers.hooks._common import _ATTENTION_CLASSES, _FEEDFORWARD_CLASSES
        role = ("attention" if isinstance(module, _ATTENTION_CLASSES) else
                "ff" if isinstance(module, _FEEDFORWARD_CLASSES) else "block")
        saved = module.__dict__.get("forward", _ABSENT)
        original = module.forward

        def forward(*args, **kwargs):
            skip = select()
            if skip is None or skip.rows is None or skip.rows[0] == skip.rows[1]:
                return original(*args, **kwargs)
            return skip._forward(role, module, original, args, kwargs)

        module.forward = forward

        def undo():
            if module.__dict__.get("forward") is forward:
                if saved is _ABSENT:
                    del module.forward
                else:
                    module.forward = saved
        return undo

    def _forward(self, role, module, original, args, kwargs):
        start, stop, batch = self.rows
        if role == "block":
            from diffusers.hooks._helpers import TransformerBlockRegistry
            meta = TransformerBlockRegistry.get(type(module))
            hidden = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        else:
            hidden = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
        if hidden.shape[0] != batch:
            raise RuntimeError(f"fastguide autoguidance: a skipped layer ({type(module).__name__}) got a batch of "
                               f"{hidden.shape[0]} rows, the denoiser call has {batch}; skipping per row needs "
                               f"the layer's batch to be the denoiser's")
        if not self._whole:
            out = original(*args, **kwargs)
            return _map_rows(out, lambda t: torch.cat([t[:start], F.dropout(t[start:stop], p=self.dropout), t[stop:]]))
        # Skipped rows: the module's input (diffusers' skip hooks at dropout 1); the module runs on the others.
        keep = torch.cat([torch.arange(start), torch.arange(stop, batch)]).to(hidden.device)
        if len(keep):
            take = lambda v: _batched(v, batch, lambda t: t.index_select(0, keep.to(t.device)))  # noqa: E731
            out = original(*(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        if role == "block" and meta.return_encoder_hidden_states_index is not None:
            inputs = {meta.return_hidden_states_index: hidden,
                      meta.return_encoder_hidden_states_index:
                          meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)}
            skipped = tuple(inputs[i] for i in range(len(inputs)))
        else:
            skipped = hidden
        if not len(keep):
            return skipped
        return _merge_rows(out, skipped, start, stop)


def _batched(value, batch, fn):
    """fn on every tensor whose dim 0 is the batch, inside dicts / lists too."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, dict):
        return {k: _batched(v, batch, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(_batched(v, batch, fn) for v in value)
    return value


def _map_rows(out, fn):
    return tuple(_map_rows(o, fn) for o in out) if isinstance(out, tuple) else fn(out) if out is not None else None


def _merge_rows(out, skipped, start, stop):
    """The output of the kept rows (all but [start, stop)) with the skipped rows' `skipped` in between."""
    if isinstance(out, tuple):
        return tuple(_merge_rows(o, s, start, stop) for o, s in zip(out, skipped))
    if out is None:
        return None
    return torch.cat([out[:start], skipped[start:stop].to(out.dtype), out[start:]])
