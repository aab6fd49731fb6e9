"""Plain-diffusers pipelines for lit_diffac's pixel-space toy models (one CLIP text encoder, no VAE).

No stock diffusers pipeline fits the toy folders (``StableDiffusionPipeline`` needs a VAE to return images;
``StableDiffusion3Pipeline`` needs two CLIP encoders), so ``lit-diffac export`` copies this file into an exported
toy pipeline folder as ``lit_diffac_pipeline.py`` and names it in the folder's ``model_index.json``
(``"_class_name": ["lit_diffac_pipeline", "ToyUNetPipeline"]``).  Plain diffusers then loads and runs it::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("exported/pipeline", trust_remote_code=True)
    image = pipe("a handwritten digit 3", num_inference_steps=10).images[0]   # a 16x16 greyscale PIL image

(``trust_remote_code=True`` is diffusers' switch for pipeline code shipped in a folder.)  The file imports only
torch and diffusers, so it works where lit_diffac is not installed.  Prompts are encoded exactly as lit_diffac's
backbones encode them for the toys (tokens padded to the tokenizer's ``model_max_length``; the UNet reads the last
hidden states, the DiT the last hidden states and the projected pooled output), and ``guidance_scale`` follows
lit_diffac's ``cfg_scale`` (1.0: no guidance, the RL training setting).  Sampling is the folder's scheduler run as a
deterministic ODE by default (DDIM ``eta=0`` for the UNet, the Euler flow step for the DiT); lit_diffac's RL
samplers are the stochastic versions (``eta=1`` / the flow SDE).  Both classes load LoRA weights with
``pipe.load_lora_weights(folder)`` (diffusers' ``unet.``/``transformer.``-prefixed pipeline LoRA format).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor


class _ToyPipeline(DiffusionPipeline):
    """Text-to-image sampling in pixel space (the "latent" is the image in [-1, 1])."""

    denoiser_name = ""

    @property
    def denoiser(self):
        return getattr(self, self.denoiser_name)

    def _token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self._execution_device)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-token states [B, L, D], pooled [B, P])`` of ``prompts``."""
        raise NotImplementedError

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """The denoiser's output (ε for the UNet, the flow velocity for the DiT)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 10, guidance_scale: float = 1.0,
                 negative_prompt: str = "", num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, eta: float = 0.0, output_type: str = "pil",
                 return_dict: bool = True):
        """Images for ``prompt``.

        Args:
            prompt: one prompt or a list.
            num_inference_steps: scheduler steps (lit_diffac's toy recipes train with 10).
            guidance_scale: classifier-free guidance scale (1.0: off; the negative branch uses ``negative_prompt``).
            negative_prompt: the unconditional prompt under guidance.
            num_images_per_prompt: images per prompt.
            height, width: image size in pixels (default: the denoiser's native size: ``sample_size``, a side or
                ``[H, W]``, or the ``_lit_diffac_sample_size`` ``[H, W]`` of a non-square toy DiT).
            generator: torch generator(s) for the initial noise (and DDIM noise when ``eta > 0``).
            latents: initial noise ``[B, C, H, W]`` instead of drawing it.
            eta: DDIM's η (UNet only; 0: deterministic, 1: lit_diffac's RL sampler).
            output_type: ``"pil"``, ``"np"`` (``[B, H, W, C]`` in [0, 1]) or ``"pt"`` (``[B, C, H, W]`` in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self._execution_device
        denoiser = self.denoiser
        hidden, pooled = self.encode_prompt(prompts)
        guided = guidance_scale != 1.0
        if guided:
            neg_hidden, neg_pooled = self.encode_prompt([negative_prompt] * len(prompts))
            hidden = torch.cat([neg_hidden, hidden])
            pooled = torch.cat([neg_pooled, pooled]) if pooled is not None else None
        size = denoiser.config.get("_lit_diffac_sample_size") or denoiser.config.sample_size  # [H, W] or a side
        size_h, size_w = (size, size) if isinstance(size, int) else size
        shape = (len(prompts), denoiser.config.in_channels, height or size_h, width or size_w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=denoiser.dtype)
        latents = latents.to(device=device, dtype=denoiser.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        for t in self.progress_bar(self.scheduler.timesteps):
            sample = torch.cat([latents] * 2) if guided else latents
            if hasattr(self.scheduler, "scale_model_input"):
                sample = self.scheduler.scale_model_input(sample, t)
            prediction = self.predict(sample, t.expand(sample.shape[0]), hidden, pooled)
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ToyUNetPipeline(_ToyPipeline, StableDiffusionLoraLoaderMixin):
    """The toy UNet (``toy-unet``): ``unet/`` (ε-prediction), ``scheduler/`` (DDIM), ``text_encoder/``
    (``CLIPTextModel``), ``tokenizer/``."""

    denoiser_name = "unet"
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    def encode_prompt(self, prompts):
        out = self.text_encoder(self._token_ids(prompts))
        return out.last_hidden_state.to(self.unet.dtype), out.pooler_output

    def predict(self, sample, timestep, hidden, pooled):
        return self.unet(sample, timestep, encoder_hidden_states=hidden).sample


class ToyDiTPipeline(_ToyPipeline, SD3LoraLoaderMixin):
    """The toy DiT (``toy-dit``): ``transformer/`` (``SD3Transformer2DModel``, flow velocity), ``scheduler/``
    (``FlowMatchEulerDiscreteScheduler``), ``text_encoder/`` (``CLIPTextModelWithProjection``), ``tokenizer/``."""

    denoiser_name = "transformer"
    model_cpu_offload_seq = "text_encoder->transformer"
    text_encoder_2 = None  # SD3's LoRA loader also looks for a second CLIP encoder; the toy has one

    def __init__(self, transformer, scheduler, text_encoder, tokenizer) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    def encode_prompt(self, prompts):
        out = self.text_encoder(self._token_ids(prompts))
        dtype = self.transformer.dtype
        return out.last_hidden_state.to(dtype), out.text_embeds.to(dtype)

    def predict(self, sample, timestep, hidden, pooled):
        return self.transformer(hidden_states=sample, encoder_hidden_states=hidden, pooled_projections=pooled,
                                timestep=timestep).sample
