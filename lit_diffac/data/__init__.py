"""Prompt sources and datasets."""

from lit_diffac.data.prompts import PromptDataset, PromptSource, load_prompts

__all__ = ["PromptDataset", "PromptSource", "load_prompts"]
