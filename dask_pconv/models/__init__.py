"""Models: a network is a :class:`Program` of layer nodes (:mod:`.layers`), a :class:`Model` its
parameters and state, run by one interpreter; VGG16 is a config; :func:`from_torch` converts a
PyTorch module."""

from .layers import (
    AdaptiveAvgPool2d,
    Add,
    ArraySpec,
    AvgPool2d,
    BatchNorm,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    RunMode,
    Upsample,
)
from .model import Model
from .program import INPUT, Node, Program, sequential
from .pytorch import from_torch, to_torch_state_dict
from .resnet import RESNET18_STAGES, ResNet18, resnet18_program
from .unet import UNet, unet_program
from .vgg import VGG16, VGG16_CONFIG, vgg16_program

__all__ = [
    "RESNET18_STAGES",
    "ResNet18",
    "UNet",
    "resnet18_program",
    "unet_program",
    "INPUT",
    "VGG16",
    "VGG16_CONFIG",
    "Add",
    "ArraySpec",
    "BatchNorm",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "Flatten",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Model",
    "Node",
    "Program",
    "ReLU",
    "RunMode",
    "from_torch",
    "sequential",
    "to_torch_state_dict",
    "vgg16_program",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "Concat",
    "Identity",
    "LeakyReLU",
    "Upsample",
]
