"""hiermem: hierarchical-memory language models over any Hugging Face causal LM."""

__version__ = "0.1.0"

from hiermem.backbones import Backbone, load_backbone  # noqa: E402
from hiermem.errors import HiermemError  # noqa: E402

__all__ = ["Backbone", "HiermemError", "load_backbone", "__version__"]
