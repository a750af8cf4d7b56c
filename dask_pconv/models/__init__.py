"""Models: a network is a :class:`Program` of layer nodes (:mod:`.layers`), a :class:`Model` its
parameters and state, run by one interpreter; VGG16 is a config; :func:`from_torch` converts a
PyTorch module."""

from .layers import (
    Add,
    ArraySpec,
    BatchNorm,
    Conv2d,
    Dropout,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    RunMode,
)
from .model import Model
from .program import INPUT, Node, Program, sequential
from .pytorch import from_torch, to_torch_state_dict
from .vgg import VGG16, VGG16_CONFIG, vgg16_program

__all__ = [
    "INPUT",
    "VGG16",
    "VGG16_CONFIG",
    "Add",
    "ArraySpec",
    "BatchNorm",
    "Conv2d",
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
]
