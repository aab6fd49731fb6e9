"""The backbone contract: a diffusion policy network that is also the critic's feature extractor.

A backbone bundles the trainable denoiser (UNet or DiT) with its frozen companions (text encoder(s),
tokenizer(s), VAE, noise scheduler).  Its :meth:`DiffusionBackbone.forward` returns the denoiser's
prediction **and** the intermediate features the value head reads, captured by forward hooks during that
single pass (DESIGN §5: never a second backbone pass).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lit_diffac.errors import HubUnavailableError

#: Short names for the embedded toy models shipped inside the package.
TOY_ALIASES = {"toy-unet": "toy-unet", "toy-dit": "toy-dit"}


def resolve_pretrained(name_or_path: str) -> str:
    """Map a toy alias (``"toy-unet"``, ``"toy-dit"``) to its folder; check a folder or hub id; return it.

    Only a name that is neither a toy alias nor an existing folder nor path-like is a Hugging Face Hub id,
    and only then is the network used (by diffusers, after an offline check here).

    Raises:
        FileNotFoundError: for a toy alias whose weights are missing from the install, or a path-like name
            (absolute, ``./``, ``~``, several ``/``) that does not exist.
        HubUnavailableError: for a hub id while the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable.
    """
    if name_or_path not in TOY_ALIASES and not Path(name_or_path).expanduser().exists():
        _check_hub_id(name_or_path)
    if name_or_path in TOY_ALIASES:
        folder = Path(__file__).resolve().parent.parent / "toy" / "assets" / TOY_ALIASES[name_or_path]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the embedded toy model {name_or_path!r} is missing at {folder}; rebuild it with "
                f"`lit-diffac run recipes/toy/pretrain_{name_or_path.split('-')[1]}.yaml`"
            )
        return str(folder)
    return name_or_path


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE``, read now or at hub import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_id(name: str) -> None:
    """Fail clearly for a missing folder, or a hub id while the hub is offline or unreachable."""
    how = ("download it where the hub is reachable (`hf download {name} --local-dir DIR`) and pass DIR as "
           "`pretrained`").format(name=name)
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")
    if looks_like_path:
        raise FileNotFoundError(f"pipeline folder {name!r} does not exist: pass an existing diffusers pipeline "
                                "folder, a Hugging Face Hub id, or toy-unet / toy-dit")
    if hub_offline():
        raise HubUnavailableError(f"{name!r} is not a local folder and the Hugging Face Hub is offline "
                                  f"(HF_HUB_OFFLINE=1): {how}")
    from diffusers import DiffusionPipeline

    try:
        DiffusionPipeline.load_config(name)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubUnavailableError(f"could not fetch {name!r} from the Hugging Face Hub ({first}): check the id "
                                  f"and the connection, or {how}") from err


def require_local_folder(path: str, subfolder: str) -> None:
    """Clear error when a local pipeline folder lacks a component (hub ids are left to diffusers)."""
    root = Path(path)
    if root.exists() and not (root / subfolder).is_dir():
        raise FileNotFoundError(f"{root} has no '{subfolder}/' folder: expected a diffusers pipeline layout")


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


class FeatureTaps:
    """Forward hooks that record the outputs of named submodules during a forward pass."""

    def __init__(self, root: nn.Module, names: Sequence[str], select) -> None:
        modules = dict(root.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"unknown feature taps {missing}; some valid names: {list(modules)[:12]} …")
        self.names = list(names)
        self._select = select
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._captured[name] = self._select(output)

        return hook

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

    Subclasses load their components and pass them to ``__init__``; they implement :meth:`_encode`,
    :meth:`forward`, :meth:`decode` and the three ``_tap_*`` hooks that name, select and size features.
    :meth:`from_components` builds one from in-memory components (toy pretraining, tests).

    The text encoder and VAE are frozen; ``denoiser`` is the policy network (whole, or a LoRA on it).
    """

    #: which sampler family fits this backbone: "ddim" or "flow".
    sampler_family: str = ""

    def __init__(self, *, denoiser: nn.Module, scheduler, tokenizer, text_encoder: nn.Module,
                 vae: nn.Module | None = None, feature_taps: Sequence = (), lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = ()) -> None:
        super().__init__()
        from lit_diffac.backbones.lora import apply_lora

        self.denoiser = denoiser
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        if lora_rank:
            apply_lora(self.denoiser, lora_rank, lora_alpha, lora_targets)
        names = self._tap_names(feature_taps)
        if not names:
            raise ValueError("a backbone needs at least one feature tap for the value head")
        self.taps = FeatureTaps(self.denoiser, names, self._tap_select)
        self._feature_dims = [self._tap_dim(n) for n in names]
        self._prompt_cache: dict[str, PromptEmbeds] = {}

    @classmethod
    def from_components(cls, **components) -> "DiffusionBackbone":
        """Build from in-memory components (same keyword arguments as the base ``__init__``)."""
        obj = cls.__new__(cls)
        DiffusionBackbone.__init__(obj, **components)
        obj.pretrained = None
        return obj

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

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode ``prompts`` (frozen text encoders, cached per prompt string)."""
        prompts = list(prompts)
        new = sorted({p for p in prompts if p not in self._prompt_cache})
        if new:
            embeds = self._encode(new)
            for i, p in enumerate(new):
                self._prompt_cache[p] = embeds[i : i + 1]
        return PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (needed when the text encoder changes)."""
        self._prompt_cache = {}

    # ---- denoising -----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents the denoiser works on."""
        size = self.denoiser.config.sample_size
        return (self.denoiser.config.in_channels, size, size)

    @property
    def feature_dims(self) -> list[int]:
        """Channel width of each feature tap, for building a value head."""
        return list(self._feature_dims)

    @property
    def pooled_dim(self) -> int:
        """Width of :attr:`PromptEmbeds.pooled`."""
        return self.encode_prompts([""]).pooled.shape[-1]

    @abc.abstractmethod
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> BackboneOutput:
        """One denoiser pass on ``latents [B, C, H, W]`` at ``timesteps [B]``, returning features too."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] (no grad)."""

    def policy_parameters(self) -> list[nn.Parameter]:
        """The parameters the actor optimiser updates (LoRA weights, or the whole denoiser)."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]
