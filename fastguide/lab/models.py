"""The lab's three models: the class-conditional diffusion UNet, a noise-conditional classifier
p(y | x_t, t) for classifier guidance, and the evaluation classifier on clean digits.

Configurations are fixed here (the weights files hold tensors only, in safetensors); `WEIGHTS` names
the files that `python -m fastguide.lab train` writes into fastguide/lab/weights/.
"""
import math
import os

import torch
from torch import nn

from . import data

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
WEIGHTS = {
    "unet": "digits_unet.safetensors",              # EMA weights after the full schedule
    "unet_early": "digits_unet_early.safetensors",  # a weaker early checkpoint: accuracy still has room to move
    "noisy_classifier": "noisy_classifier.safetensors",
    "eval_classifier": "eval_classifier.safetensors",
    "ppap_experts": "ppap_experts.safetensors",  # PPAP: small classifiers, one per noise range
    "ppap_single": "ppap_single.safetensors",    # the same small classifier, one for every noise level
}
TRAIN_COMMAND = "python -m fastguide.lab train"

# UNet2DModel at 8x8: two resolutions (8, 4), self-attention at 4x4 and in the mid block (so PAG / SEG-style
# attention guidance applies), 11 class embeddings (10 digits + the null class of condition dropout).
UNET_CONFIG = dict(
    sample_size=data.SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=16, num_class_embeds=data.NUM_CLASSES + 1)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                        prediction_type="epsilon")


def make_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(**UNET_CONFIG)


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding of (float) timesteps 0..999, [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): logits over the 10 digits from a noisy image and its timestep. Small (an MLP on the
    64 pixels and a timestep embedding): differentiable in x_t for classifier guidance, cheap to call."""

    def __init__(self, hidden=256):
        super().__init__()
        n = data.SIZE * data.SIZE
        self.time = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(n, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, data.NUM_CLASSES))

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.body(self.inp(x.flatten(1)) + self.time(timestep_embedding(t)))


class EvalClassifier(nn.Module):
    """The evaluation classifier on clean digits (sklearn pixel scale 0..16): a one-hidden-layer MLP trained
    by scikit-learn (`MLPClassifier`), its weights copied here so evaluation runs in torch. `features`
    (the hidden ReLU activations) are the space of the Fréchet distance."""

    def __init__(self, hidden=64):
        super().__init__()
        self.hidden = nn.Linear(data.SIZE * data.SIZE, hidden)
        self.out = nn.Linear(hidden, data.NUM_CLASSES)

    def features(self, pixels):
        return torch.relu(self.hidden(pixels.flatten(1)))

    def forward(self, pixels):
        return self.out(self.features(pixels))


# PPAP's demonstration: EXPERT_HIDDEN-wide noisy classifiers, one per timestep range (the boundaries below), and
# one of the same size for all timesteps (the single-model baseline PPAP compares against).
PPAP_BOUNDARIES = (0, 250, 550, 1000)
EXPERT_HIDDEN = 96


class MultiExpertClassifier(nn.Module):
    """PPAP's multi-expert guidance model ("Towards Practical Plug-and-Play Diffusion Models", Go et al. 2023):
    expert i classifies the timesteps in [boundaries[i], boundaries[i + 1]); `clf(x_t, t)` routes the call to
    the expert of t. One expert over [0, 1000) is the single-model baseline. The boundaries are a buffer, so
    the weights file says how many experts it holds."""

    def __init__(self, boundaries=PPAP_BOUNDARIES, hidden=EXPERT_HIDDEN):
        super().__init__()
        b = [int(v) for v in boundaries]
        if len(b) < 2 or any(lo >= hi for lo, hi in zip(b, b[1:])):
            raise ValueError(f"MultiExpertClassifier: boundaries must be increasing timesteps (at least 2), got {boundaries!r}")
        self.register_buffer("boundaries", torch.tensor(b, dtype=torch.int64))
        self._inner = b[1:-1]  # routing reads this Python copy: no device sync per call
        self.experts = nn.ModuleList(NoisyClassifier(hidden) for _ in range(len(b) - 1))

    def expert_index(self, t):
        """Which expert serves timestep t (a number or 0-d tensor; the last expert also takes t >= the end)."""
        tv = float(t)  # the pipeline's timestep (a host value in diffusers' schedulers' loops)
        return sum(tv >= b for b in self._inner)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1 or t.stride(0) == 0:  # one timestep (a scalar expanded to [B]: stride 0)
            return self.experts[self.expert_index(t.flatten()[0])](x, t)
        # per-sample timesteps: each row through its expert (rows grouped per expert)
        idx = torch.bucketize(t, self.boundaries[1:-1].to(t.device), right=True)
        out = x.new_empty((x.shape[0], data.NUM_CLASSES))
        for i, expert in enumerate(self.experts):
            rows = (idx == i).nonzero().flatten()
            if rows.numel():
                out[rows] = expert(x[rows], t[rows])
        return out
