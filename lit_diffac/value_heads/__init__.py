"""Value heads: light critics that read the backbone's own features (DESIGN §5)."""

from lit_diffac.value_heads.head import ValueBranch, ValueHead, sinusoidal_embedding
from lit_diffac.value_heads.io import load_value_head, save_value_head

__all__ = ["ValueHead", "ValueBranch", "sinusoidal_embedding", "save_value_head", "load_value_head"]
