"""The critic's head: a light attention reader of the backbone's own features (DESIGN §5).

Each tapped feature tensor feeds one *branch*: a linear projection of its tokens, a learnable query token,
AdaLN modulation of the query from the conditioning vector (zero-initialised gates, so a fresh branch is
the identity on its query), QK-normalised attention of the query over the tokens, and a feed-forward block.
Branch outputs are concatenated and an MLP maps them to one value per reward.

* DiT features are image tokens ``[B, N, C]`` and are read as they are (they carry positional embeddings);
  with ``patch_size > 1`` they are first average-pooled ``patch_size × patch_size`` on their 2-D token grid
  (:attr:`ValueHead.token_grid`, which the RL module sets from ``backbone.feature_grid``).
* UNet features are maps ``[B, C, H, W]``: they are average-pooled into ``patch_size × patch_size`` patches,
  flattened into tokens, and given fixed 2-D sin-cos positions.

The pooling (:meth:`ValueHead.compress`) has no parameters, so what the critic replay caches is its output: at
SD3.5-M's shapes (3 taps of 1,024 tokens × 1,536 channels), ``patch_size=4`` stores 3 × 64 × 1,536 bf16 values,
0.59 MB per (image, step) instead of 9.4 MB (``tests/test_critic_memory.py``).

The conditioning vector is an MLP of the sinusoidal embedding of the diffusion time ``t/T`` (the paper's
most important ingredient; ``timestep_conditioning=False`` for the ablation) plus, optionally, a
projection of the pooled prompt embedding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t_frac: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[B]`` diffusion times in [0, 1] → ``[B, dim]`` sin/cos features of ``1000·t`` (DDPM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_frac.device, dtype=torch.float32) / half)
    args = 1000.0 * t_frac.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(height: int, width: int, dim: int, device) -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``[H·W, dim]`` (half the channels per axis)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(axis.reshape(-1, 1) * freqs) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    pos = torch.cat(parts, dim=-1)
    return F.pad(pos, (0, dim - pos.shape[-1]))


def pool_patches(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """Average ``maps [B, C, H, W]`` over ``patch × patch`` patches → ``[B, C, ⌈H/p⌉, ⌈W/p⌉]`` (a side that is not a
    multiple of ``patch``, or smaller than it, is split into as many near-equal windows)."""
    height, width = maps.shape[-2:]
    if height % patch == 0 and width % patch == 0:
        return F.avg_pool2d(maps, patch)
    return F.adaptive_avg_pool2d(maps, (-(-height // patch), -(-width // patch)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class ValueBranch(nn.Module):
    """One tap's reader: a query token attends over the tap's tokens, modulated by the condition."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int, num_heads: int = 4, num_queries: int = 1,
                 token_layers: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"value head width {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.proj = nn.Linear(in_dim, dim)
        # Optional self-attention over the tokens before the read-out, so the query sees tokens that already
        # know about each other (shapes, not just a bag of local features); the condition is added to them.
        self.cond_to_tokens = nn.Linear(cond_dim, dim) if token_layers else None
        self.token_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(token_layers))
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.norm_query = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_ff = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.q_norm = nn.RMSNorm(dim // num_heads)
        self.k_norm = nn.RMSNorm(dim // num_heads)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # AdaLN-Zero: shift/scale/gate for attention and feed-forward, zero-initialised.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def _read(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """QK-normalised multi-head attention of the queries ``h [B, Q, dim]`` over ``tokens [B, N, dim]`` (keys
        ``to_k``, values ``to_v`` of the tokens) → ``[B, Q, dim]``.

        Computed without materialising the per-token normalised keys or values, which is most of the work at
        ``N ≫ Q`` (the result is the textbook form's up to rounding; ``tests/test_value_head.py`` compares them):

        * keys: ``RMSNorm(k)·q̂ = (k·(g ⊙ q̂)) / rms(k)`` with the norm's gain ``g``, so the scores are a product of
          the raw keys with the gain-weighted queries, divided by each key's RMS;
        * values: the softmax weights of a query sum to 1, so ``Σ_j a_j (W_v y_j + b_v) = W_v (Σ_j a_j y_j) + b_v``:
          the tokens are averaged first and projected once per query.
        """
        batch, tokens_n, dim = tokens.shape
        heads, queries = self.num_heads, h.shape[1]
        head_dim = dim // heads
        q = self.q_norm(self.to_q(h).view(batch, queries, heads, head_dim))  # [B, Q, H, d]
        if self.k_norm.weight is not None:
            q = q * self.k_norm.weight
        k = self.to_k(tokens).view(batch, tokens_n, heads, head_dim)  # [B, N, H, d]
        eps = self.k_norm.eps if self.k_norm.eps is not None else torch.finfo(k.dtype).eps
        inv_rms = torch.rsqrt(k.square().mean(-1) + eps)  # [B, N, H]
        # block-diagonal queries [B, H·d, H·Q]: one matrix product gives every head's raw scores [B, N, H·Q]
        eye = torch.eye(heads, device=q.device, dtype=q.dtype)
        block = torch.einsum("bqhd,hg->bhdgq", q, eye).reshape(batch, heads * head_dim, heads * queries)
        scores = (k.view(batch, tokens_n, dim) @ block).view(batch, tokens_n, heads, queries)
        weights = torch.softmax(scores * (inv_rms[..., None] * head_dim ** -0.5), dim=1)  # over tokens
        averaged = weights.view(batch, tokens_n, heads * queries).transpose(1, 2) @ tokens  # [B, H·Q, dim]
        w_v = self.to_v.weight.view(heads, head_dim, dim)
        values = torch.einsum("bhqc,hdc->bqhd", averaged.view(batch, heads, queries, dim), w_v)
        return (values + self.to_v.bias.view(heads, head_dim)).reshape(batch, queries, dim)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``tokens [B, N, in_dim]``, ``cond [B, cond_dim]`` → ``[B, num_queries · dim]``."""
        batch = tokens.shape[0]
        kv = self.proj(tokens)
        if self.cond_to_tokens is not None:
            kv = kv + self.cond_to_tokens(cond)[:, None]
            for layer in self.token_layers:
                kv = layer(kv)
        kv = self.norm_tokens(kv)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.ada(cond).chunk(6, dim=-1)
        query = self.query.expand(batch, -1, -1)
        h = modulate(self.norm_query(query), shift_a, scale_a)
        query = query + gate_a[:, None] * self.to_out(self._read(h, kv))
        query = query + gate_f[:, None] * self.ff(modulate(self.norm_ff(query), shift_f, scale_f))
        return query.flatten(1)


class ValueHead(nn.Module):
    """Critic head ``V(features, t, c) → [B, num_outputs]`` (one output per reward).

    Args:
        feature_dims: channel width of each tapped feature (``backbone.feature_dims``).
        text_dim: width of the pooled prompt embedding (``backbone.pooled_dim``).
        num_outputs: number of value outputs ``R`` (one per reward).
        dim: width of the head.
        num_heads: attention heads per branch.
        hidden: width of the output MLP.
        num_queries: learnable query tokens per branch (their outputs are concatenated).
        token_layers: self-attention layers over each tap's tokens before the query read-out (0: none).
        patch_size: features are average-pooled by this factor on their 2-D grid before the read (UNet maps;
            DiT image tokens on :attr:`token_grid`): fewer tokens to read and to cache.
        timestep_conditioning: condition on the diffusion time (turn off only for the ablation).
        text_conditioning: add the pooled prompt embedding to the condition.
        detach_features: stop value gradients at the backbone features (default; DESIGN §5).
        init_from: a value-head file written by :class:`~lit_diffac.modules.ValuePretraining` (or
            :func:`~lit_diffac.value_heads.save_value_head`) to start from; it must match this head's taps,
            width and number of outputs.
    """

    def __init__(
        self,
        feature_dims: Sequence[int],
        text_dim: int,
        num_outputs: int = 1,
        dim: int = 64,
        num_heads: int = 4,
        hidden: int = 128,
        num_queries: int = 1,
        token_layers: int = 0,
        patch_size: int = 1,
        timestep_conditioning: bool = True,
        text_conditioning: bool = True,
        detach_features: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if not feature_dims:
            raise ValueError("ValueHead needs at least one feature tap")
        if num_outputs < 1 or patch_size < 1:
            raise ValueError(f"num_outputs and patch_size must be >= 1, got {num_outputs}, {patch_size}")
        self.num_outputs = num_outputs
        self.patch_size = patch_size
        self.timestep_conditioning = timestep_conditioning
        self.text_conditioning = text_conditioning
        self.detach_features = detach_features
        self.dim = dim
        #: ``(rows, columns)`` of the image tokens that DiT taps return (``backbone.feature_grid``); needed only to
        #: pool tokens (``patch_size > 1``). The RL modules set it.
        self.token_grid: tuple[int, int] | None = None
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_proj = nn.Linear(text_dim, dim)
        self.branches = nn.ModuleList(ValueBranch(c, dim, dim, num_heads, num_queries, token_layers) for c in feature_dims)
        self.out = nn.Sequential(nn.Linear(dim * num_queries * len(feature_dims), hidden), nn.SiLU(), nn.Linear(hidden, num_outputs))
        if init_from is not None:
            from lit_diffac.value_heads.io import load_value_head

            load_value_head(self, init_from)

    def condition(self, t_frac: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The AdaLN conditioning vector ``[B, dim]``."""
        cond = torch.zeros(pooled.shape[0], self.dim, device=pooled.device)
        if self.timestep_conditioning:
            cond = cond + self.time_mlp(sinusoidal_embedding(t_frac, self.dim))
        if self.text_conditioning:
            cond = cond + self.text_proj(pooled.float())
        return cond

    def compress(self, feature: torch.Tensor) -> torch.Tensor:
        """The parameter-free part of reading a tap: ``patch_size`` average pooling (in fp32).

        Maps ``[B, C, H, W]`` → ``[B, C, H/p, W/p]``; tokens ``[B, N, C]`` on a ``token_grid`` of ``(h, w)`` →
        ``[B, (h/p)·(w/p), C]`` (row-major, as the grid); sides that are not multiples of ``p`` round up
        (:func:`pool_patches`).  ``patch_size == 1``: the feature itself.  The critic
        replay stores this, and :meth:`forward` with ``compressed=True`` reads it back.
        """
        if feature.ndim not in (3, 4):
            raise ValueError(f"features must be tokens [B, N, C] or maps [B, C, H, W], got {tuple(feature.shape)}")
        if self.patch_size == 1:
            return feature
        feature = feature.float()
        if feature.ndim == 4:
            return pool_patches(feature, self.patch_size)
        batch, count, channels = feature.shape
        grid = self.token_grid
        if grid is None or grid[0] * grid[1] != count:
            raise ValueError(f"pooling image tokens (patch_size={self.patch_size}) needs their grid: token_grid is "
                             f"{grid}, the tap has {count} tokens (the RL modules set it from backbone.feature_grid)")
        maps = feature.transpose(1, 2).reshape(batch, channels, *grid)
        return pool_patches(maps, self.patch_size).flatten(2).transpose(1, 2)

    def tokens(self, feature: torch.Tensor) -> torch.Tensor:
        """A compressed tap (:meth:`compress`) → fp32 tokens ``[B, N, C]`` (maps flattened, with 2-D positions)."""
        feature = feature.float()
        if feature.ndim == 3:
            return feature
        b, c, h, w = feature.shape
        return feature.flatten(2).transpose(1, 2) + sincos_2d(h, w, c, feature.device)

    def forward(self, features: Sequence[torch.Tensor], t_frac: torch.Tensor, pooled: torch.Tensor,
                compressed: bool = False) -> torch.Tensor:
        """``features`` (one per tap), ``t_frac [B]`` in (0, 1], ``pooled [B, text_dim]`` → ``[B, R]`` fp32.

        ``compressed``: the features are already :meth:`compress`'s output (the critic replay's cache).
        """
        if len(features) != len(self.branches):
            raise ValueError(f"value head built for {len(self.branches)} taps, got {len(features)} features")
        cond = self.condition(t_frac, pooled)
        outs = []
        for branch, feature in zip(self.branches, features):
            feature = feature.detach() if self.detach_features else feature
            outs.append(branch(self.tokens(feature if compressed else self.compress(feature)), cond))
        return self.out(torch.cat(outs, dim=-1)).float()
