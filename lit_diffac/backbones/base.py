"""The backbone contract: a diffusion policy network that is also the critic's feature extractor.

A backbone bundles the trainable denoiser (UNet or DiT) with its frozen companions (text encoder(s),
tokenizer(s), VAE, noise scheduler).  Its :meth:`DiffusionBackbone.forward` returns the denoiser's
prediction **and** the intermediate features the value head reads, captured by forward hooks during that
single pass (DESIGN §5: never a second backbone pass).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import nn

# Loading lives in lit_diffac.backbones.loading; the names below stay importable from here too.
from lit_diffac.backbones.loading import (HUB_ID, TOY_ALIASES, PipelineComponents,  # noqa: F401
                                          hub_has_subfolder, hub_offline, load_component, locate_pipeline,
                                          require_hub, require_local_folder, resolve_pretrained)
from lit_diffac.dtypes import parse_dtype
from lit_diffac.errors import HubUnavailableError, PipelineNotFoundError  # noqa: F401


@dataclass
class PromptEmbeds:
    """Encoded prompts, as the denoiser consumes them.

    Attributes:
        hidden: ``[B, L, D]`` per-token text states (cross-attention / joint-attention input).
        pooled: ``[B, P]`` pooled text embedding (SD3's ``pooled_projections``; read by the value head).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> "PromptEmbeds":
        return PromptEmbeds(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PromptEmbeds)))


@dataclass
class BackboneOutput:
    """One denoiser pass.

    Attributes:
        prediction: ``[B, C, H, W]`` the denoiser's output (ε̂ for DDIM/UNet, v̂ for flow/DiT).
        features: the tapped intermediate activations, one tensor per tap; feature maps
            ``[B, C_i, H_i, W_i]`` (UNet) or image tokens ``[B, N_i, C_i]`` (DiT).
    """

    prediction: torch.Tensor
    features: list[torch.Tensor]


class StopForward(Exception):
    """Raised by a tap hook to end a forward pass once every tap has fired (critic-only passes)."""


class FeatureTaps:
    """Forward hooks that record the outputs of named submodules during a forward pass.

    Hooks record only inside :meth:`recording` (so recomputation under gradient checkpointing, which
    re-runs blocks during backward, does not overwrite anything), as float32.  With ``stop_early`` the
    pass is cut (:class:`StopForward`) as soon as the last tap has fired.
    """

    def __init__(self, root: nn.Module, names: Sequence[str], select) -> None:
        modules = dict(root.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"unknown feature taps {missing}; some valid names: {list(modules)[:12]} …")
        self.names = list(names)
        self._select = select
        self._captured: dict[str, torch.Tensor] = {}
        self._active = False
        self._stop_early = False
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not self._active:
                return
            self._captured[name] = self._select(output).float()
            if self._stop_early and len(self._captured) == len(self.names):
                raise StopForward

        return hook

    @contextlib.contextmanager
    def recording(self, stop_early: bool = False):
        """Record tapped outputs inside the block (optionally ending the pass after the last tap)."""
        self._captured, self._active, self._stop_early = {}, True, stop_early
        try:
            yield
        except StopForward:
            pass
        finally:
            self._active, self._stop_early = False, False

    def pop(self) -> list[torch.Tensor]:
        """The features of the latest pass, in tap order; clears the record."""
        if len(self._captured) != len(self.names):
            raise RuntimeError(f"feature taps {self.names} did not all fire during the forward pass")
        out = [self._captured[n] for n in self.names]
        self._captured = {}
        return out


def to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] → ``[B, 3, H, W]`` in [0, 1] (a grey channel is repeated)."""
    images = (images.float().clamp(-1.0, 1.0) + 1.0) / 2.0
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class DiffusionBackbone(nn.Module, abc.ABC):
    """Base class of UNet and DiT backbones.

    The base ``__init__`` takes in-memory :class:`~lit_diffac.backbones.loading.PipelineComponents`; loading
    them from a folder or hub id is :mod:`lit_diffac.backbones.loading`'s job.  A subclass's first argument,
    ``pretrained``, is a pipeline name (loaded by its layout's loader) or such components (used as they are);
    :meth:`from_components` is that second form spelt out.  Subclasses implement :meth:`_encode`,
    :meth:`_denoise`, :meth:`_vae_decode` and the three ``_tap_*`` hooks that name, select and size features.

    The text encoder(s) and VAE are frozen; ``denoiser`` is the policy network (whole, or a LoRA on it).

    Memory and speed options (shared by every backbone):

    * ``weights_dtype``: dtype of the frozen weights (text encoders, VAE and — with LoRA — the denoiser's
      base weights).  LoRA weights, the value head and all sampler / log-prob maths stay float32.  A full
      fine-tune (``lora_rank=0``) keeps the denoiser in float32.
    * ``autocast_dtype``: mixed precision of the denoiser forward (default: ``weights_dtype`` when that is
      not float32, else off); predictions and features are returned as float32.
    * ``gradient_checkpointing``: recompute the denoiser's blocks in backward (diffusers' own switch).
    * ``vae_decode_batch``: decode at most this many latents at a time (peak memory of reward scoring).
    * ``critic_lora_rank``: a separate critic adapter; see :meth:`forward`.
    * ``resolution``: image size in pixels, a side (square) or ``[height, width]`` (default: the denoiser's
      native size, :func:`native_latent_size`).
    * ``max_cached_prompts``: bound on the prompt-embedding cache (oldest entries are dropped).
    * ``cfg_scale``: classifier-free guidance in rollouts, updates and sampling
      (``prediction = u + cfg_scale · (c − u)``; 1.0 = off, the paper's setting).
    * ``negative_prompt``: the unconditional branch's prompt under classifier-free guidance (``""``: plain CFG);
      see :meth:`encode_negative`.
    """

    #: which sampler family fits this backbone: "ddim" or "flow".
    sampler_family: str = ""

    def __init__(self, components: PipelineComponents, *, feature_taps: Sequence = (), lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = (),
                 weights_dtype: str = "float32",
                 autocast_dtype: str | None = None, gradient_checkpointing: bool = False,
                 vae_decode_batch: int | None = None, critic_lora_rank: int = 0,
                 critic_lora_alpha: float | None = None, resolution: int | Sequence[int] | None = None,
                 max_cached_prompts: int | None = None, cfg_scale: float = 1.0,
                 negative_prompt: str = "") -> None:
        super().__init__()
        from lit_diffac.backbones.lora import DEFAULT_TARGETS, apply_lora

        dtype = parse_dtype(weights_dtype)
        self.autocast_dtype = parse_dtype(autocast_dtype) if autocast_dtype is not None else \
            (dtype if dtype != torch.float32 else None)
        _check_options(lora_rank=lora_rank, critic_lora_rank=critic_lora_rank, dtype=dtype,
                       vae_decode_batch=vae_decode_batch, resolution=resolution,
                       max_cached_prompts=max_cached_prompts, cfg_scale=cfg_scale)
        self.denoiser = components.denoiser
        self.scheduler = components.scheduler
        self.tokenizer = components.tokenizer
        self.text_encoder = _frozen(components.text_encoder, dtype)
        self.vae = _frozen(components.vae, dtype) if components.vae is not None else None
        for name, component in components.extra_text.items():  # e.g. SD3's text_encoder_2 / tokenizer_3
            setattr(self, name, _frozen(component, dtype) if isinstance(component, nn.Module) else component)
        self.lora_rank, self.critic_lora_rank = lora_rank, critic_lora_rank
        targets = tuple(lora_targets) or DEFAULT_TARGETS
        if lora_rank or critic_lora_rank:
            self.denoiser.requires_grad_(False).to(dtype)
        if lora_rank:
            apply_lora(self.denoiser, lora_rank, lora_alpha, targets, adapter_name="policy")
        if critic_lora_rank:
            apply_lora(self.denoiser, critic_lora_rank, critic_lora_alpha, targets, adapter_name="critic")
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.vae_decode_batch = vae_decode_batch
        names = self._tap_names(feature_taps)
        if not names:
            raise ValueError("a backbone needs at least one feature tap for the value head")
        self.taps = FeatureTaps(self.denoiser, names, self._tap_select)
        self._feature_dims = [self._tap_dim(n) for n in names]
        self.max_cached_prompts = max_cached_prompts
        self.cfg_scale = float(cfg_scale)
        self.negative_prompt = negative_prompt
        self._prompt_cache: dict[str, PromptEmbeds] = {}
        scale = self.vae_scale_factor
        if resolution is None:
            self.latent_hw = native_latent_size(self.denoiser.config)
        else:
            height, width = _height_width(resolution)
            if height % scale or width % scale:
                raise ValueError(f"resolution {resolution} must be a multiple of the VAE's downsampling factor {scale}")
            self.latent_hw = (height // scale, width // scale)

    @classmethod
    def from_components(cls, components: PipelineComponents, **options: Any) -> "DiffusionBackbone":
        """Build from in-memory components (toy pretraining, tests): plainly ``cls(components, **options)``.

        Args:
            components: the denoiser, scheduler, tokenizer, text encoder (and VAE, extra text components).
            options: the subclass's other constructor arguments (``feature_taps``, ``lora_rank``, ...).

        Returns:
            a ``cls`` whose :attr:`pretrained` is ``None`` (nothing was loaded).
        """
        return cls(components, **options)

    @abc.abstractmethod
    def _tap_names(self, feature_taps: Sequence) -> list[str]:
        """Submodule names of the requested taps."""

    @abc.abstractmethod
    def _tap_select(self, output) -> torch.Tensor:
        """The feature tensor inside a tapped module's output."""

    @abc.abstractmethod
    def _tap_dim(self, name: str) -> int:
        """Channel width of the features a tap yields."""

    # ---- prompts -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts with the frozen text encoder(s)."""

    def encode_negative(self, count: int) -> PromptEmbeds:
        """``count`` copies of the encoded :attr:`negative_prompt` (the unconditional branch of CFG)."""
        return self.encode_prompts([self.negative_prompt] * count)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode ``prompts`` (frozen text encoders, cached per prompt string).

        Each new prompt is encoded on its own, so its embedding depends on the prompt only: batched matrix
        products can differ in the last bits with the batch's size and content, and a resumed run, whose cache
        starts empty, would otherwise encode some prompts in other batches than an uninterrupted run.
        ``hidden`` keeps the text encoders' dtype (half the memory under bf16 weights); ``pooled`` (also read
        by the value head) is float32.
        """
        prompts = list(prompts)
        for p in sorted({p for p in prompts if p not in self._prompt_cache}):
            embeds = self._encode([p])
            self._prompt_cache[p] = PromptEmbeds(hidden=embeds.hidden, pooled=embeds.pooled.float())
        out = PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])
        if self.max_cached_prompts is not None:
            for key in list(self._prompt_cache)[:max(0, len(self._prompt_cache) - self.max_cached_prompts)]:
                del self._prompt_cache[key]
        return out

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (needed when the text encoder changes)."""
        self._prompt_cache = {}

    # ---- denoising -----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents the denoiser works on."""
        return (self.denoiser.config.in_channels, *self.latent_hw)

    @property
    def latent_size(self) -> int:
        """Side of the (square) latents; a non-square backbone has only :attr:`latent_hw` ``(H, W)``."""
        height, width = self.latent_hw
        if height != width:
            raise ValueError(f"{type(self).__name__} has non-square {height}x{width} latents: read latent_hw")
        return height

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def feature_dims(self) -> list[int]:
        """Channel width of each feature tap, for building a value head."""
        return list(self._feature_dims)

    @property
    def feature_grid(self) -> tuple[int, int] | None:
        """``(rows, columns)`` of the image tokens a tap returns when taps are token sequences ``[B, N, C]``
        (transformers); ``None`` when they are maps ``[B, C, H, W]`` that carry their own grid (UNets)."""
        return None

    @property
    def pooled_dim(self) -> int:
        """Width of :attr:`PromptEmbeds.pooled`."""
        return self.encode_prompts([""]).pooled.shape[-1]

    @abc.abstractmethod
    def _denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The raw denoiser call → prediction ``[B, C, H, W]`` (taps fire inside it)."""

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> BackboneOutput:
        """One denoiser pass on ``latents [B, C, H, W]`` at ``timesteps [B]``, returning features too.

        The prediction and the features are float32.  Without a critic adapter the features come from the
        same pass as the prediction (hooks).  With one (``critic_lora_rank > 0``) a second, partial pass
        with only the critic adapter active (the policy adapter off) yields the features: value gradients
        then reach only the critic adapter and the policy's output is exactly that of the policy adapter.
        It costs a forward up to the last tap (and its backward) per step, whose activations are kept (no
        gradient checkpointing in that pass).
        """
        if not self.critic_lora_rank:
            with self.taps.recording(), self._autocast(latents.device):
                prediction = self._denoise(latents, timesteps, embeds)
            return BackboneOutput(prediction=prediction.float(), features=self.taps.pop())
        from lit_diffac.backbones.lora import active_adapters, adapters_disabled

        # the policy adapter, unless adapters are disabled (the KL reference policy: the base model)
        policy = ["policy"] if self.lora_rank and not adapters_disabled(self.denoiser) else []
        with active_adapters(self.denoiser, policy), self._autocast(latents.device):
            prediction = self._denoise(latents, timesteps, embeds)
        # No gradient checkpointing in the critic pass: a recomputation during backward would run with the
        # adapter active then (the policy's), not the critic's.
        with active_adapters(self.denoiser, ["critic"]), _no_checkpointing(self.denoiser), \
                self.taps.recording(stop_early=True), self._autocast(latents.device):
            self._denoise(latents, timesteps, embeds)
        return BackboneOutput(prediction=prediction.float(), features=self.taps.pop())

    @abc.abstractmethod
    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (``[B, 1 or 3, H, W]``)."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] float32 (no grad; in chunks of ``vae_decode_batch``)."""
        if self.vae is None:  # pixel space: the latent is the image in [-1, 1]
            return to_unit_rgb(latents.float())
        step = self.vae_decode_batch or latents.shape[0]
        return torch.cat([to_unit_rgb(self._vae_decode(chunk.to(self.vae.dtype)).float())
                          for chunk in latents.split(step)])

    def policy_parameters(self) -> list[nn.Parameter]:
        """The parameters the actor optimiser updates (the policy LoRA weights, or the whole denoiser)."""
        return [p for n, p in self.denoiser.named_parameters()
                if (p.requires_grad or ".policy." in n) and ".critic." not in n]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic adapter's weights (empty without ``critic_lora_rank``); the critic optimiser updates them."""
        return [p for n, p in self.denoiser.named_parameters() if ".critic." in n]

    @contextlib.contextmanager
    def reference_policy(self):
        """Within the block the denoiser is the base model (LoRA adapters disabled: the KL reference)."""
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()


@contextlib.contextmanager
def _no_checkpointing(denoiser: nn.Module):
    """Switch diffusers' gradient checkpointing off inside the block (and back on after, if it was on)."""
    was_on = getattr(denoiser, "is_gradient_checkpointing", False)
    if was_on:
        denoiser.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was_on:
            denoiser.enable_gradient_checkpointing()


#: Key of a denoiser config that records a non-square native latent size ``[H, W]`` where ``sample_size`` must be an
#: int (``SD3Transformer2DModel``); the leading underscore keeps diffusers from warning about it when loading.
NATIVE_SIZE_KEY = "_lit_diffac_sample_size"


def native_latent_size(config) -> tuple[int, int]:
    """A denoiser's native latent ``(height, width)``: its config's :data:`NATIVE_SIZE_KEY` if set, else
    ``sample_size`` (an int, square, or ``[H, W]`` as ``UNet2DConditionModel`` accepts)."""
    size = config.get(NATIVE_SIZE_KEY) or config.sample_size
    return _height_width(size)


def _height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` (a side, or ``[height, width]``) as ``(height, width)``."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(v) for v in size)
    if len(size) != 2:
        raise ValueError(f"a size is one side or [height, width], got {list(size)}")
    return size


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` frozen, in eval mode and (if not float32) cast to ``dtype``."""
    module = module.requires_grad_(False).eval()
    return module.to(dtype) if dtype != torch.float32 else module


def _check_options(*, lora_rank: int, critic_lora_rank: int, dtype: torch.dtype, vae_decode_batch: int | None,
                   resolution: int | Sequence[int] | None, max_cached_prompts: int | None, cfg_scale: float) -> None:
    problems = []
    if not cfg_scale >= 1.0:
        problems.append(f"cfg_scale must be >= 1 (1 = no guidance; got {cfg_scale})")
    if lora_rank < 0 or critic_lora_rank < 0:
        problems.append(f"LoRA ranks must be >= 0 (got lora_rank={lora_rank}, critic_lora_rank={critic_lora_rank})")
    if critic_lora_rank and not lora_rank:
        problems.append("critic_lora_rank needs a LoRA policy (lora_rank > 0): the critic adapter sits on frozen "
                        "base weights")
    if dtype != torch.float32 and not lora_rank:
        problems.append(f"weights_dtype={str(dtype).removeprefix('torch.')} needs a LoRA policy (lora_rank > 0): "
                        "a full fine-tune keeps float32 weights (use autocast_dtype for mixed precision)")
    if resolution is not None and not isinstance(resolution, int):
        resolution = list(resolution)
        if len(resolution) != 2:
            problems.append(f"resolution must be one side or [height, width] (got {resolution})")
        resolution = min(resolution, default=0)
    for key, value in (("vae_decode_batch", vae_decode_batch), ("resolution", resolution),
                       ("max_cached_prompts", max_cached_prompts)):
        if value is not None and value < 1:
            problems.append(f"{key} must be >= 1 or None (got {value})")
    if problems:
        raise ValueError("invalid backbone options: " + "; ".join(problems))
