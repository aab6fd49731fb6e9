"""lit_diffac: state-aligned latent actor-critic for text-to-image diffusion, as Lightning modules."""

__version__ = "0.1.0.dev0"
