"""The lab's data: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped with sklearn.

Pixels 0..16 map to [-1, 1] (the diffusion model's data range). One fixed stratified split: `train` (the
diffusion model and every classifier learn from it) and `heldout` (300 images: the evaluation
classifier's test set and the real side of the Fréchet distance).
"""
import torch

SIZE = 8          # images are 8x8, one channel
NUM_CLASSES = 10  # digits 0..9; the diffusion model's class 10 is the null (unconditional) label
NULL_CLASS = NUM_CLASSES
HELDOUT = 300
SPLIT_SEED = 0


def to_model(pixels):
    """sklearn pixels (0..16) -> model space [-1, 1]."""
    return pixels / 8.0 - 1.0


def to_pixels(x):
    """model space -> sklearn pixels (0..16), clipped: what the evaluation classifier reads."""
    return (x.clamp(-1, 1) + 1.0) * 8.0


def load(split):
    """(images [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64) of split 'train' or 'heldout'."""
    if split not in ("train", "heldout"):
        raise ValueError(f"fastguide.lab.data.load: split must be 'train' or 'heldout', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_ho, y_tr, y_ho = train_test_split(d.images, d.target, test_size=HELDOUT, stratify=d.target,
                                              random_state=SPLIT_SEED)
    x, y = (x_tr, y_tr) if split == "train" else (x_ho, y_ho)
    images = to_model(torch.tensor(x, dtype=torch.float32)).unsqueeze(1)
    return images, torch.tensor(y, dtype=torch.int64)
