"""ViT models: the Flax modules and the registry of named variants."""

from vit_jax.models.registry import build_model
from vit_jax.models.registry import get_model_config
from vit_jax.models.registry import known_names
from vit_jax.models.vit import count_params
from vit_jax.models.vit import VisionTransformer
