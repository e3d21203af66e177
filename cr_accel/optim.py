"""Built-in optimizers. Each builder receives the parameters, `lr` and `weight_decay` from the trainer."""

import torch

from .registry import Registry

OPTIMIZERS = Registry("optimizer")

# Passed by the trainer from optimizer.lr / optimizer.weight_decay; never free kwargs.
INJECTED = ("params", "lr", "weight_decay")


@OPTIMIZERS.register("adamw")
def adamw(params, lr, weight_decay, betas=(0.9, 0.999), eps: float = 1e-8):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("adam")
def adam(params, lr, weight_decay, betas=(0.9, 0.999), eps: float = 1e-8):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("sgd")
def sgd(params, lr, weight_decay, momentum: float = 0.9, nesterov: bool = False):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
