"""The method interface: one training step, from batches to named losses.

A method is a small class (in the spirit of USB's algorithms). The engine owns the loop,
optimiser, EMA, AMP, DDP and checkpoints; the method owns only what is specific to the
algorithm. Anything the method keeps across iterations (a queue, a threshold) is a buffer
of the module, so checkpoints carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.losses import seg_loss

SUP_DICE = ("all", "foreground")
"""``sup_dice`` values: Dice over every class (spec 3.3) or over the foreground classes (UA-MT's 3D code)."""

Batch = dict[str, Any]
"""A batch on the device. Labelled: ``image``, ``label``, ``domain``. Unlabelled: ``image``
(weak view), ``strong`` (strong view, same geometry), ``domain``; ``label`` only for
optional diagnostics, never read by a method."""


@dataclass
class MethodOptions:
    """Options common to all methods; each method extends this dataclass."""

    name: str = "supervised"


@dataclass(frozen=True)
class Progress:
    """Where training is: 0-based ``iteration`` out of ``max_iterations``."""

    iteration: int
    max_iterations: int
    epoch_length: int = 500

    @property
    def fraction(self) -> float:
        """Training progress ``t = iter / max_iter`` in [0, 1)."""
        return self.iteration / self.max_iterations

    @property
    def epoch(self) -> int:
        return self.iteration // self.epoch_length


@dataclass
class StepOutput:
    """What a training step returns: the loss to minimise and scalars to log (device tensors)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``Options`` and implement ``train_step``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = False
    uses_peer: ClassVar[bool] = False
    """True: the engine builds a second, independently initialised *trainable* network (``peer``)."""
    spatial_dims: ClassVar[int | None] = 2
    """Spatial dimensions of the data the method is declared for (2: images, 3: volumes, None: any)."""
    single_task: ClassVar[bool] = False
    """True: trains a plain network on one task of a multi-task volume dataset (``data.options.task``)."""
    description: ClassVar[str] = ""
    # smoothed Dice when prediction and ground truth are both empty, in this method's own evaluation code
    # ("ust": 0, "midss": 1/1.001; spec ust-run.md 3.4); ``eval.smoothed_empty_rule: auto`` selects with it
    smoothed_empty_rule: ClassVar[str] = "ust"
    # ``method.preset`` -> {section: {key: value}}: what "paper" (as published) and "released" (as the public
    # code runs) set. Config resolution (config.py) fills every key the user did not write; explicit keys win.
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    def __init__(
        self,
        options: MethodOptions,
        student: nn.Module,
        teacher: nn.Module | None,
        info: DatasetInfo,
        peer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.student = student
        self.teacher = teacher
        self.peer = peer
        self.info = info
        self.generator: torch.Generator | None = None  # set by the engine, saved in checkpoints

    @classmethod
    def wants_teacher(cls, options: MethodOptions) -> bool:
        """Whether the engine builds a teacher network for these options (default: ``uses_teacher``)."""
        return cls.uses_teacher

    def best_suffix(self, progress: Progress) -> str:
        """Suffix of the best-checkpoint names for the model trained up to ``progress`` ("" = ``best_test.pt``);
        a method with stages that the original tracks separately returns e.g. ``"_stage1"``."""
        return ""

    @property
    def label_spec(self) -> LabelSpec:
        return self.info.label_spec

    def train_step(self, labelled: Batch, unlabelled: Batch | None, progress: Progress) -> StepOutput:
        raise NotImplementedError

    def supervised_loss(self, logits: torch.Tensor, label: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, ce, dice)`` of the labelled batch: CE + Dice (spec 3.3); the Dice over the foreground
        classes only where the options say ``sup_dice: foreground`` (the 3D lineage's choice)."""
        dice = getattr(self.options, "sup_dice", "all")
        if dice not in SUP_DICE:
            raise ValueError(f"method.sup_dice must be one of {SUP_DICE}, got {dice!r}")
        return seg_loss(logits, label, None, self.label_spec, skip_background=dice == "foreground")

    def eval_networks(self) -> dict[str, nn.Module]:
        """The networks to evaluate, by role."""
        nets = {"student": self.student}
        if self.teacher is not None:
            nets["teacher"] = self.teacher
        if self.peer is not None:
            nets["peer"] = self.peer
        return nets

    @property
    def teacher_keeps_own_bn_stats(self) -> bool:
        """True when the teacher runs its own train-mode forwards, so its BatchNorm running statistics
        are its own (spec ust-run.md 3.5). A method whose teacher is only an evaluation average (never
        forwarded) returns False, and the engine's EMA update then copies the student's BN buffers:
        otherwise the evaluated teacher would keep the initial statistics (mean 0, variance 1)."""
        return True

    def trainable_parameters(self) -> list[nn.Parameter]:
        nets = [self.student] if self.peer is None else [self.student, self.peer]
        return [p for net in nets for p in net.parameters() if p.requires_grad]

    def compile_blocker(self) -> str | None:
        """Why ``train.compile=true`` cannot work with these options (one sentence), or None."""
        return None

    def uses_unlabelled_at(self, progress: Progress) -> bool:
        """Whether this step reads an unlabelled batch; the engine draws none when False (a staged
        method's labelled-only stage)."""
        return self.uses_unlabelled

    def on_stage_start(self, progress: Progress) -> bool:
        """Called before each step; return True to ask the engine to rebuild the optimiser."""
        return False

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not used
        raise RuntimeError("call train_step, not forward")


def check_method_fits(method_cls: type[Method], dims: int, tasks: tuple[str, ...], data_format: str,
                      available: tuple[str, ...] = ()) -> None:
    """Stop before training when a method does not fit the data: a 2D method on volumes, a 3D method
    on images (``dims`` spatial axes), or a single-task method on data with more than one of ``tasks``
    (choose one with ``data.options.task``). One sentence that names the method and the data kind."""
    kind = {2: "2D image", 3: "3D volume"}.get(dims, f"{dims}D")
    if method_cls.spatial_dims is not None and method_cls.spatial_dims != dims:
        declared = {2: "2D images", 3: "3D volumes"}.get(method_cls.spatial_dims, f"{method_cls.spatial_dims}D")
        twin = f"{method_cls.name}3d" if dims == 3 else method_cls.name.removesuffix("3d")
        hint = f" (use method.name={twin})" if twin in available and twin != method_cls.name else ""
        raise ValueError(f"method {method_cls.name!r} is for {declared} but data.format={data_format} is "
                         f"{kind} data{hint}")
    if method_cls.single_task and len(tasks) > 1:
        raise ValueError(f"method {method_cls.name!r} trains on one task at a time but data.format={data_format} "
                         f"holds the tasks {', '.join(tasks)}; choose one with data.options.task=<name>")
