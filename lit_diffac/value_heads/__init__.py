"""Value heads: light critics that read the backbone's own features (DESIGN §5)."""

from lit_diffac.value_heads.head import ValueBranch, ValueHead, sinusoidal_embedding

__all__ = ["ValueHead", "ValueBranch", "sinusoidal_embedding"]
