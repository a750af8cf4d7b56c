"""Helpers comparing the shipped networks with their PyTorch definitions
(:mod:`dask_pconv.models.torch_reference`)."""

import numpy as np

from dask_pconv.models.pytorch import torch_name

__all__ = ["load_into", "modules", "torch_loss_and_grads", "torch_name"]


def modules():
    """``(ResNet18, UNet)`` module classes (PyTorch is imported here, not when the tests are
    collected)."""
    from dask_pconv.models.torch_reference import torch_modules

    return torch_modules()


def load_into(module, model):
    """Copy ``model``'s parameters and running statistics into ``module`` (float64)."""
    import torch

    module.double()
    values = {torch_name(k): v for k, v in {**model.params, **model.state}.items()}
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    missing = sorted(set(own) - set(values) - {k for k in own if k.endswith("num_batches_tracked")})
    assert not missing and set(values) <= set(own), (missing, sorted(set(values) - set(own)))
    with torch.no_grad():
        for k, v in values.items():
            own[k].copy_(torch.tensor(np.asarray(v, np.float64)))
    return module


def torch_loss_and_grads(module, x, t):
    """Training-mode loss (mean cross-entropy, per pixel for 4-D logits) and the gradients of
    every parameter, keyed by the module's names."""
    import torch

    module.train()
    module.zero_grad()
    loss = torch.nn.functional.cross_entropy(module(torch.tensor(np.asarray(x, np.float64))), torch.tensor(t))
    loss.backward()
    return loss.item(), {k: p.grad.numpy() for k, p in module.named_parameters()}
