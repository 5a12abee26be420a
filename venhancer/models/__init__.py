"""The VEnhancer denoising network (video UNet + video ControlNet), checkpoint-compatible."""

from .attention import get_attention_backend, set_attention_backend, xformers_available
from .config import UNetConfig
from .controlnet import VideoControlNet
from .inputs import latent_size_ok
from .unet import VEnhancerUNet

__all__ = [
    "UNetConfig",
    "VEnhancerUNet",
    "VideoControlNet",
    "get_attention_backend",
    "latent_size_ok",
    "set_attention_backend",
    "xformers_available",
]
