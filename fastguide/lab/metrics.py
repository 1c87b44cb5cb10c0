"""Sample metrics of the lab: class accuracy under the evaluation classifier, Fréchet distance to held-out
real digits in that classifier's feature space, saturation (pixels outside the data range before
clipping) and contrast."""
from dataclasses import dataclass

import torch

from . import data


def frechet_distance(f1, f2):
    """Fréchet distance between Gaussians fitted to feature sets [N1, D] and [N2, D] (float64):
    |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the square roots by symmetric eigendecomposition
    (exact for PSD matrices; tiny negative eigenvalues from rounding are clipped to 0)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


@dataclass
class Scores:
    accuracy: float        # fraction of samples the evaluation classifier labels as the requested digit
    fd: float              # Fréchet distance to the held-out digits (evaluation-classifier features)
    out_of_range: float    # fraction of pixels outside [-1, 1] before clipping (saturation)
    contrast: float        # mean per-image std of the clipped pixels, in [0, 1] units
    n: int


class Evaluator:
    """Scores samples (model space, [N, 1, 8, 8], unclipped) against their requested labels."""

    def __init__(self, classifier):
        self.classifier = classifier.eval()
        real, _ = data.load("heldout")
        with torch.no_grad():
            self.real_features = classifier.features(data.to_pixels(real))

    @torch.no_grad()
    def __call__(self, x, labels):
        labels = torch.as_tensor(labels).flatten()
        if len(labels) != len(x):
            raise ValueError(f"Evaluator: {len(x)} samples but {len(labels)} labels")
        pixels = data.to_pixels(x.float())
        logits = self.classifier(pixels)
        guided = labels < data.NUM_CLASSES  # the null class has no target digit
        acc = (logits.argmax(1)[guided] == labels[guided]).float().mean().item() if guided.any() else float("nan")
        return Scores(accuracy=acc, fd=frechet_distance(self.classifier.features(pixels), self.real_features),
                      out_of_range=(x.abs() > 1).float().mean().item(),
                      contrast=((x.clamp(-1, 1) + 1) / 2).flatten(1).std(1).mean().item(), n=len(x))

    @torch.no_grad()
    def class_histogram(self, x):
        """How often the evaluation classifier predicts each digit: [10] fractions (null-class samples)."""
        pred = self.classifier(data.to_pixels(x.float())).argmax(1)
        return torch.bincount(pred, minlength=data.NUM_CLASSES).float() / len(pred)
