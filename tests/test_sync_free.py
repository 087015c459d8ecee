"""Every 2D method's whole training step runs without a host synchronisation (issue 13).

On the ``meta`` device tensors have shapes but no data, so anything that needs a value on the host
(``.item()``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing, indexing with a 0-dim tensor,
data-dependent shapes, ``.cpu()``/``.tolist()``) raises. The step is run as the engine runs it: method
step, backward, SGD with momentum, EMA teacher update. A dispatch mode also rejects copies from host
memory into the step (on a GPU a blocking host-to-device copy waits for the device too), so random
draws must come from the method's generator on the device. This is the CPU counterpart of
``torch.cuda.set_sync_debug_mode("error")`` in benchmarks/train_speed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.engine.ema import ema_update
from medsemi.methods.base import Progress
from medsemi.methods.registry import get_method
from medsemi.nets.unet2d import UNet2D
from medsemi.schedules import ema_alpha

META = torch.device("meta")
P = 32


class MetaGenerator(torch.Generator):
    """A generator that reports the meta device, so the methods draw their random numbers there (as they
    draw them on the GPU with the engine's device generator)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return META


class NoHostCopies(TorchDispatchMode):
    """Fails on any operation that moves a host (CPU) tensor into a meta result."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        flat_out = torch.utils._pytree.tree_leaves(out)
        host = [t for t in flat_in if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                and (t.dim() > 0 or "copy" in func.__name__)]
        if host and any(isinstance(t, torch.Tensor) and t.device == META for t in flat_out):
            raise AssertionError(f"{func} copies a host tensor {tuple(host[0].shape)} to the device")
        return out


_AUTOCAST = torch.autocast


def _autocast_meta_as_cpu(device_type: str, *args, **kwargs):
    """``torch.autocast`` has no meta backend; the losses' ``autocast(..., enabled=False)`` blocks behave
    as on the CPU."""
    return _AUTOCAST("cpu" if device_type == "meta" else device_type, *args, **kwargs)


def _info(kind: str) -> DatasetInfo:
    if kind == "multilabel":
        return DatasetInfo("toy", 3, LabelSpec("multilabel", ("cup", "disc")), ("a", "b"), (P, P))
    return DatasetInfo("toy", 1, LabelSpec("exclusive", ("background", "organ", "lesion")), ("a", "b"), (P, P))


def _batches(info: DatasetInfo, b: int = 4) -> tuple[dict, dict]:
    spec, c = info.label_spec, info.in_channels
    label = (torch.empty(b, spec.num_outputs, P, P, device=META) if spec.multilabel
             else torch.empty(b, P, P, dtype=torch.long, device=META))
    image = torch.empty(b, c, P, P, device=META)
    dom = torch.empty(b, dtype=torch.long, device=META)
    return ({"image": image, "label": label, "domain": dom},
            {"image": torch.empty_like(image), "strong": torch.empty_like(image), "domain": dom})


_NAMES = [("supervised", {}), ("mean_teacher", {}), ("fixmatch", {}), ("unimatch", {}), ("bcp", {}),
          ("bcp", {"pretrain_iterations": 1})]
_NAMES += [(name, {"forward_mode": mode}) for name in ("midss", "ustrun") for mode in ("separate", "fused", "grouped")]
# grouped alone is grouped_norm=auto, which is interleaved here; the other two with uneven groups (the LQ call)
_NAMES += [("ustrun", {"forward_mode": "grouped", "grouped_norm": norm}) for norm in ("one_pass", "loop")]
# meta kernels of elementwise ops run in Python (~1 s per step here), so each variant runs on one label kind
# (alternating), and UST-RUN, whose step synchronised before, on both
VARIANTS = [(n, o, ("multilabel", "exclusive")[i % 2]) for i, (n, o) in enumerate(_NAMES)]
VARIANTS += [(n, o, "multilabel" if kind == "exclusive" else "exclusive") for n, o, kind in VARIANTS if n == "ustrun"]


@pytest.mark.parametrize("name,options,kind", VARIANTS,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}-{k}" for n, o, k in VARIANTS])
def test_whole_step_is_sync_free_on_meta(name: str, options: dict, kind: str, monkeypatch) -> None:
    monkeypatch.setattr(torch, "autocast", _autocast_meta_as_cpu)
    info = _info(kind)
    cls = get_method(name)
    c, k = info.in_channels, info.label_spec.num_outputs
    student = UNet2D(c, k, base_channels=2)
    teacher = UNet2D(c, k, base_channels=2) if cls.uses_teacher else None
    if teacher is not None:
        teacher.requires_grad_(False)
    method = cls(cls.Options(**options), student, teacher, info).to(META)
    method.generator = MetaGenerator()
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9)
    # iteration 0: the first step (BCP's pre-training when on); iteration 6 with epochs of 5: past
    # UST-RUN's first-epoch hardness warm-up, with its unreliable slot in use (iteration % epoch_length != 0)
    with NoHostCopies():
        for it in (0, 6):
            lab, unl = _batches(info)
            out = method.train_step(lab, unl if cls.uses_unlabelled else None, Progress(it, 20, epoch_length=5))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if method.teacher is not None:
                ema_update(method.teacher, method.student, ema_alpha(it, 0.99),
                           buffers=not method.teacher_keeps_own_bn_stats)
    assert out.loss.device == META and out.loss.dim() == 0
    assert all(v.device == META for v in out.logs.values())
    assert all(p.grad is not None and p.grad.device == META for p in method.trainable_parameters())


def test_meta_step_catches_a_sync() -> None:
    """The checks have teeth: a 0-dim tensor index (what UST-RUN's unreliable-slot refill used to do)
    and a host-to-device copy both fail."""
    x = torch.empty(4, 3, device=META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        x[torch.zeros((), dtype=torch.long, device=META)]
    with pytest.raises(AssertionError, match="host tensor"), NoHostCopies():
        torch.rand(4).to(META)
