"""Per-domain BatchNorm statistics at evaluation (AdaBN; Li et al., "Revisiting Batch Normalization
for Practical Domain Adaptation", arXiv 1603.04779).

Off by default and not the papers' protocol (``eval.bn_adaptation``). When on, each test domain is
evaluated with a copy of the network whose BatchNorm running statistics are re-estimated, in train
mode without gradients, on that domain's *unlabelled training* images; the weights are untouched. On
data whose domain shift is mostly appearance, one set of running statistics cannot fit every domain
(README, "Results"), and this shows what the weights themselves have learned.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """A copy of ``model`` in eval mode with BatchNorm statistics re-estimated on ``images``.

    Statistics are the cumulative average over batches of ``batch_size`` (``momentum=None``): the exact
    mean of the images' features, and the mean of the per-batch variances.
    """
    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if isinstance(m, _BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    if norms and len(images):
        adapted.train()
        for start in range(0, len(images), batch_size):
            adapted(images[start : start + batch_size])
    return adapted.eval()


def images_by_domain(cached: dict, domain_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Split a cached dataset (``engine.sources.cache_dataset``) into images per domain name."""
    return {
        name: cached["image"][cached["domain"] == index]
        for index, name in enumerate(domain_names)
        if bool((cached["domain"] == index).any())
    }
