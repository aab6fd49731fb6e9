"""Validation of an RL module's configuration: every problem in one :class:`~lit_diffac.errors.ConfigError`
(a ``ValueError``; ``lit-diffac`` prints it as one ``error:`` line)."""

from __future__ import annotations

from typing import Any, Sequence

from lit_diffac.errors import ConfigError
from lit_diffac.losses import KL_FORMS


def check_config(module: Any, reward_weights: Sequence[float] | None, critic_replay: Any) -> None:
    """Every problem of a module's configuration in one :class:`~lit_diffac.errors.ConfigError`."""
    hp, backbone, names = module.hparams, module.backbone, [r.name for r in module.rewards]
    problems = [f"{key} must be >= 1 (got {hp[key]})" for key in ("batch_size", "minibatch_size", "num_inner_epochs")
                if hp[key] < 1]
    if not names:
        problems.append("at least one reward is needed")
    if len(set(names)) != len(names):
        problems.append(f"reward names must be unique (they are metric keys), got {names}")
    if reward_weights is not None and len(reward_weights) != len(names):
        problems.append(f"{len(reward_weights)} reward_weights for {len(names)} rewards {names}")
    if not 0.0 < hp.timestep_fraction <= 1.0:
        problems.append(f"timestep_fraction must be in (0, 1] (got {hp.timestep_fraction})")
    if hp.step_selection not in ("random", "advantage"):
        problems.append(f"step_selection must be 'random' or 'advantage' (got {hp.step_selection!r})")
    elif hp.step_selection == "advantage" and not module.estimator.uses_critic:
        problems.append("step_selection='advantage' needs a critic: critic-free advantages are equal at every step "
                        "of a trajectory")
    elif hp.step_selection == "advantage" and hp.timestep_fraction >= 1.0:
        problems.append("step_selection='advantage' keeps the ⌈timestep_fraction · K⌉ steps with the largest |A|; "
                        "at timestep_fraction=1 that is every step: set timestep_fraction < 1")
    problems += [f"{key} must be >= 0 (0 freezes that network; got {hp[key]})"
                 for key in ("actor_lr", "critic_lr") if not hp[key] >= 0]  # `not >=`: NaN fails too
    if not hp.clip_range > 0:
        problems.append(f"clip_range must be > 0 (got {hp.clip_range})")
    if hp.samples_per_prompt < 1 or hp.batch_size % hp.samples_per_prompt:
        problems.append(f"batch_size ({hp.batch_size}) must be a multiple of samples_per_prompt "
                        f"({hp.samples_per_prompt})")
    if getattr(module.estimator, "group_baseline", False) and hp.samples_per_prompt < 2:
        problems.append("the estimator's group_baseline centres advantages on prompt groups: set samples_per_prompt "
                        ">= 2 (with 1, every advantage is 0)")
    if hp.kl_form not in KL_FORMS:
        problems.append(f"kl_form must be one of {KL_FORMS} (got {hp.kl_form!r})")
    if hp.kl_coef < 0:
        problems.append(f"kl_coef must be >= 0 (got {hp.kl_coef})")
    if hp.kl_coef and not backbone.lora_rank:
        problems.append("kl_coef > 0 needs a LoRA policy (lora_rank > 0): the reference policy is the base model "
                        "with the adapter disabled, so no copy of the weights is kept")
    if (hp.value_gradient == "critic_lora") != bool(backbone.critic_lora_rank):
        problems.append("value_gradient='critic_lora' and the backbone's critic_lora_rank > 0 go together "
                        "(set both, or neither)")
    if critic_replay is not None and hp.value_gradient != "detached":
        problems.append("critic_replay needs value_gradient='detached' (cached features carry no backbone graph)")
    if critic_replay is not None and not module.estimator.uses_critic:
        problems.append("critic_replay was given but this estimator uses no critic")
    if problems:
        raise ConfigError(f"invalid {type(module).__name__} config: " + "; ".join(problems))
