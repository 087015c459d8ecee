"""A plain, slow reference of one VerSemi training step, stage 1 and stage 2, written from the spec
(``shared/spec/versemi.md`` sections 1.7, 3.0-3.3, notes N2, N3, N15, N16), independent of
``medsemi.ops.versemi_ops``.

Test-support code only. The network is called once per query, as the original does: 4 calls per
stage-1 iteration (x with its tasks; the composite with task 5, with the a-tasks, with the b-tasks)
and 7 per stage-2 iteration (x; the labelled composite with task 5; the unlabelled composite with
tasks 5, 1, 2, 3, 4). Each call updates the BatchNorm running statistics once. Losses and Adam are
written out from their formulas; boxes are built per sample with slices.

Random draws come in as arguments, as uniforms ``u`` in [0, 1): the stage-2 ratio is
``r = 0.3 + 0.3 u`` and a box start on an axis of size ``n`` with side ``s`` is ``floor(u (n - s))``
(uniform on ``[0, n - s)``); stage 1 takes the integer starts directly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

EPS = 1e-5  # the Dice smoothing of spec 3.0


@dataclass
class VerSemiRefConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    adam_eps: float = 1e-8
    stage1_ratio: float = 2.0 / 3.0
    stage2_range: tuple[float, float] = (0.3, 0.6)
    compat_cons_broadcast: bool = False


@dataclass(repr=False)
class VerSemiReference:
    net: nn.Module
    cfg: VerSemiRefConfig
    adam: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    adam_steps: int = 0

    def __post_init__(self) -> None:
        self.net = copy.deepcopy(self.net)
        self.net.train()

    def __repr__(self) -> str:
        return f"VerSemiReference(adam_steps={self.adam_steps})"

    # ---- spec 3.0 primitives --------------------------------------------------------------------
    @staticmethod
    def dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """1 - (2 Σ p y + ε) / (Σ p² + Σ y² + ε), sums over the whole batch."""
        return 1.0 - (2.0 * (p * y).sum() + EPS) / ((p * p).sum() + (y * y).sum() + EPS)

    @staticmethod
    def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """2-class cross-entropy on logits (B, 2, *S), mean over every voxel of the batch."""
        logp = z - torch.logsumexp(z, dim=1, keepdim=True)
        return -(logp[:, 1] * y + logp[:, 0] * (1.0 - y)).mean()

    @staticmethod
    def fg(z: torch.Tensor) -> torch.Tensor:
        """Foreground softmax probability of (B, 2, *S) logits."""
        return torch.exp(z[:, 1]) / (torch.exp(z[:, 0]) + torch.exp(z[:, 1]))

    def query(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """One network call on the batch x, sample i asked for task tasks[i]."""
        return self.net(x, torch.tensor(tasks, dtype=torch.long))

    @staticmethod
    def box_mask(spatial: tuple[int, ...], side: list[int], starts: list[list[int]]) -> torch.Tensor:
        """context_mask: per sample, 1 outside the box and 0 inside (float64 (B, *S))."""
        m = torch.ones((len(starts), *spatial), dtype=torch.float64)
        for i, st in enumerate(starts):
            m[(i, *[slice(a, a + s) for a, s in zip(st, side)])] = 0.0
        return m

    @staticmethod
    def mix(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """a ⊙ M + b ⊙ (1 - M): the box (M = 0) is filled from b."""
        if a.dim() == m.dim() + 1:
            m = m[:, None]
        return a * m + b * (1.0 - m)

    def stage2_box(self, spatial: tuple[int, ...], u_ratio: float, u_starts: list[list[float]]):
        lo, hi = self.cfg.stage2_range
        r = lo + (hi - lo) * u_ratio
        side = [int(n * r) for n in spatial]
        starts = [[math.floor(u * (n - s)) for u, n, s in zip(us, spatial, side)] for us in u_starts]
        return self.box_mask(spatial, side, starts)

    # ---- Adam (spec 1.7: betas (0.5, 0.999), no weight decay, constant LR) -------------------------
    def reset_optimiser(self) -> None:
        self.adam, self.adam_steps = {}, 0

    def optimise(self, loss: torch.Tensor) -> None:
        params = dict(self.net.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        b1, b2 = self.cfg.betas
        self.adam_steps += 1
        t = self.adam_steps
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                if g is None:  # never reached by the loss (e.g. the unused output's controller rows)
                    continue
                m, v = self.adam.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                self.adam[name] = (m, v)
                m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
                p -= self.cfg.lr * m_hat / (torch.sqrt(v_hat) + self.cfg.adam_eps)

    # ---- spec 3.1 ------------------------------------------------------------------------------
    def stage1_step(self, x: torch.Tensor, label: torch.Tensor, tasks: list[int],
                    starts: list[list[int]]) -> dict[str, float]:
        y = (label == 1).double()  # only the value 1 is foreground (spec 1.4)
        b, spatial = x.shape[0], tuple(x.shape[2:])
        h = b // 2
        # 1. supervised, each sample with its own task
        z = self.query(x, tasks)
        l_sup = self.dice(self.fg(z), y) + self.ce(z, y)
        # 2-3. halves a, b; box of side int(n * 2/3); union label
        side = [int(n * self.cfg.stage1_ratio) for n in spatial]
        m = self.box_mask(spatial, side, starts)
        x_mix = self.mix(x[:h], x[h:], m)
        y_a, y_b = y[:h], y[h:]
        y_mix = self.mix(y_a, y_b, m)
        t_a, t_b = tasks[:h], tasks[h:]
        # 4. synthetic task
        p5 = self.fg(self.query(x_mix, [5] * h))
        l_chaos = self.dice(p5, y_mix)
        # 5. task-specific constraint; a same-task pair takes the full mixed label for both
        p_a = self.fg(self.query(x_mix, t_a))
        p_b = self.fg(self.query(x_mix, t_b))
        tgt_a, tgt_b = y_a * m, y_b * (1.0 - m)
        for i in range(h):
            if t_a[i] == t_b[i]:
                tgt_a[i] = y_mix[i]
                tgt_b[i] = y_mix[i]
        l_spec = 0.5 * (self.dice(p_a, tgt_a) + self.dice(p_b, tgt_b))
        loss = l_sup + l_chaos + l_spec
        self.optimise(loss)
        terms = {"sup": l_sup, "chaos": l_chaos, "spec": l_spec, "loss": loss}
        return {name: float(v.detach()) for name, v in terms.items()}

    # ---- spec 3.2 ------------------------------------------------------------------------------
    def stage2_step(self, x: torch.Tensor, label: torch.Tensor, tasks: list[int], u: torch.Tensor,
                    box1: tuple[float, list[list[float]]], box2: tuple[float, list[list[float]]]
                    ) -> dict[str, float]:
        y = (label == 1).double()
        b, spatial = x.shape[0], tuple(x.shape[2:])
        h = b // 2
        # 1. supervised
        z = self.query(x, tasks)
        l_sup = self.dice(self.fg(z), y) + self.ce(z, y)
        # 2. labelled synthetic CutMix, r1 ~ U(0.3, 0.6)
        m1 = self.stage2_box(spatial, *box1)
        x_ls = self.mix(x[:h], x[h:], m1)
        y_ls = self.mix(y[:h], y[h:], m1)
        l_chaos_sup = self.dice(self.fg(self.query(x_ls, [5] * h)), y_ls)
        # 3. unlabelled outside, the labelled image of the same index inside; r2 drawn independently
        m2 = self.stage2_box(spatial, *box2)
        x_ul = self.mix(u, x, m2)
        # 4-5. synthetic prediction and the max over the real-task heads (not detached, N3)
        s = self.fg(self.query(x_ul, [5] * b))
        per_task = [self.fg(self.query(x_ul, [t] * b)) for t in (1, 2, 3, 4)]
        q = torch.clamp(torch.stack(per_task).max(dim=0).values, 0.0, 1.0)
        # 6. consistency
        l_chaos = self.dice(s, q)
        # 7. box supervision: intended per-sample mask, or the original's (B, 1, *S) x (B, *S) broadcast
        box = 1.0 - m2
        if self.cfg.compat_cons_broadcast:
            box_c = box[:, None]  # (B, 1, *S) * (B, *S) -> (B, B, *S), entry [i, j] = sample j in box i
            l_cons = self.dice(s * box_c, y * box_c)
        else:
            l_cons = self.dice(s * box, y * box)
        loss = l_sup + l_chaos + l_cons + l_chaos_sup
        self.optimise(loss)
        terms = {"sup": l_sup, "chaos_sup": l_chaos_sup, "chaos": l_chaos, "cons": l_cons, "loss": loss}
        return {name: float(v.detach()) for name, v in terms.items()}
