"""An independent dense reference of the VGG16 forward/backward in PyTorch (dropout off).

Always computed in float64: PyTorch's own float32 CPU path differs from float64 by up to ~8%
on the first layers' gradients of this 15-BatchNorm network (measured), so a float32 result is
judged against the float64 reference.
"""

import numpy as np


def _bn_relu(h, p, state, name, train):
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(np.asarray(state[f"{name}.avg_mean"], np.float64))
    var = torch.tensor(np.asarray(state[f"{name}.avg_var"], np.float64))
    h = F.batch_norm(
        h,
        None if train else mean,
        None if train else var,
        p[f"{name}.gamma"],
        p[f"{name}.beta"],
        training=train,
        eps=2e-5,
    )
    return F.relu(h)


def torch_loss_and_grads(model, x, t, train=True):
    """Loss and gradients of ``model``'s parameters for the network written from Chainer's
    config (``VGG16_CONFIG``), not from the model's program: an independent definition."""
    import torch
    import torch.nn.functional as F

    from dask_pconv.models import VGG16_CONFIG

    p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in model.params.items()}
    h = torch.tensor(np.asarray(x, np.float64))
    for block, convs in VGG16_CONFIG:
        for i in range(1, len(convs) + 1):
            h = F.conv2d(h, p[f"block{block}_{i}.conv.W"], padding=1)
            h = _bn_relu(h, p, model.state, f"block{block}_{i}.bn", train)
        h = F.max_pool2d(h, 2, 2)
    h = _bn_relu(h.flatten(1) @ p["fc1.W"].T, p, model.state, "bn_fc1", train)
    h = h @ p["fc2.W"].T
    loss = F.cross_entropy(h, torch.tensor(t))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}
