"""An independent dense reference of the VGG16 forward/backward in PyTorch (dropout off).

Always computed in float64: PyTorch's own float32 CPU path differs from float64 by up to ~8%
on the first layers' gradients of this 15-BatchNorm network (measured), so a float32 result is
judged against the float64 reference.
"""

import numpy as np


def torch_loss_and_grads(model, x, t, train=True):
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in model.params.items()}
    h = torch.tensor(np.asarray(x, np.float64))
    for kind, name, _ in model.layers:
        if kind == "block":
            h = F.conv2d(h, p[f"{name}.conv.W"], padding=1)
            mean = torch.tensor(np.asarray(model.state[f"{name}.bn.avg_mean"], np.float64))
            var = torch.tensor(np.asarray(model.state[f"{name}.bn.avg_var"], np.float64))
            h = F.batch_norm(
                h,
                None if train else mean,
                None if train else var,
                p[f"{name}.bn.gamma"],
                p[f"{name}.bn.beta"],
                training=train,
                eps=2e-5,
            )
            h = F.relu(h)
        elif kind == "pool":
            h = F.max_pool2d(h, 2, 2)
        elif kind == "fc_bn_relu":
            h = h.flatten(1) @ p["fc1.W"].T
            mean = torch.tensor(np.asarray(model.state["bn_fc1.avg_mean"], np.float64))
            var = torch.tensor(np.asarray(model.state["bn_fc1.avg_var"], np.float64))
            h = F.batch_norm(
                h,
                None if train else mean,
                None if train else var,
                p["bn_fc1.gamma"],
                p["bn_fc1.beta"],
                training=train,
                eps=2e-5,
            )
            h = F.relu(h)
        elif kind == "fc":
            h = h @ p["fc2.W"].T
    loss = F.cross_entropy(h, torch.tensor(t))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}
