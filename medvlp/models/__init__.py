"""Model towers: image encoders (timm 2D, MONAI 2D/3D), the text encoder and the joint model."""

from __future__ import annotations

from medvlp.models.config import ModelConfig
from medvlp.models.image import ImageEncoder, ImageEncoderOutput
from medvlp.models.registry import (
    create_image_encoder,
    list_image_encoders,
    load_image_checkpoint,
    register_image_encoder,
)
from medvlp.models.text import TextEncoder, TextEncoderOutput, default_text_model_path
from medvlp.models.vlm import ImageEmbeddings, MedVLP, TextEmbeddings, VLMOutput, load_model

__all__ = [
    "ImageEmbeddings",
    "ImageEncoder",
    "ImageEncoderOutput",
    "MedVLP",
    "ModelConfig",
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderOutput",
    "VLMOutput",
    "create_image_encoder",
    "default_text_model_path",
    "list_image_encoders",
    "load_image_checkpoint",
    "load_model",
    "register_image_encoder",
]
