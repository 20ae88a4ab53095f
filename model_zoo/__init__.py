"""Kiln's model zoo: pure PyTorch model definitions and their registry.

This package imports nothing from the rest of Kiln. Importing it registers every variant.
"""

from model_zoo import performer, unet, vit  # noqa: F401  (registers the forecasters, UNet and ViT variants)
from model_zoo._registry import create_model, is_model, list_models, model_defaults, register_model

__all__ = ["create_model", "is_model", "list_models", "model_defaults", "register_model"]
