"""Extra value-only updates of the critic on cached backbone features, from a replay of recent rollouts.

The PPO minibatches train the critic on each (trajectory, step) pair of a rollout once.  On the toy models that
is too little for the head to learn to read ``x_t``: it settles on a per-prompt average, with the same explained
variance at every step (``benchmarks/critic_replay.py`` measures it).  Value regression on the *cached* features
of the last few iterations' rollouts — no extra backbone pass, only the light head — gives each minibatch
pairs from many prompts, noise draws and policy versions, and the head then learns the state.  This is the
auxiliary value phase of phasic policy gradient (PPG, Cobbe et al. 2021) in its simplest form.

Stored per iteration (``n`` trajectories, ``K`` steps, ``R`` value outputs): the features of every tap
``[n, K, ...]`` as the head reads them after its parameter-free pooling (``ValueHead.compress``: ``patch_size``
average pooling of maps or of a DiT's token grid), in ``storage_dtype``; the pooled prompt embeddings ``[n, P]``,
the value targets ``[n, K, R]`` and the rollout's values ``[n, K, R]`` (for value clipping); on ``device`` (default:
the features').  Older entries' targets are returns of an older policy: slightly off-policy, which is why the
replay is short.

Memory per (image, step) is ``Σ_taps tokens/patch_size² × channels × 2 bytes`` in bf16 (:meth:`CriticReplay.
bytes_per_pair` measures it): at SD3.5-M's shapes (3 taps, 1,024 tokens × 1,536 channels) 9.4 MB unpooled and
0.59 MB with ``patch_size=4`` (an 8×8 token grid, the toy DiT's own resolution); ``tests/test_critic_memory.py``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lit_diffac.losses import value_loss


@dataclass
class ReplayEntry:
    """One iteration's value-regression data (shapes: ``n`` trajectories, ``K`` steps, ``R`` value outputs).

    Attributes:
        features: one ``[n, K, ...]`` tensor per feature tap.
        pooled: ``[n, P]`` pooled prompt embeddings (the head's text condition).
        targets: ``[n, K, R]`` value targets ``G`` (GAE returns of the standardised rewards).
        old_values: ``[n, K, R]`` the rollout's ``V_old`` (the centre of the optional value clipping).
    """

    features: list[torch.Tensor]
    pooled: torch.Tensor
    targets: torch.Tensor
    old_values: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.targets.shape[0] * self.targets.shape[1]


class CriticReplay:
    """The critic's extra value-only passes, and the cached features and value targets they draw from.

    A FIFO of :class:`ReplayEntry`, one per iteration.  Injected into an RL module as ``critic_replay``: after
    each PPO update, :meth:`fit` adds the rollout and takes ``passes`` value-regression passes over pairs drawn
    from the last ``iterations`` iterations (head only, no backbone pass).

    Args:
        iterations: iterations kept (1: only the current rollout).
        passes: value-only passes per iteration, each over as many pairs as one rollout has.
        minibatch_size: pairs per minibatch of those passes (``None``: the module's PPO minibatch size).
        checkpoint: save the replay in checkpoints, so that a resumed run is exact (``False``: smaller
            checkpoints; a resumed run refills the replay and is no longer bit-identical).
        storage_dtype: dtype the features are stored in (``"bfloat16"`` halves the memory of fp32 features;
            the head reads them back in fp32); ``None`` keeps the features' own dtype.
        device: where the entries are kept (``None``: the features' device; ``"cpu"``: host memory, pinned when
            the features come from a GPU, so that GPU memory holds only the minibatch being fitted).
    """

    def __init__(self, iterations: int = 32, passes: int = 2, minibatch_size: int | None = None,
                 checkpoint: bool = True, storage_dtype: str | torch.dtype | None = "bfloat16",
                 device: str | None = None) -> None:
        problems = [f"{name} must be >= 1 (got {value})" for name, value in
                    (("iterations", iterations), ("passes", passes), ("minibatch_size", 1 if minibatch_size is None else minibatch_size))
                    if value < 1]
        if problems:
            raise ValueError("invalid CriticReplay: " + "; ".join(problems))
        self.capacity, self.passes, self.minibatch_size, self.checkpoint = iterations, passes, minibatch_size, checkpoint
        self.storage_dtype = getattr(torch, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
        self.device = torch.device(device) if device is not None else None
        self.entries: deque[ReplayEntry] = deque(maxlen=iterations)
        self.compute_device: torch.device | None = None  # where the fitted minibatches go (the features' device)

    def __len__(self) -> int:
        """Number of stored (trajectory, step) pairs."""
        return sum(e.num_pairs for e in self.entries)

    def state_dict(self) -> dict:
        """The stored entries as plain tensors and lists (checkpoints load it with ``weights_only=True``)."""
        return {"entries": [dict(vars(e)) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the entries with those of :meth:`state_dict` (the newest ``capacity`` of them)."""
        self.entries = deque((ReplayEntry(**entry) for entry in state["entries"]), maxlen=self.capacity)

    def bytes_per_pair(self) -> float:
        """Bytes the newest entry keeps per (trajectory, step) pair: its features, targets and values, and its
        prompt embeddings shared out over the steps."""
        entry = self.entries[-1]
        stored = [*entry.features, entry.pooled, entry.targets, entry.old_values]
        return sum(x.numel() * x.element_size() for x in stored) / entry.num_pairs

    def add(self, features: list[torch.Tensor], pooled: torch.Tensor, targets: torch.Tensor,
            old_values: torch.Tensor) -> None:
        """Append one iteration (dropping the oldest beyond ``capacity``); shapes as in :class:`ReplayEntry`."""
        self.compute_device = targets.device

        def keep(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            x = x.detach().to(device=self.device or x.device, dtype=dtype or x.dtype)
            return x.pin_memory() if x.device.type == "cpu" and targets.device.type == "cuda" else x

        self.entries.append(ReplayEntry(features=[keep(f, self.storage_dtype) for f in features], pooled=keep(pooled),
                                        targets=keep(targets), old_values=keep(old_values)))

    def minibatches(self, num_pairs: int, minibatch_size: int, generator: torch.Generator):
        """Yield ``(features, step_index [M], pooled [M, P], targets [M, R], old_values [M, R])`` minibatches.

        ``num_pairs`` pairs are drawn uniformly without replacement from all stored pairs (all of them when
        ``num_pairs`` is larger), shuffled, and cut into minibatches of ``minibatch_size``.
        """
        sizes = torch.tensor([e.num_pairs for e in self.entries])
        starts = torch.cumsum(sizes, 0) - sizes
        device = self.compute_device or self.entries[-1].targets.device  # loaded entries may sit elsewhere
        order = torch.randperm(int(sizes.sum()), generator=generator, device=generator.device)[:num_pairs].cpu()
        for chunk in order.split(minibatch_size):
            # pairs grouped by entry (oldest first), in drawing order within an entry
            entry_index, by_entry = torch.sort(torch.searchsorted(starts, chunk, right=True) - 1, stable=True)
            local = chunk[by_entry] - starts[entry_index]
            used, counts = torch.unique_consecutive(entry_index, return_counts=True)
            parts = []
            for j, local_j in zip(used.tolist(), local.split(counts.tolist())):
                entry = self.entries[j]
                steps, here = entry.targets.shape[1], entry.targets.device
                i, k = (local_j // steps).to(here), (local_j % steps).to(here)
                parts.append(([f[i, k] for f in entry.features], k, entry.pooled[i], entry.targets[i, k],
                              entry.old_values[i, k]))
            # one transfer and one conversion per tensor (stored features: storage_dtype → float32)
            features = [torch.cat([f.to(device) for f in per_tap]).float() for per_tap in zip(*(p[0] for p in parts))]
            yield (features, *(torch.cat([p[n].to(device) for p in parts]) for n in range(1, 5)))


def fit_critic(value_head: nn.Module, replay: CriticReplay, optimizer: torch.optim.Optimizer, *, passes: int,
               pairs_per_pass: int, minibatch_size: int, timestep_fraction: Callable[[torch.Tensor], torch.Tensor],
               generator: torch.Generator, value_clip_range: float | None = None,
               backward: Callable[[torch.Tensor], None] | None = None,
               clip: Callable[[list[nn.Parameter]], float] | None = None) -> dict[str, float]:
    """``passes`` rounds of value regression on ``pairs_per_pass`` replayed pairs each; returns diagnostics.

    Each minibatch: ``V = value_head(features, t/T, pooled)`` (``compressed=True`` for a head with ``compress``:
    the replay holds its output), loss ``½ mean((V − G)²)`` (clipped around
    ``V_old`` when ``value_clip_range``), one optimiser step.  ``backward`` (default ``loss.backward()``) and
    ``clip`` (gradient clipping returning the norm) let a LightningModule pass its own.

    Returns ``{"loss": last minibatch's value loss, "grad_norm": mean norm before clipping (0 without ``clip``),
    "minibatches": count}``.
    """
    backward = backward or (lambda loss: loss.backward())
    read = {"compressed": True} if hasattr(value_head, "compress") else {}
    loss, norms, steps = torch.zeros(()), [], 0
    for _ in range(passes):
        for features, k, pooled, targets, old_values in replay.minibatches(pairs_per_pass, minibatch_size, generator):
            values = value_head(features, timestep_fraction(k), pooled, **read)
            loss = value_loss(values, targets, old_values, value_clip_range).loss
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            if clip is not None:
                norms.append(clip(list(value_head.parameters())))
            optimizer.step()
            steps += 1
    return {"loss": float(loss.detach()), "grad_norm": sum(norms) / len(norms) if norms else 0.0,
            "minibatches": float(steps)}


def fit_from_rollout(replay: CriticReplay, value_head: nn.Module, optimizer: torch.optim.Optimizer,
                     features: list[torch.Tensor], pooled: torch.Tensor, targets: torch.Tensor,
                     old_values: torch.Tensor, **kwargs) -> dict[str, float]:
    """Add one rollout (features ``[B, K, ...]`` per tap, targets / old values ``[B, K, R]``) to ``replay``, then
    :func:`fit_critic` with ``replay.passes`` passes of ``B·K`` pairs; the entry is dropped again if the fit raises
    (the iteration is rolled back, so is its replay entry).  ``kwargs`` go to :func:`fit_critic`.

    The features are a rollout's (:attr:`~lit_diffac.rollout.Rollout.features`): for a head with ``compress``
    (:class:`~lit_diffac.value_heads.ValueHead`), already its parameter-free pooling, so the replay stores only
    what the head reads.
    """
    replay.add(features, pooled, targets, old_values)
    try:
        return fit_critic(value_head, replay, optimizer, passes=replay.passes,
                          pairs_per_pass=targets.shape[0] * targets.shape[1], **kwargs)
    except Exception:
        replay.entries.pop()
        raise
