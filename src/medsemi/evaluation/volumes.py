"""3D evaluation: sliding-window prediction of a task-prompted network and per-task scoring
(spec versemi.md 4.1-4.5).

Each test volume is segmented with its own task id (the synthetic task is never evaluated); records
carry the task name as ``domain``. The model-selection score ``mean_dice`` is the Dice of one task
(``selection: pancreas``, the original, spec 4.5) or the macro mean over tasks (``selection: mean``);
the macro mean over tasks is always in ``mean_dice_tasks``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medsemi.config import Config
from medsemi.data.volumes.cases import TASK_NAMES, Volume
from medsemi.device import autocast_for
from medsemi.evaluation.evaluate import eval_mode
from medsemi.evaluation.report import OverlayCase, volume_overlay_case
from medsemi.evaluation.sliding3d import sliding_window_predict
from medsemi.metrics import MetricPolicy, aggregate, case_metrics

CLASS_NAME = "foreground"


def evaluate_volume_network(
    net: nn.Module, test_volumes: dict[int, list[Volume]], cfg: Config, options: dict[str, Any],
    policy: MetricPolicy, device: torch.device, surface: bool = False, amp: str = "off", source: str = "",
    overlays: list[tuple[str, OverlayCase]] | None = None,
) -> dict:
    """Aggregate metrics of one network over the test volumes of every task (see the module docstring);
    ``overlays`` (a list) receives ``(task name, one slice of each case)`` for the report's pictures."""
    records = []
    for task, vols in test_volumes.items():
        for vol in vols:
            pred = predict_volume(net, vol.image, task, cfg, options, device, amp)
            records.append(score_case(pred, vol, policy, surface))
            if overlays is not None and vol.label is not None:
                dice = float(records[-1]["metrics"][CLASS_NAME]["dice"])
                overlays.append((TASK_NAMES[vol.task_id], volume_overlay_case(vol.name, vol.image, vol.label,
                                                                              pred, dice)))
    if not records:
        raise ValueError(f"{source}: no test volumes to evaluate")
    agg = aggregate(records)
    agg["mean_dice_tasks"] = agg["mean_dice"]
    sel = options["selection"]
    if sel != "mean":
        agg["mean_dice"] = agg["per_domain"].get(sel, {}).get(CLASS_NAME, {}).get("dice", float("nan"))
    agg["selection"] = sel
    agg["records"] = records
    return agg


def predict_volume(
    net: nn.Module, image: np.ndarray, task: int, cfg: Config, options: dict[str, Any], device: torch.device,
    amp: str = "off",
) -> np.ndarray:
    """Binary mask (uint8, image shape) of one volume queried with ``task`` (spec 4.2; LCC of 4.4).

    A task-prompted network is called as ``net(x, task_ids)``; a plain network that declares
    ``takes_task_ids = False`` (``nets/vnet.SegVNet``) as ``net(x)`` (its one task is the volume's)."""
    prompted = bool(getattr(net, "takes_task_ids", True))  # plain networks declare takes_task_ids = False

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast_for(x.device, amp):
            if not prompted:  # a plain single-task network (e.g. nets/vnet.SegVNet)
                return net(x).float()
            ids = torch.full((x.shape[0],), int(task), dtype=torch.long, device=x.device)
            return net(x, ids).float()

    with eval_mode(net):
        return sliding_window_predict(
            image, predictor, window=int(cfg.data.patch_size), strides=tuple(options["strides"]),
            lcc=bool(options["lcc"]), sw_batch_size=int(options["sw_batch_size"]), device=device,
        )


def score_case(pred: np.ndarray, vol: Volume, policy: Any, surface: bool) -> dict:
    """Metrics record of one case (spec 4.3): Dice, Jaccard, and with ``surface`` HD95/ASD in voxels
    plus ``hd95_mm``/``asd_mm`` when the file stores a spacing."""
    if vol.label is None:
        raise ValueError(f"{vol.name}: test case has no label")
    metrics = ("dice", "jaccard", "hd95", "asd") if surface else ("dice", "jaccard")
    m = case_metrics(pred[None].astype(bool), vol.label[None].astype(bool), (CLASS_NAME,), vol.spacing,
                     policy, metrics)
    return {"domain": TASK_NAMES[vol.task_id], "case": vol.name, "metrics": m}
