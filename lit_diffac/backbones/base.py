"""The backbone contract: a diffusion policy network that is also the critic's feature extractor.

A backbone bundles the trainable denoiser (UNet or DiT) with its frozen companions (text encoder(s),
tokenizer(s), VAE, noise scheduler).  Its :meth:`DiffusionBackbone.forward` returns the denoiser's
prediction **and** the intermediate features the value head reads, captured by forward hooks during that
single pass (DESIGN §5: never a second backbone pass).
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lit_diffac.errors import HubUnavailableError, PipelineNotFoundError

#: Short names for the embedded toy models shipped inside the package.
TOY_ALIASES = {"toy-unet": "toy-unet", "toy-dit": "toy-dit"}


def resolve_pretrained(name_or_path: str) -> str:
    """Map a toy alias (``"toy-unet"``, ``"toy-dit"``) to its folder; pass anything else through.

    (Whether the rest is a folder or a hub id is :func:`locate_pipeline`'s business.)

    Raises:
        FileNotFoundError: for a toy alias whose weights are missing from the install.
    """
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


def require_local_folder(path: str, subfolder: str) -> None:
    """Clear error when a local pipeline folder lacks a component (hub ids are left to diffusers)."""
    root = Path(path)
    if root.exists() and not (root / subfolder).is_dir():
        raise FileNotFoundError(f"{root} has no '{subfolder}/' folder: expected a diffusers pipeline layout")


#: ``owner/name`` — what a Hugging Face hub id looks like (a local folder that exists always wins).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def locate_pipeline(pretrained: str, subfolders: Sequence[str]) -> tuple[str, bool]:
    """``(folder or hub id, is_local)`` for ``pretrained``: a toy alias, a local folder or a hub id.

    The hub is used only for a name of the form ``owner/name`` that is not an existing local path.  A local
    folder must hold every one of ``subfolders``.

    Raises:
        PipelineNotFoundError: for a path that does not exist (saying where to put the weights).
        FileNotFoundError: for a local folder that lacks one of ``subfolders``.
    """
    path = resolve_pretrained(pretrained)
    local = Path(path).expanduser()
    if local.exists():
        for sub in subfolders:
            require_local_folder(str(local), sub)
        return str(local), True
    if HUB_ID.fullmatch(path) and not path.startswith((".", "/", "~")):
        return path, False
    raise PipelineNotFoundError(
        f"no pipeline folder at {path!r}: put a diffusers pipeline there (sub-folders "
        f"{', '.join(s + '/' for s in subfolders)}; see docs/from_toy_to_sd.md) or name a hub id such as "
        f"'stable-diffusion-v1-5/stable-diffusion-v1-5'")


def require_hub(path: str) -> None:
    """Fail with one line, before any download is tried, when hub id ``path`` is named while the hub is offline."""
    if hub_offline():
        raise HubUnavailableError(
            f"{path!r} is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1): download it "
            f"where the hub is reachable (`hf download {path} --local-dir DIR`) and pass DIR as `pretrained`")


def load_component(cls: Any, path: str, subfolder: str, is_local: bool, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, subfolder=...)``; a hub failure becomes a one-line :class:`PipelineNotFoundError`.

    Only this sub-folder is read (or downloaded), so unused components of a pipeline are never fetched.
    """
    if is_local:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    require_hub(path)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types; all mean "not available"
        name = path.split("/")[-1]
        raise PipelineNotFoundError(
            f"cannot load '{subfolder}/' of hub id {path!r} ({type(err).__name__}; offline, gated or misspelt?): "
            f"download it first, e.g. `hf download {path} --local-dir weights/{name}`, and pass "
            f"pretrained: weights/{name}") from err


def hub_has_subfolder(path: str, name: str, is_local: bool) -> bool:
    """Whether the pipeline has component ``name`` (local: a folder; hub: an entry of ``model_index.json``)."""
    if is_local:
        return (Path(path) / name).is_dir()
    from diffusers import DiffusionPipeline

    require_hub(path)
    try:
        index = DiffusionPipeline.load_config(path)
    except Exception as err:  # noqa: BLE001
        raise PipelineNotFoundError(
            f"cannot read model_index.json of hub id {path!r} ({type(err).__name__}; offline?): download the "
            f"pipeline first (`hf download {path} --local-dir weights/{path.split('/')[-1]}`) and pass that folder"
        ) from err
    return name in index and index[name][0] is not None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (``None`` stays ``None``)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


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

    Subclasses load their components and pass them to ``__init__``; they implement :meth:`_encode`,
    :meth:`_denoise`, :meth:`_vae_decode` and the three ``_tap_*`` hooks that name, select and size features.
    :meth:`from_components` builds one from in-memory components (toy pretraining, tests).

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
    * ``resolution``: image side in pixels (default: the denoiser's native ``sample_size``).
    * ``max_cached_prompts``: bound on the prompt-embedding cache (oldest entries are dropped).
    """

    #: which sampler family fits this backbone: "ddim" or "flow".
    sampler_family: str = ""

    def __init__(self, *, denoiser: nn.Module, scheduler, tokenizer, text_encoder: nn.Module,
                 vae: nn.Module | None = None, feature_taps: Sequence = (), lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = (),
                 extra_text: dict[str, Any] | None = None, weights_dtype: str = "float32",
                 autocast_dtype: str | None = None, gradient_checkpointing: bool = False,
                 vae_decode_batch: int | None = None, critic_lora_rank: int = 0,
                 critic_lora_alpha: float | None = None, resolution: int | None = None,
                 max_cached_prompts: int | None = None) -> None:
        super().__init__()
        from lit_diffac.backbones.lora import DEFAULT_TARGETS, apply_lora

        dtype = parse_dtype(weights_dtype)
        self.autocast_dtype = parse_dtype(autocast_dtype) if autocast_dtype is not None else \
            (dtype if dtype != torch.float32 else None)
        _check_options(lora_rank=lora_rank, critic_lora_rank=critic_lora_rank, dtype=dtype,
                       vae_decode_batch=vae_decode_batch, resolution=resolution,
                       max_cached_prompts=max_cached_prompts)
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.text_encoder = _frozen(text_encoder, dtype)
        self.vae = _frozen(vae, dtype) if vae is not None else None
        for name, component in (extra_text or {}).items():  # e.g. SD3's text_encoder_2 / tokenizer_3
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
        self._prompt_cache: dict[str, PromptEmbeds] = {}
        scale = self.vae_scale_factor
        if resolution is not None and resolution % scale:
            raise ValueError(f"resolution {resolution} must be a multiple of the VAE's downsampling factor {scale}")
        self.latent_size = resolution // scale if resolution is not None else self.denoiser.config.sample_size

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
        """Encode ``prompts`` (frozen text encoders, cached per prompt string).

        ``hidden`` keeps the text encoders' dtype (half the memory under bf16 weights); ``pooled`` (also read
        by the value head) is float32.
        """
        prompts = list(prompts)
        new = sorted({p for p in prompts if p not in self._prompt_cache})
        if new:
            embeds = self._encode(new)
            embeds = PromptEmbeds(hidden=embeds.hidden, pooled=embeds.pooled.float())
            for i, p in enumerate(new):
                self._prompt_cache[p] = embeds[i : i + 1]
        out = PromptEmbeds.cat([self._prompt_cache[p] for p in prompts])
        if self.max_cached_prompts is not None:
            for key in list(self._prompt_cache)[:max(0, len(self._prompt_cache) - self.max_cached_prompts)]:
                del self._prompt_cache[key]
        return out

    def precompute_prompts(self, prompts: Sequence[str], batch_size: int = 64) -> int:
        """Encode and cache ``prompts`` in chunks of ``batch_size`` (e.g. before training); returns the cache size."""
        prompts = list(dict.fromkeys(prompts))
        for start in range(0, len(prompts), batch_size):
            self.encode_prompts(prompts[start:start + batch_size])
        return len(self._prompt_cache)

    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings (needed when the text encoder changes)."""
        self._prompt_cache = {}

    # ---- denoising -----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents the denoiser works on."""
        return (self.denoiser.config.in_channels, self.latent_size, self.latent_size)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 in pixel space)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def feature_dims(self) -> list[int]:
        """Channel width of each feature tap, for building a value head."""
        return list(self._feature_dims)

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


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` frozen, in eval mode and (if not float32) cast to ``dtype``."""
    module = module.requires_grad_(False).eval()
    return module.to(dtype) if dtype != torch.float32 else module


def _check_options(*, lora_rank: int, critic_lora_rank: int, dtype: torch.dtype, vae_decode_batch: int | None,
                   resolution: int | None, max_cached_prompts: int | None) -> None:
    problems = []
    if lora_rank < 0 or critic_lora_rank < 0:
        problems.append(f"LoRA ranks must be >= 0 (got lora_rank={lora_rank}, critic_lora_rank={critic_lora_rank})")
    if critic_lora_rank and not lora_rank:
        problems.append("critic_lora_rank needs a LoRA policy (lora_rank > 0): the critic adapter sits on frozen "
                        "base weights")
    if dtype != torch.float32 and not lora_rank:
        problems.append(f"weights_dtype={str(dtype).removeprefix('torch.')} needs a LoRA policy (lora_rank > 0): "
                        "a full fine-tune keeps float32 weights (use autocast_dtype for mixed precision)")
    for key, value in (("vae_decode_batch", vae_decode_batch), ("resolution", resolution),
                       ("max_cached_prompts", max_cached_prompts)):
        if value is not None and value < 1:
            problems.append(f"{key} must be >= 1 or None (got {value})")
    if problems:
        raise ValueError("invalid backbone options: " + "; ".join(problems))
