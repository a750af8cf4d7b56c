"""Models built from the autodiff layer."""

from .vgg import VGG16, VGG16_CONFIG

__all__ = ["VGG16", "VGG16_CONFIG"]
