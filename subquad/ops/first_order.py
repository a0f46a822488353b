"""The Triton kernels' backward passes are first order: their launches are not recorded by autograd.

A second backward through one (a gradient penalty: ``create_graph=True``, then a backward of the gradient)
would find no graph behind its gradients and leave the attention term out without a word, or report the
inputs unused. ``first_order`` makes such a backward fail where it starts: with grad mode on (autograd sets
it only under ``create_graph``) and a gradient that itself requires grad, PyTorch's ``once_differentiable``
test (a traced joint graph, whose gradients do not, still traces).
"""

from __future__ import annotations

import functools

import torch


def first_order(backward):
    """Decorate an ``autograd.Function``'s ``backward``: raise when asked for a differentiable backward."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled() and any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            raise RuntimeError("subquad's Triton kernels have a first-order backward only (create_graph=True "
                               "asks for a differentiable one): use backend='reference' for higher-order "
                               "gradients")
        return backward(ctx, *grads)

    return checked
