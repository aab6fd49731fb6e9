"""Stochastic samplers with log-probabilities: the policy of the denoising MDP (DESIGN §1–§2).

One pure step function per sampler family (`ddim_step_with_logprob`, `flow_sde_step_with_logprob`) and a
thin `Sampler` object per family that reads a diffusers scheduler and indexes per-sample step tables.
"""

from .base import Sampler, StepOutput, gaussian_log_prob, step_window
from .ddim import DDIMSampler, ddim_step_with_logprob, trailing_timesteps
from .flow import FlowSDESampler, flow_sde_step_with_logprob

__all__ = [
    "StepOutput",
    "Sampler",
    "gaussian_log_prob",
    "step_window",
    "ddim_step_with_logprob",
    "trailing_timesteps",
    "DDIMSampler",
    "flow_sde_step_with_logprob",
    "FlowSDESampler",
]
