"""How advantages are estimated: the one component in which actor-critic, GRPO and DDPO differ (DESIGN §7).

An estimator maps standardised rewards and the rollout's values to per-step advantages (one column per
reward, before weighting) and value targets.  :class:`CriticGAE` is the paper's: GAE over the denoising
steps with the learned critic.  :class:`GroupRelative` and :class:`PerPromptStats` are the critic-free
baselines, with the statistics of flow_grpo and ddpo-pytorch (docs/baselines.md).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from lit_diffac.advantages import clip_advantages, compute_gae, terminal_rewards, whiten

#: ``Tensor [N, ...] -> Tensor [P·N, ...]``: concatenates a tensor over the ``P`` processes along dim 0, in process
#: order (every process passes the same ``N``); a result flattened further is reshaped back where needed.
GatherFn = Callable[[torch.Tensor], torch.Tensor]


def gather_strings(strings: list[str], gather: GatherFn, device: torch.device | str | None = None) -> list[str]:
    """Concatenate every process's ``strings`` (each process passes the same number) with a tensor ``gather``.

    Each string travels as its UTF-8 bytes, zero-padded to the longest string of any process (two gathers: the
    lengths, then the bytes), so that the result is exactly the strings, in process order.

    Args:
        strings: this process's ``N`` strings.
        gather: see :data:`GatherFn`.
        device: where the tensors are made (the device the processes communicate on, e.g. the rewards').

    Returns:
        The ``P·N`` strings of all processes, process 0's first.
    """
    encoded = [s.encode("utf-8") for s in strings]
    lengths = gather(torch.tensor([len(e) for e in encoded], dtype=torch.long, device=device)).reshape(-1)
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    codes = torch.zeros(len(encoded), width, dtype=torch.uint8)
    for row, e in enumerate(encoded):
        if e:
            codes[row, :len(e)] = torch.frombuffer(bytearray(e), dtype=torch.uint8)
    codes = gather(codes.to(device)).reshape(-1, width).cpu()
    if codes.shape[0] != lengths.numel():
        raise ValueError(f"gather returned {codes.shape[0]} strings for {lengths.numel()} lengths")
    return [bytes(row[:n].tolist()).decode("utf-8") for row, n in zip(codes, lengths.tolist())]


@dataclass
class Advantages:
    """Estimator output.

    Attributes:
        advantages: ``[B, K]`` combined, whitened and clipped advantages used by the policy loss.
        targets: ``[B, K, R]`` value targets (clipped), or ``None`` when there is no critic.
        per_reward: ``[B, K, R]`` per-reward advantages before weighting (for logging; :class:`PerPromptStats`:
            one column, the advantage of the weighted reward).
    """

    advantages: torch.Tensor
    targets: torch.Tensor | None
    per_reward: torch.Tensor


class AdvantageEstimator(abc.ABC):
    """Base class: ``estimator(rewards [B, R], values [B, K, R], prompts, weights [R], gather) → Advantages``.

    Args:
        advantage_clip: clamp of the final advantages (paper: 10).
        reward_normalization: how the module standardises each reward before the estimator sees it:
            ``"running"`` (statistics of every reward seen so far, gathered across processes; stable critic
            targets), ``"batch"`` (this iteration's batch only) or ``"none"`` (raw rewards).
    """

    uses_critic: bool = False
    #: how :meth:`combine` turns per-reward advantages into one: ``"per_reward"`` or ``"combined"`` (see there)
    whitening: str = "per_reward"

    def __init__(self, advantage_clip: float = 10.0, reward_normalization: str = "running") -> None:
        if reward_normalization not in ("running", "batch", "none"):
            raise ValueError("reward_normalization must be 'running', 'batch' or 'none', "
                             f"got {reward_normalization!r}")
        if not advantage_clip > 0:
            raise ValueError(f"advantage_clip must be > 0 (float('inf') for no clip), got {advantage_clip}")
        self.advantage_clip = advantage_clip
        self.reward_normalization = reward_normalization

    @abc.abstractmethod
    def __call__(self, rewards: torch.Tensor, values: torch.Tensor, prompts: list[str], weights: torch.Tensor,
                 gather: GatherFn | None = None) -> Advantages:
        ...

    def combine(self, per_reward: torch.Tensor, weights: torch.Tensor, gather: GatherFn | None) -> torch.Tensor:
        """``[B, K, R]`` per-reward advantages → ``[B, K]``, whitened over the global batch, then clipped.

        ``whitening="per_reward"`` (DESIGN §5): ``A = Σ_i w_i whiten(A_i)``. ``"combined"``:
        ``A = whiten(Σ_i w_i A_i)``. They differ when the rewards' advantages have different spreads; with one
        reward, only by the factor ``w``.
        """
        if self.whitening == "combined":
            combined = whiten((per_reward * weights.to(per_reward)).sum(-1), gather=gather)
        else:
            whitened = torch.stack([whiten(per_reward[..., i], gather=gather)
                                    for i in range(per_reward.shape[-1])], -1)
            combined = (whitened * weights.to(whitened)).sum(-1)
        return clip_advantages(combined, self.advantage_clip)


class CriticGAE(AdvantageEstimator):
    """Actor-critic advantages: per-reward GAE over the K steps with the critic's values (DESIGN §3).

    With γ = λ = 1 (paper) ``A_k = R − V_k`` and the value target is ``R``.

    ``group_baseline=True`` combines the critic with GRPO's groups (use it with ``samples_per_prompt = G > 1``):
    each step's advantage is centred on its prompt group, ``Â_k^i = A_k^i − mean_{j ∈ g(i)} A_k^j`` (with γ = λ = 1:
    ``(R^i − mean_g R) − (V_k^i − mean_g V_k)``). The group mean removes what the critic gets wrong for the prompt
    as a whole — a critic lagging a fast-moving policy — and keeps what it says about this sample's state against
    its group's. A group of one sample gets advantage 0, as in GRPO. The value targets are unchanged.

    Args:
        gamma: discount γ.
        lam: GAE λ.
        advantage_clip: clamp of the whitened, combined advantages (paper: 10).
        target_clip: clamp of the value targets (paper: 5).
        reward_normalization: see :class:`AdvantageEstimator`.
        group_baseline: centre each step's advantages on the prompt group (see above).
        whitening: with several rewards (one value output each), ``"per_reward"`` (default, DESIGN §5) whitens
            each reward's advantages, then weights them: ``A = Σ_i w_i whiten(A_i)``. The effective weight of
            reward i is then ``w_i / std(A_i)``, and ``std(A_i)`` shrinks as its head predicts it better, so a
            reward the critic reads easily from ``x_t`` (the toy brightness: explained variance ≈ 0.99) counts
            many times its weight. ``"combined"`` weights first, then whitens once: ``A = whiten(Σ_i w_i A_i)``,
            the advantage of the weighted reward (the objective of one head on the sum, ``w`` meaning the same
            trade-off), with each head still supplying its reward's baseline.
    """

    uses_critic = True

    def __init__(self, gamma: float = 1.0, lam: float = 1.0, advantage_clip: float = 10.0,
                 target_clip: float = 5.0, reward_normalization: str = "running",
                 group_baseline: bool = False, whitening: str = "per_reward") -> None:
        super().__init__(advantage_clip, reward_normalization)
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
        if whitening not in ("per_reward", "combined"):
            raise ValueError(f"whitening must be 'per_reward' or 'combined', got {whitening!r}")
        self.gamma, self.lam, self.target_clip = gamma, lam, target_clip
        self.group_baseline, self.whitening = group_baseline, whitening

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        num_steps = values.shape[1]
        per_reward, targets = compute_gae(terminal_rewards(rewards, num_steps), values, self.gamma, self.lam)
        if self.group_baseline:
            per_reward = group_centred(per_reward, prompts)
        return Advantages(advantages=self.combine(per_reward, weights, gather),
                          targets=clip_advantages(targets, self.target_clip), per_reward=per_reward)


def group_centred(advantages: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[B, …]`` advantages minus the mean of their prompt group (equal prompt strings), ``A^i − mean_{g(i)} A``;
    a group of one sample gets 0."""
    if len(prompts) != advantages.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {advantages.shape[0]} trajectories")
    out = torch.empty_like(advantages)
    for members in prompt_groups(prompts).values():
        out[members] = advantages[members] - advantages[members].mean(0)
    return out


def prompt_groups(prompts: list[str]) -> dict[str, list[int]]:
    """The indices of each distinct prompt, ``{prompt: [i, …]}``, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    return groups


def group_relative_advantages(rewards: torch.Tensor, prompts: list[str], eps: float = 1e-4,
                              scale: torch.Tensor | None = None) -> torch.Tensor:
    r"""GRPO advantages: standardise each reward within its group of samples for the same prompt.

    .. math:: A_j = (R_j − \operatorname{mean}_{g(j)} R) / (\operatorname{std}_{g(j)} R + ε)

    (population std, as flow_grpo's ``PerPromptStatTracker`` with ``global_std=False``: ``np.std``, ddof 0, ε = 1e-4;
    a group of one sample gets advantage 0).  With ``scale`` the group std is replaced by it (flow_grpo's
    ``global_std=True``: the population std of the whole batch).

    Args:
        rewards: ``[B, R]`` rewards (any affine per-reward normalisation leaves the result unchanged).
        prompts: the ``B`` prompts; equal strings form a group.
        eps: added to the std.
        scale: ``[R]`` std to divide by instead of each group's, or ``None``.

    Returns:
        ``[B, R]`` advantages.
    """
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for members in prompt_groups(prompts).values():
        r = rewards[members].float()
        std = r.std(0, unbiased=False) if scale is None else scale.to(r)
        out[members] = (r - r.mean(0)) / (std + eps)
    return out


class GroupRelative(AdvantageEstimator):
    """GRPO (Flow-GRPO style): no critic; one group-standardised advantage per trajectory, at every step.

    Use with ``samples_per_prompt = G > 1`` on the module so each prompt has a group.

    Args:
        eps: added to the std (flow_grpo: 1e-4).
        std: ``"group"`` — each group's own std (the Flow-GRPO paper, DESIGN §7); ``"global"`` — the population std
            of each reward over the whole batch, gathered across processes (flow_grpo's shipped configs:
            ``config.sample.global_std = True``).  The mean is the group's either way.
        advantage_clip: clamp of the combined advantages.
        reward_normalization: see :class:`AdvantageEstimator` (group standardisation makes it immaterial).
    """

    def __init__(self, eps: float = 1e-4, advantage_clip: float = 10.0, reward_normalization: str = "running",
                 std: str = "group") -> None:
        super().__init__(advantage_clip, reward_normalization)
        if std not in ("group", "global"):
            raise ValueError(f"std must be 'group' or 'global', got {std!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps, self.std = eps, std

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        scale = None
        if self.std == "global":
            pool = (gather(rewards) if gather is not None else rewards).reshape(-1, rewards.shape[-1])
            scale = pool.float().std(0, unbiased=False)
        per_reward = group_relative_advantages(rewards, prompts, scale=scale,
                                               eps=self.eps)[:, None].expand(-1, values.shape[1], -1)
        combined = clip_advantages((per_reward * weights.to(per_reward)).sum(-1), self.advantage_clip)
        return Advantages(advantages=combined, targets=None, per_reward=per_reward)


class PerPromptStatTracker:
    r"""ddpo-pytorch's per-prompt reward statistics (``ddpo_pytorch/stat_tracking.py``), optionally over processes.

    Each prompt keeps its last ``buffer_size`` rewards, across iterations.  An update first adds the batch's
    rewards to their prompts' buffers, then standardises each reward ``r_j`` of prompt ``p``:

    .. math:: A_j = (r_j − m_p) / (s_p + ε), \qquad (m_p, s_p) = \begin{cases}
              \text{mean, std of } p\text{'s buffer} & \text{if it holds} ≥ \text{min\_count rewards} \\
              \text{mean, std of the whole batch} & \text{otherwise} \end{cases}

    (population stds, ε = 1e-6, in float32, as DDPO's ``np.std(...) + 1e-6``).  With ``gather`` the batch is that
    of every process (DDPO's ``accelerator.gather`` of rewards and prompts): all processes add the same rewards in
    the same order, so their buffers stay identical, and each standardises its own samples.

    Args:
        buffer_size: rewards remembered per prompt (ddpo-pytorch: 16 in ``config/base.py``, 32 in ``config/dgx.py``).
        min_count: rewards a prompt needs before its own statistics are used (ddpo-pytorch: 16).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"need 1 <= min_count <= buffer_size, got {min_count}, {buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor, eps: float = 1e-6,
               gather: GatherFn | None = None) -> torch.Tensor:
        """Add the rewards ``[B]`` (of every process, with ``gather``) to the buffers; return this process's
        ``B`` rewards standardised, ``[B]`` float32 on the CPU."""
        if len(prompts) != rewards.shape[0] or rewards.ndim != 1:
            raise ValueError(f"need rewards [B] for B prompts, got {tuple(rewards.shape)} for {len(prompts)} prompts")
        local = rewards.detach().float()
        pool, pool_prompts = local, list(prompts)
        if gather is not None:
            pool_prompts = gather_strings(pool_prompts, gather, device=local.device)
            pool = gather(local).reshape(-1)
            if len(pool_prompts) != pool.numel():
                raise ValueError(f"gather returned {pool.numel()} rewards for {len(pool_prompts)} prompts")
        pool, local = pool.cpu(), local.cpu()
        batch = (pool.mean(), pool.std(unbiased=False))
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for prompt, members in prompt_groups(pool_prompts).items():
            buffer = self.buffers.setdefault(prompt, [])
            buffer.extend(pool[members].tolist())
            del buffer[:-self.buffer_size]
            if len(buffer) < self.min_count:
                stats[prompt] = batch
            else:
                own = torch.tensor(buffer, dtype=torch.float32)
                stats[prompt] = (own.mean(), own.std(unbiased=False))
        mean = torch.stack([stats[p][0] for p in prompts])
        std = torch.stack([stats[p][1] for p in prompts])
        return (local - mean) / (std + eps)

    def state_dict(self) -> dict:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: list(v) for k, v in state["buffers"].items()}


class PerPromptStats(AdvantageEstimator):
    """DDPO as ddpo-pytorch trains it: advantages from per-prompt running statistics of the raw reward, clipped to
    ±5, the same at every step, no critic.

    As in ddpo-pytorch's ``scripts/train.py``, each sample has one scalar reward ``Σ_i w_i r_i`` (the rewards as
    the module passes them: raw with the default ``reward_normalization="none"``); the rewards and prompts of all
    processes are gathered, the :class:`PerPromptStatTracker` updates on all of them, each process takes its own
    samples' standardised rewards as advantages, and they are clipped to ``±advantage_clip`` (DDPO's
    ``adv_clip_max``).  ``per_reward`` of the output has one column, the advantage of the weighted reward.

    Args:
        buffer_size, min_count: see :class:`PerPromptStatTracker`.
        advantage_clip: clamp of the advantages (DDPO: 5).
        reward_normalization: ``"none"`` (default; DDPO's tracker sees raw rewards), or ``"running"`` /
            ``"batch"``: the module standardises each reward before the tracker sees it (the default of
            lit_diffac before issue 16; see :class:`AdvantageEstimator`).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, advantage_clip: float = 5.0,
                 reward_normalization: str = "none") -> None:
        super().__init__(advantage_clip, reward_normalization)
        self.buffer_size, self.min_count = buffer_size, min_count
        self.tracker = PerPromptStatTracker(buffer_size, min_count)

    @property
    def trackers(self) -> list[PerPromptStatTracker]:
        """``[tracker]`` (the checkpoint layout; one tracker: one scalar reward per sample)."""
        return [self.tracker]

    def state_dict(self) -> dict:
        """The tracker's buffers (plain lists, for ``weights_only`` checkpoints) and the rewards they hold."""
        return {"trackers": [self.tracker.state_dict()], "reward_normalization": self.reward_normalization}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output exactly.

        Raises ``ValueError`` when the buffers hold rewards normalised otherwise than this estimator's
        ``reward_normalization``.  A state written before issue 16 (no ``reward_normalization`` entry; one tracker
        per reward, buffers of running-normalised rewards by default) is loaded only when it fits (one tracker and
        ``reward_normalization="running"``); otherwise the buffers start empty, with a warning.
        """
        self.tracker = PerPromptStatTracker(self.buffer_size, self.min_count)
        trackers, saved = state["trackers"], state.get("reward_normalization")
        if saved is None:  # written before issue 16
            if len(trackers) > 1 or (trackers and self.reward_normalization != "running"):
                warnings.warn("the checkpoint's DDPO per-prompt buffers were written by lit_diffac before issue 16 "
                              f"({len(trackers)} per-reward tracker(s) of normalised rewards), which do not fit this "
                              "estimator (one tracker of the weighted reward, reward_normalization="
                              f"{self.reward_normalization!r}); the buffers start empty and refill as training goes on",
                              stacklevel=2)
                return
        elif saved != self.reward_normalization:
            raise ValueError("the checkpoint's DDPO per-prompt buffers hold rewards with reward_normalization="
                             f"{saved!r}, this estimator has {self.reward_normalization!r}: resume with "
                             f"PerPromptStats(reward_normalization={saved!r})")
        if len(trackers) > 1:
            raise ValueError(f"expected at most one tracker, got {len(trackers)}")
        if trackers:
            self.tracker.load_state_dict(trackers[0])

    def __call__(self, rewards, values, prompts, weights, gather=None) -> Advantages:
        reward = (rewards * weights.to(rewards)).sum(-1)  # DDPO: one scalar reward per sample
        advantage = self.tracker.update(prompts, reward, gather=gather).to(rewards.device)  # [B]
        per_reward = advantage[:, None, None].expand(-1, values.shape[1], 1)
        combined = clip_advantages(per_reward[..., 0], self.advantage_clip)
        return Advantages(advantages=combined, targets=None, per_reward=per_reward)
