"""Opacus per-sample-gradient rules for our own layers (imported for its side effect).

:class:`~medmeta_common.models.efficientnet.ChannelAffine` (the trainable scale and
shift of a frozen-statistics BatchNorm, ``y = x · w + b`` per channel) has the exact
per-sample gradients ``dL/dw_c = Σ_hw x·g`` and ``dL/db_c = Σ_hw g`` of each sample's
input ``x`` and output gradient ``g``: no other sample enters.

:class:`~medmeta_common.models.heads.CosineClassifier` (``logits = s · ẑ · ŵ_c``, with
``ẑ = z/|z|`` and ``ŵ_c = w_c/|w_c|``) has, for sample ``n`` with output gradient
``g_n``, ``dL/dw_c = s · g_nc · (ẑ_n − ŵ_c (ŵ_c · ẑ_n)) / |w_c|`` (the gradient through
the normalisation of ``w_c``); without this rule Opacus falls back to functorch.

:class:`~medmeta_common.models.encoder.StandardizedConv2d` convolves with standardised
filters ``w_hat = (w - mean(w)) / s`` (``s = sqrt(var(w) + eps)``, per output filter).
Each sample's gradient ``g`` with respect to ``w_hat`` is the usual convolution weight
gradient of that sample (computed for all samples at once as one grouped convolution);
the chain rule through the standardisation then gives, per filter,

    dL/dw = (g - mean(g) - w_hat * mean(g * w_hat)) / s

exactly. Without this rule Opacus falls back to functorch, which is several times
slower. ``tests/test_dp_loss.py`` checks the result against single-record gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler

from medmeta_common.models.efficientnet import ChannelAffine
from medmeta_common.models.encoder import StandardizedConv2d
from medmeta_common.models.heads import CosineClassifier


# Opacus ships no types, so its registering decorator is untyped.
@register_grad_sampler(CosineClassifier)  # type: ignore[untyped-decorator]
def cosine_classifier_grad_sample(
    layer: CosineClassifier, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the cosine classifier's class weights."""
    if not layer.weight.requires_grad:
        return {}
    z = F.normalize(activations[0].to(backprops.dtype), dim=-1)  # (N, D)
    weight = layer.weight.detach().to(backprops.dtype)
    norms = weight.norm(dim=1).clamp(min=1e-12)  # F.normalize's eps
    w_hat = weight / norms[:, None]  # (C, D)
    grad = layer.scale * backprops[:, :, None] * z[:, None, :]  # dL/dŵ per sample: (N, C, D)
    along = (grad * w_hat[None]).sum(dim=-1, keepdim=True)
    return {layer.weight: (grad - along * w_hat[None]) / norms[None, :, None]}


# Opacus ships no types, so its registering decorator is untyped.
@register_grad_sampler(ChannelAffine)  # type: ignore[untyped-decorator]
def channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a per-channel scale and shift (FiLM)."""
    x = activations[0].to(backprops.dtype)
    result: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = (x * backprops).sum(dim=(2, 3))
    if layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=(2, 3))
    return result


# Opacus ships no types, so its registering decorator is untyped.
@register_grad_sampler(StandardizedConv2d)  # type: ignore[untyped-decorator]
def standardized_conv_grad_sample(
    layer: StandardizedConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a weight-standardised convolution (``groups == 1``)."""
    if layer.groups != 1 or isinstance(layer.padding, str):
        raise NotImplementedError("standardised convolutions with groups > 1 or string padding")
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    result: dict[torch.Tensor, torch.Tensor] = {}
    if n == 0:  # an empty Poisson batch: no record, no gradient
        result[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)[:0]
        if layer.bias is not None and layer.bias.requires_grad:
            result[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)[:0]
        return result
    out, size = layer.out_channels, x.shape[2:]
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=(2, 3))
    if not layer.weight.requires_grad:
        return result
    # g: (B, out, in * kh * kw), each sample's gradient w.r.t. the standardised filters,
    # as the weight gradient of one grouped convolution with a group per sample (on CPU
    # about twice as fast as Opacus's unfold-and-multiply for our layer shapes).
    _, g, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * out, *backprops.shape[2:]), x.reshape(1, -1, *size),
        x.new_empty((n * out, layer.in_channels, *layer.kernel_size)), None, layer.stride,
        layer.padding, layer.dilation, False, (0, 0), n, (False, True, False))
    g = g.view(n, out, -1)
    w = layer.weight.detach().reshape(out, -1)
    scale = torch.sqrt(w.var(dim=1, keepdim=True, unbiased=False) + layer.eps)
    w_hat = (w - w.mean(dim=1, keepdim=True)) / scale
    g_proj = torch.einsum("nok,ok->no", g, w_hat).unsqueeze(-1) / w.shape[1]
    # In place: g is ours, and these tensors are the largest the DP step touches.
    g.sub_(g.mean(dim=-1, keepdim=True)).sub_(w_hat * g_proj).div_(scale)
    result[layer.weight] = g.view(n, *layer.weight.shape)
    return result
