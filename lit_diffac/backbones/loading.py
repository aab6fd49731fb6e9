"""Finding and loading diffusers pipeline folders (local folders, hub ids, the embedded toy models).

Separate from the backbone classes: :func:`load_dit_components` and :func:`load_unet_components` return a
pipeline's components as a :class:`PipelineComponents`, which :class:`~lit_diffac.backbones.dit.DiTBackbone`
/ :class:`~lit_diffac.backbones.unet.UNetBackbone` accept as ``pretrained`` in place of a name.

A name is resolved as: a toy alias (``"toy-unet"``, ``"toy-dit"``, ``"toy-pairs-unet"``, ``"toy-pairs-dit"``) →
the folder shipped in the package; an existing local path → that folder (which must hold the needed sub-folders);
a hub id (see :func:`is_hub_id`: ``owner/name`` whose ``owner`` is not a local folder) → the hub (only the needed
sub-folders are downloaded, and never while ``HF_HUB_OFFLINE`` is set); anything else is a local path that
does not exist → :class:`~lit_diffac.errors.PipelineNotFoundError` at once, without touching the network.
Write local folders as ``./weights/NAME`` to make them unmistakable.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lit_diffac.errors import HubUnavailableError, PipelineNotFoundError

__all__ = [
    "HUB_ID",
    "PipelineComponents",
    "TOY_ALIASES",
    "hub_has_subfolder",
    "hub_offline",
    "is_hub_id",
    "load_component",
    "load_dit_components",
    "load_unet_components",
    "locate_pipeline",
    "require_hub",
    "require_local_folder",
    "resolve_pretrained",
]

#: Short names for the embedded toy models shipped inside the package (``toy-pairs-*``: the two-digit task's).
TOY_ALIASES = {"toy-unet": "toy-unet", "toy-dit": "toy-dit", "toy-pairs-unet": "toy-pairs-unet",
               "toy-pairs-dit": "toy-pairs-dit"}

#: ``owner/name`` — what a Hugging Face hub id looks like (a local folder that exists always wins).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

#: Endings of file names: a name ending so is a (missing) local file, never a hub id.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".onnx", ".gguf", ".json", ".yaml",
                 ".yml", ".txt", ".zip", ".tar", ".gz")


def is_hub_id(name: str) -> bool:
    """Whether ``name``, which is neither a toy alias nor an existing local path, names a Hugging Face Hub id.

    The rule: exactly ``owner/name`` (one ``/``; letters, digits, ``_ . -``), not starting with ``.``
    (``./``, ``../``), ``/`` or ``~``, not ending in a file suffix (:data:`FILE_SUFFIXES`), and ``owner`` is
    not a folder here (with a local ``weights/`` folder, ``weights/sd15`` is a missing local folder, not a
    hub id).  Anything else with a path separator is a local path.
    """
    return _hub_shaped(name) and not Path(name.split("/", 1)[0]).is_dir()


def _hub_shaped(name: str) -> bool:
    """``owner/name`` that neither starts like a path (``.``, ``/``, ``~``) nor ends in a file suffix."""
    return (bool(HUB_ID.fullmatch(name)) and not name.startswith((".", "/", "~"))
            and not name.lower().endswith(FILE_SUFFIXES))


def _nearest_folder(path: str) -> str | None:
    """A folder next to missing ``path`` whose name is close to its last part (or the closest toy alias)."""
    parent, name = os.path.split(path.rstrip("/\\"))
    candidates = [] if parent else list(TOY_ALIASES)
    try:
        folder = Path(parent or ".").expanduser()
        candidates += [child.name for child in folder.iterdir() if child.is_dir()]
    except OSError:
        pass
    match = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return os.path.join(parent, match[0]) if match else None


@dataclass
class PipelineComponents:
    """The in-memory components of a diffusion pipeline, as a backbone consumes them.

    Attributes:
        denoiser: the policy network (``UNet2DConditionModel`` or ``SD3Transformer2DModel``).
        scheduler: the noise scheduler (``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler``).
        tokenizer: the (first) CLIP tokenizer.
        text_encoder: the (first) CLIP text encoder.
        vae: the autoencoder; ``None`` in pixel space (the toy models).
        extra_text: further text components by attribute name (SD3: ``text_encoder_2``, ``tokenizer_2`` and,
            with T5, ``text_encoder_3``, ``tokenizer_3``); set on the backbone under those names.
    """

    denoiser: nn.Module
    scheduler: Any
    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module | None = None
    extra_text: dict[str, Any] = field(default_factory=dict)


def resolve_pretrained(name_or_path: str) -> str:
    """Map a toy alias (:data:`TOY_ALIASES`) to its folder; pass anything else through.

    (Whether the rest is a folder or a hub id is :func:`locate_pipeline`'s business.)

    Returns:
        the toy model's folder for an alias, else ``name_or_path`` unchanged.

    Raises:
        FileNotFoundError: for a toy alias whose weights are missing from the install.
    """
    if name_or_path in TOY_ALIASES:
        folder = Path(__file__).resolve().parent.parent / "toy" / "assets" / TOY_ALIASES[name_or_path]
        if not folder.is_dir():
            task, family = ("toy_pairs", name_or_path.split("-")[2]) if name_or_path.startswith("toy-pairs-") \
                else ("toy", name_or_path.split("-")[1])
            raise FileNotFoundError(
                f"the embedded toy model {name_or_path!r} is missing at {folder}; rebuild it with "
                f"`lit-diffac run recipes/{task}/pretrain_{family}.yaml`"
            )
        return str(folder)
    return name_or_path


def hub_offline() -> bool:
    """Returns whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE``, now or at hub import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def require_local_folder(path: str, subfolder: str) -> None:
    """Returns nothing; a clear error when local pipeline folder ``path`` lacks ``subfolder`` (hub ids pass).

    Raises:
        FileNotFoundError: ``path`` exists but has no ``subfolder/``.
    """
    root = Path(path)
    if root.exists() and not (root / subfolder).is_dir():
        raise FileNotFoundError(f"{root} has no '{subfolder}/' folder: expected a diffusers pipeline layout")


def locate_pipeline(pretrained: str, subfolders: Sequence[str]) -> tuple[str, bool]:
    """Find ``pretrained``: a toy alias, a local folder or a hub id.

    The hub is used only for a hub id (:func:`is_hub_id`: ``owner/name`` that is not an existing local path
    and whose ``owner`` is not a local folder); any other missing path fails at once.  A local folder must
    hold every one of ``subfolders``.

    Returns:
        ``(folder or hub id, is_local)``.

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
    if is_hub_id(path):
        return path, False
    notes = []
    if _hub_shaped(path):  # owner/name, but ./owner/ exists
        notes.append(f"a local path, not a hub id, as the folder '{path.split('/', 1)[0]}/' exists here")
    nearest = _nearest_folder(path)
    if nearest is not None:
        notes.append(f"did you mean {nearest!r}?")
    detail = f" ({'; '.join(notes)})" if notes else ""
    raise PipelineNotFoundError(
        f"no pipeline folder at {path!r}{detail}: put a diffusers pipeline there (sub-folders "
        f"{', '.join(s + '/' for s in subfolders)}; see docs/from_toy_to_sd.md) or name a hub id such as "
        f"'stable-diffusion-v1-5/stable-diffusion-v1-5'")


def require_hub(path: str) -> None:
    """Returns nothing; fails with one line, before any download is tried, when hub id ``path`` is named while
    the hub is offline.

    Raises:
        HubUnavailableError: the hub is offline (``HF_HUB_OFFLINE``).
    """
    if hub_offline():
        raise HubUnavailableError(
            f"no local folder {path!r}, so it was tried as a Hugging Face Hub id, but the hub is offline "
            f"(HF_HUB_OFFLINE=1) and offline use needs a local folder: download it where the hub is "
            f"reachable (`hf download {path} --local-dir DIR`) and pass DIR as `pretrained` (e.g. "
            f"./weights/{path.split('/')[-1]})")


def load_component(cls: Any, path: str, subfolder: str, is_local: bool, **kwargs: Any) -> Any:
    """Load one component: ``cls.from_pretrained(path, subfolder=subfolder, **kwargs)``.

    Only this sub-folder is read (or downloaded), so unused components of a pipeline are never fetched.

    Returns:
        the loaded component (an instance of ``cls``).

    Raises:
        HubUnavailableError: ``path`` is a hub id and the hub is offline.
        PipelineNotFoundError: loading from the hub failed (one line, with the download command).
    """
    if is_local:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    require_hub(path)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types; all mean "not available"
        raise _hub_failure(f"cannot load '{subfolder}/'", path, err) from err


def hub_has_subfolder(path: str, name: str, is_local: bool) -> bool:
    """Returns whether the pipeline has component ``name`` (local: a folder; hub: a ``model_index.json`` entry).

    Raises:
        HubUnavailableError: ``path`` is a hub id and the hub is offline.
        PipelineNotFoundError: the hub's ``model_index.json`` could not be read.
    """
    if is_local:
        return (Path(path) / name).is_dir()
    from diffusers import DiffusionPipeline

    require_hub(path)
    try:
        index = DiffusionPipeline.load_config(path)
    except Exception as err:  # noqa: BLE001
        raise _hub_failure("cannot read model_index.json", path, err) from err
    return name in index and index[name][0] is not None


def _hub_failure(what: str, path: str, err: Exception) -> PipelineNotFoundError:
    """The one-line error for a hub download of ``path`` that failed with ``err`` (``what`` failed)."""
    name = path.split("/")[-1]
    return PipelineNotFoundError(
        f"{what} of hub id {path!r} (no local folder of that name, so the Hugging Face Hub was tried: "
        f"{type(err).__name__}; offline, gated or misspelt?): offline use needs a local folder: download it first, "
        f"e.g. `hf download {path} --local-dir weights/{name}`, and pass pretrained: ./weights/{name}")


def load_dit_components(pretrained: str, use_t5: bool = True) -> PipelineComponents:
    """Load an SD3-layout pipeline (SD3 / SD3.5, or the toy DiT's single-CLIP layout).

    Reads ``transformer/``, ``scheduler/`` (as ``FlowMatchEulerDiscreteScheduler``), ``text_encoder/`` +
    ``tokenizer/`` (CLIP with projection) and, where present, ``vae/``, ``text_encoder_2/`` + ``tokenizer_2/``
    and — only with ``use_t5`` — ``text_encoder_3/`` + ``tokenizer_3/`` (T5; never read without it).

    Args:
        pretrained: a local folder, a hub id, or ``"toy-dit"``.
        use_t5: load the T5 encoder when the pipeline has one.

    Returns:
        the components; ``extra_text`` holds the second CLIP (and T5) encoder and tokenizer of SD3 folders.

    Raises:
        PipelineNotFoundError, HubUnavailableError, FileNotFoundError: see :func:`locate_pipeline`,
        :func:`load_component`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    path, local = locate_pipeline(pretrained, ("transformer", "scheduler", "text_encoder", "tokenizer"))
    has = {name: hub_has_subfolder(path, name, local) for name in ("vae", "text_encoder_2", "text_encoder_3")}
    extra = {}
    if has["text_encoder_2"]:
        extra["text_encoder_2"] = load_component(CLIPTextModelWithProjection, path, "text_encoder_2", local)
        extra["tokenizer_2"] = load_component(CLIPTokenizer, path, "tokenizer_2", local)
        if use_t5 and has["text_encoder_3"]:
            from transformers import T5EncoderModel, T5TokenizerFast

            extra["text_encoder_3"] = load_component(T5EncoderModel, path, "text_encoder_3", local)
            extra["tokenizer_3"] = load_component(T5TokenizerFast, path, "tokenizer_3", local)
    return PipelineComponents(
        denoiser=load_component(SD3Transformer2DModel, path, "transformer", local),
        scheduler=load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", local),
        tokenizer=load_component(CLIPTokenizer, path, "tokenizer", local),
        text_encoder=load_component(CLIPTextModelWithProjection, path, "text_encoder", local),
        vae=load_component(AutoencoderKL, path, "vae", local) if has["vae"] else None,
        extra_text=extra,
    )


def load_unet_components(pretrained: str) -> PipelineComponents:
    """Load an SD1.5-layout pipeline (SD1.5, or the pixel-space toy UNet without ``vae/``).

    Reads ``unet/``, ``scheduler/`` (as a ``DDIMScheduler``, whatever scheduler the folder ships),
    ``text_encoder/`` + ``tokenizer/`` (CLIP) and, where present, ``vae/``.

    Args:
        pretrained: a local folder, a hub id, or ``"toy-unet"``.

    Returns:
        the components (``extra_text`` empty).

    Raises:
        PipelineNotFoundError, HubUnavailableError, FileNotFoundError: see :func:`locate_pipeline`,
        :func:`load_component`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, local = locate_pipeline(pretrained, ("unet", "scheduler", "text_encoder", "tokenizer"))
    vae = load_component(AutoencoderKL, path, "vae", local) if hub_has_subfolder(path, "vae", local) else None
    return PipelineComponents(
        denoiser=load_component(UNet2DConditionModel, path, "unet", local),
        scheduler=load_component(DDIMScheduler, path, "scheduler", local),
        tokenizer=load_component(CLIPTokenizer, path, "tokenizer", local),
        text_encoder=load_component(CLIPTextModel, path, "text_encoder", local),
        vae=vae,
    )
