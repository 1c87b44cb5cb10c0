"""fastguide: fused guidance ops for diffusion samplers (CPU: C++, CUDA: Triton).

    import fastguide
    guided = fastguide.cfg(cond, uncond, 7.5, rescale=0.7)

`python -m fastguide info` lists which backend serves each op.
"""
from .frequency import fdg, frequency_cfg, frequency_split
from .methods import METHODS
from .pipelines import AG, LinearAG, calibrate_linear_ag, disable, enable
from .ops import (GuidanceStats, MomentumBuffer, apg, backends, cfg, cfg_zero_star, cfgpp_ddim_step, cfgpp_euler_step,
                  guidance_stats, pag, rescale)

from ._version import __version__
__all__ = ["AG", "GuidanceStats", "LinearAG", "METHODS", "calibrate_linear_ag", "MomentumBuffer", "apg", "backends", "cfg", "cfg_zero_star", "cfgpp_ddim_step", "cfgpp_euler_step", "disable", "enable", "fdg", "frequency_cfg",
           "frequency_split", "guidance_stats", "pag", "rescale", "__version__"]
