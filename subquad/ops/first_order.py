"""The Triton kernels' backward passes are first order: their launches are not recorded by autograd.

A second backward through one (a gradient penalty: ``create_graph=True``, then a backward of the gradient)
would find no graph behind its gradients and leave the attention term out without a word, or report the
inputs unused. ``first_order`` makes such a backward fail where it starts. Autograd runs a backward with
grad mode on only when ``create_graph`` is set.
"""

from __future__ import annotations

import functools

import torch


def first_order(backward):
    """Decorate an ``autograd.Function``'s ``backward``: raise under ``create_graph=True``."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("subquad's Triton kernels have a first-order backward only (create_graph=True "
                               "asks for a differentiable one): use backend='reference' for higher-order "
                               "gradients")
        return backward(ctx, *grads)

    return checked
