"""Per-domain evaluation of networks on cached test/validation splits (spec ust-run.md 1.3).

Prediction runs batched on the device in eval mode (BatchNorm running statistics, so the
batch size does not change results); metrics are computed per image and class by
``medsemi.metrics`` and aggregated per domain, then macro over domains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from medsemi.data.contract import LabelSpec
from medsemi.device import autocast_for
from medsemi.metrics import MetricPolicy, aggregate, case_metrics

FAST_METRICS = ("dice", "jaccard", "smoothed_dice")
FULL_METRICS = ("dice", "jaccard", "hd95", "asd", "smoothed_dice")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put a model in eval mode and restore its previous mode afterwards (teachers train in train mode)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_labels(
    model: nn.Module, images: torch.Tensor, label_spec: LabelSpec, batch_size: int, amp: str = "off"
) -> torch.Tensor:
    """Hard labels for a stack of images, batched, on the images' device."""
    outs = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            with autocast_for(images.device, amp):
                logits = model(images[start : start + batch_size])
            outs.append(label_spec.predict(logits.float()))
    return torch.cat(outs)


def score_predictions(
    pred: torch.Tensor,
    gt: torch.Tensor,
    names: list[str],
    domain: str,
    label_spec: LabelSpec,
    policy: MetricPolicy,
    metrics: tuple[str, ...],
    spacing: tuple[float, ...] | None = None,
) -> list[dict]:
    """One record per image: ``{"domain", "case", "metrics": {class: {metric: value}}}``."""
    pred_bin = label_spec.to_binary(pred).cpu().numpy()
    gt_bin = label_spec.to_binary(gt).cpu().numpy()
    return [
        {
            "domain": domain,
            "case": names[i],
            "metrics": case_metrics(
                pred_bin[i], gt_bin[i], label_spec.foreground_names, spacing, policy, metrics
            ),
        }
        for i in range(len(names))
    ]


def evaluate_networks(
    networks: dict[str, nn.Module],
    splits: dict[str, dict[str, Any]],
    label_spec: LabelSpec,
    policy: MetricPolicy,
    batch_size: int = 8,
    surface: bool = False,
    amp: str = "off",
    selection_metric: str = "dice",
    adapt_images: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Evaluate each network on every domain's cached split; returns ``{role: aggregate result}``.

    ``splits`` maps a domain name to a cached split (``engine.sources.cache_dataset``). With
    ``adapt_images`` (images per domain name), each domain is evaluated with BatchNorm statistics
    re-estimated on its images (``evaluation/adabn.py``; not the papers' protocol).
    """
    from medsemi.evaluation.adabn import adapt_batchnorm

    metrics = FULL_METRICS if surface else FAST_METRICS
    results = {}
    for role, model in networks.items():
        records: list[dict] = []
        for domain, data in splits.items():
            net = model
            if adapt_images and domain in adapt_images:
                net = adapt_batchnorm(model, adapt_images[domain], batch_size)
            pred = predict_labels(net, data["image"], label_spec, batch_size, amp)
            records += score_predictions(pred, data["label"], data["name"], domain, label_spec, policy, metrics)
        result = aggregate(records, dice_key=selection_metric)
        result["records"] = records
        results[role] = result
    return results


def overlay(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, label_spec: LabelSpec) -> np.ndarray:
    """RGB uint8 picture: the image in grey/colour, ground-truth contours green, prediction red."""
    from scipy import ndimage

    img = ((image.float().cpu().numpy() + 1) * 127.5).clip(0, 255)
    img = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = img.transpose(1, 2, 0).astype(np.uint8).copy()
    gt_bin = label_spec.to_binary(label[None])[0].cpu().numpy()
    pr_bin = label_spec.to_binary(pred[None])[0].cpu().numpy()
    for masks, colour in ((gt_bin, (0, 255, 0)), (pr_bin, (255, 0, 0))):
        for m in masks:
            edge = m & ~ndimage.binary_erosion(m)
            rgb[edge] = colour
    return rgb
