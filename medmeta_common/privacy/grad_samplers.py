"""Opacus per-sample-gradient rules for our own layers (imported for its side effect).

:class:`~medmeta_common.models.encoder.StandardizedConv2d` convolves with standardised
filters ``w_hat = (w - mean(w)) / s`` (``s = sqrt(var(w) + eps)``, per output filter).
Each sample's gradient ``g`` with respect to ``w_hat`` is the usual convolution one
(from unfolded activations and backpropagated gradients, as Opacus computes it for
``nn.Conv2d``); the chain rule through the standardisation then gives, per filter,

    dL/dw = (g - mean(g) - w_hat * mean(g * w_hat)) / s

exactly. Without this rule Opacus falls back to functorch, which is several times
slower. ``tests/test_dp_loss.py`` checks the result against single-record gradients.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d

from medmeta_common.models.encoder import StandardizedConv2d


@register_grad_sampler(StandardizedConv2d)
def standardized_conv_grad_sample(
    layer: StandardizedConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a weight-standardised convolution (``groups == 1``)."""
    if layer.groups != 1:
        raise NotImplementedError("standardised convolutions with groups > 1")
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    result: dict[torch.nn.Parameter, torch.Tensor] = {}
    if n == 0:  # an empty Poisson batch: no record, no gradient
        result[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)[:0]
        if layer.bias is not None and layer.bias.requires_grad:
            result[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)[:0]
        return result
    columns = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                       stride=layer.stride, dilation=layer.dilation)
    grads = backprops.reshape(n, -1, columns.shape[-1])
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = grads.sum(dim=2)
    if not layer.weight.requires_grad:
        return result
    # g: (B, out, in, kh, kw), each sample's gradient w.r.t. the standardised filters.
    g = torch.einsum("noq,npq->nop", grads, columns).view(n, *layer.weight.shape)
    w = layer.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    scale = torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + layer.eps)
    w_hat = ((w - mean) / scale).unsqueeze(0)
    g_mean = g.mean(dim=(2, 3, 4), keepdim=True)
    g_proj = (g * w_hat).mean(dim=(2, 3, 4), keepdim=True)
    result[layer.weight] = (g - g_mean - w_hat * g_proj) / scale.unsqueeze(0)
    return result
