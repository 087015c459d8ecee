"""Tests for medsemi.ops.reliable_queue against a pure-Python list version of spec 4.3 steps 10-11."""

from __future__ import annotations

import random

import pytest
import torch

from medsemi.data.contract import LabelSpec
from medsemi.ops.reliable_queue import ReliableQueue, pick_hardest


class ListQueue:
    """Spec 4.3 step 11 in plain Python. Entries: [id, hardness, step inserted], front = newest.

    For k > N reliable at once (impossible with the original batch 4 / N 10) the module documents that
    the first N reliable samples are kept; this reference follows that rule.
    """

    def __init__(self, n: int, theta: float = 0.1, growth: float = 1.0005, cap: float = 0.1) -> None:
        self.n, self.theta, self.growth, self.cap = n, theta, growth, cap
        self.entries: list[tuple[int, float, int]] = []
        self.step = 0

    def update(self, ids: list[int], hs: list[float]) -> list[bool]:
        reliable = [h < self.theta for h in hs]
        new = [(i, h, self.step) for i, h, r in zip(ids, hs, reliable) if r]
        k = len(new)
        if len(self.entries) == 0:
            self.entries = new[: self.n]
            if self.entries:
                self.theta = min(self.theta, max(e[1] for e in self.entries))
        elif k > 0:
            keep = self.n - k if len(self.entries) + k > self.n else len(self.entries)
            self.entries = (new + self.entries[: max(keep, 0)])[: self.n]
            self.theta = min(self.theta, max(e[1] for e in self.entries))
        else:
            self.theta = min(self.growth * self.theta, self.cap)
        self.step += 1
        return reliable


def _batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.tensor(ids, dtype=torch.float32)
    images = t.view(-1, 1, 1, 1).expand(-1, 1, 2, 3).clone()
    labels = torch.tensor(ids).view(-1, 1, 1).expand(-1, 2, 3).clone()
    masks = (t % 7 / 7).view(-1, 1, 1).expand(-1, 2, 3).clone()
    return images, labels, masks


def _scenario_batch(rng: random.Random, theta: float, step: int) -> list[float]:
    kind = "none" if step < 3 else rng.choice(["none", "none", "all", "mixed", "mixed", "equal", "big"])
    size = 13 if kind == "big" else rng.choice([1, 2, 4, 4, 4])
    if kind == "none":
        return [rng.uniform(theta, 1.0) for _ in range(size)]
    if kind in ("all", "big"):
        return [rng.uniform(0, theta) * 0.999 for _ in range(size)]
    if kind == "equal":  # exactly θ is not reliable (strict)
        return [theta] + [rng.uniform(0, 2 * theta) for _ in range(size - 1)]
    return [rng.uniform(0, 1.5 * theta) for _ in range(size)]


def _compare(q: ReliableQueue, ref: ListQueue) -> None:
    c = int(q.count)
    assert c == len(ref.entries)
    assert q.images[:c, 0, 0, 0].tolist() == [float(e[0]) for e in ref.entries]
    assert q.labels[:c, 1, 2].tolist() == [e[0] for e in ref.entries]
    assert q.hardness[:c].tolist() == [e[1] for e in ref.entries]
    assert abs(float(q.theta) - ref.theta) <= 1e-7
    ages = q.ages()
    assert ages[:c].tolist() == [ref.step - e[2] for e in ref.entries]
    assert bool((ages[c:] == -1).all())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("growth", [1.0005, 1.5])
def test_queue_matches_list_reference(seed: int, growth: float) -> None:
    rng = random.Random(seed)
    q = ReliableQueue((1, 2, 3), (2, 3), (2, 3), capacity=10, growth=growth)
    ref = ListQueue(10, growth=growth)
    next_id = 0
    seen = set()
    for step in range(80):
        hs = _scenario_batch(rng, ref.theta, step)
        ids = list(range(next_id, next_id + len(hs)))
        next_id += len(hs)
        images, labels, masks = _batch(ids)
        flags = q.update(images, labels, masks, torch.tensor(hs, dtype=torch.float64))
        expected = ref.update(ids, hs)
        assert flags.tolist() == expected
        _compare(q, ref)
        c = int(q.count)
        assert torch.equal(q.masks[:c], _batch([e[0] for e in ref.entries])[2])
        seen.add((len(hs), sum(expected), c))
    # the random sequences did cover the cases of the spec
    assert any(k == 0 for _, k, c in seen if c == 0)  # empty queue, nothing reliable
    assert any(k == b for b, k, _ in seen if k > 0)  # all reliable
    assert any(k > 10 for _, k, _ in seen)  # more than N at once
    assert any(0 < k < b for b, k, _ in seen)  # mixed


def test_theta_rules_by_hand() -> None:
    q = ReliableQueue((1, 2, 3), (2, 3), (2, 3), capacity=3)
    one = _batch([0])
    q.update(*one, torch.tensor([0.5]))  # empty queue, nothing reliable: θ unchanged
    assert float(q.theta) == 0.1 and int(q.count) == 0
    q.update(*_batch([1, 2]), torch.tensor([0.04, 0.02], dtype=torch.float64))
    assert int(q.count) == 2 and abs(float(q.theta) - 0.04) < 1e-12
    q.update(*one, torch.tensor([0.9]))  # none reliable, queue non-empty: θ grows
    assert abs(float(q.theta) - 0.04 * 1.0005) < 1e-12
    # front insert in batch order; only the first N - k = 1 old entries survive (the last slot, id 2, goes)
    q.update(*_batch([3, 4]), torch.tensor([0.01, 0.03], dtype=torch.float64))
    assert q.images[:3, 0, 0, 0].tolist() == [3.0, 4.0, 1.0]
    assert abs(float(q.theta) - 0.04) < 1e-12  # max over the stored h (0.01, 0.03, 0.04), not the new ones
    for _ in range(5000):
        q.update(*one, torch.tensor([0.9]))
    assert abs(float(q.theta) - 0.1) < 1e-12  # capped


def test_state_dict_round_trip_gather_and_draw() -> None:
    spec = LabelSpec("multilabel", ("cup", "disc"))
    q = ReliableQueue.for_label_spec(spec, in_channels=3, spatial=(4, 4), capacity=5)
    assert q.labels.shape == (5, 2, 4, 4) and q.labels.dtype == torch.float32
    torch.manual_seed(0)
    imgs, labs, msks = torch.rand(4, 3, 4, 4), (torch.rand(4, 2, 4, 4) > 0.5).float(), torch.rand(4, 2, 4, 4)
    q.update(imgs, labs, msks, torch.tensor([0.05, 0.5, 0.01, 0.2]))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    assert {"images", "labels", "masks", "hardness", "count", "theta", "inserted_at", "step"} <= set(state)
    q2 = ReliableQueue.for_label_spec(spec, in_channels=3, spatial=(4, 4), capacity=5)
    q2.load_state_dict(state)
    for k, v in q.state_dict().items():
        assert torch.equal(v, q2.state_dict()[k])
    i, lab, m = q2.gather(torch.tensor([1, 0, 1]))
    assert torch.equal(i, imgs[[2, 0, 2]]) and torch.equal(lab, labs[[2, 0, 2]])
    assert torch.equal(m, msks[[2, 0, 2]])
    idx = q2.draw_indices(1000, torch.Generator().manual_seed(0))
    assert set(idx.tolist()) == {0, 1}
    excl = ReliableQueue.for_label_spec(LabelSpec("exclusive", ("bg", "fg")), 1, (4, 4))
    assert excl.labels.dtype == torch.long and excl.masks.shape == (10, 4, 4)
    with pytest.raises(ValueError, match="reliable_queue"):
        q.update(imgs[:, :1], labs, msks, torch.zeros(4))


def test_pick_hardest() -> None:
    rng = random.Random(0)
    for _ in range(200):
        hs = [rng.choice([0.1, 0.2, 0.3, 1.0]) for _ in range(rng.randint(1, 6))]
        best, best_v = 0, -1.0
        for i, h in enumerate(hs):  # the original scan: strict '>' keeps the first maximum
            if h > best_v:
                best, best_v = i, h
        assert int(pick_hardest(torch.tensor(hs, dtype=torch.float64))) == best
    assert int(pick_hardest(torch.tensor([float("nan"), 0.2, 0.5, 0.5]))) == 2
    assert int(pick_hardest(torch.ones(4))) == 0


def test_no_host_sync_on_meta_device() -> None:
    """Meta tensors have no data, so any host round trip inside update/gather/draw would raise."""
    q = ReliableQueue((1, 2, 3), (2, 3), (2, 3), capacity=4).to("meta")
    images = torch.empty(5, 1, 2, 3, device="meta")
    labels = torch.empty(5, 2, 3, dtype=torch.long, device="meta")
    h = torch.empty(5, dtype=torch.float64, device="meta")
    flags = q.update(images, labels, torch.empty(5, 2, 3, device="meta"), h)
    assert flags.shape == (5,) and q.theta.device.type == "meta"
    imgs, _, _ = q.gather(q.draw_indices(3))
    assert imgs.shape == (3, 1, 2, 3)
    assert pick_hardest(h).shape == ()
