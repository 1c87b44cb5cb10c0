"""fastguide: fused guidance ops for diffusion samplers (CPU: C++, CUDA: Triton).

    import fastguide
    guided = fastguide.cfg(cond, uncond, 7.5, rescale=0.7)

`python -m fastguide info` lists which backend serves each op.
"""
from .ops import backends, cfg, cfg_zero_star, pag

__version__ = "0.1.0"
__all__ = ["backends", "cfg", "cfg_zero_star", "pag", "__version__"]
