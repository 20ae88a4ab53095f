"""Kiln's model zoo: pure PyTorch model definitions and their registry.

This package imports nothing from the rest of Kiln. Importing it registers every variant.
"""

from model_zoo import embedding, performer, unet, vit, xbt  # noqa: F401  (registers the variants)
from model_zoo._registry import create_model, is_model, list_models, model_defaults, register_model

__all__ = ["create_model", "is_model", "list_models", "model_defaults", "register_model"]
