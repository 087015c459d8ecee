"""A plain, slow reference of one MiDSS and one UST-RUN training step, written from the spec
(``shared/spec/ust-run.md`` sections 1.5, 3.2-3.4, 4.1-4.3), independent of ``medsemi.losses`` and
``medsemi.ops``.

Test-support code only. One network call per use, in the original order; per-sample loops with
explicit box slices; the losses, SGD, EMA, LR and ramp written out from their formulas. All random
choices (boxes, TP-RAM ratios, paste sources, queue slots, the labelled sample of the unreliable mix
and its fallback box) come in as arguments, so a test can feed the same draws to the method.

Labels per sample: exclusive ``(H, W)`` int64 class indices, masks ``(H, W)``; multi-label ``(K, H, W)``
0/1 floats, masks ``(K, H, W)``. A box is ``(y, x, h, w)``: rows ``y..y+h-1``, columns ``x..x+w-1``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

Box = tuple[int, int, int, int]


@dataclass
class RefConfig:
    """Hyper-parameters of spec 1.5 (defaults) and the method switches the tests vary."""

    multilabel: bool
    max_iter: int
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    ema_decay: float = 0.99
    tau: float = 0.95
    band: float = 0.01  # TP-RAM L
    epoch_length: int = 500
    queue_len: int = 10
    theta_init: float = 0.1  # also the cap of the relaxation (spec: min(1.0005 θ, 0.1))
    growth: float = 1.0005
    lq_mode: str = "loss"  # loss | forward_only
    dice_eps: float = 1e-10


@dataclass
class QueueEntry:
    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    hardness: float


@dataclass
class UstDraws:
    """The random choices of one UST-RUN step (spec 4.3 step 2 and 9)."""

    queue_picks: list[int]  # n_q slots, uniform with replacement over the queue
    labelled_picks: list[int]  # B - n_q labelled indices, uniform with replacement
    perm: list[int]  # source of unlabelled sample i = (queue_picks + labelled_picks)[perm[i]]
    lq_labelled: int = 0  # j of step 9
    lq_fallback_box: Box = (0, 0, 1, 1)  # random box used when the union region is empty


@dataclass(repr=False)
class Reference:
    """Student, teacher (deep copies), SGD momentum buffers and the UST-RUN state."""

    student: nn.Module
    teacher: nn.Module
    cfg: RefConfig
    momentum_buf: dict[str, torch.Tensor] = field(default_factory=dict)
    queue: list[QueueEntry] = field(default_factory=list)
    theta: float = 0.0
    lq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    lr: float = 0.0
    events: dict[str, int] = field(default_factory=dict)  # which branches of 4.3 ran (for the tests)

    def __repr__(self) -> str:
        return f"Reference(queue={len(self.queue)}, theta={self.theta}, lr={self.lr})"

    def __post_init__(self) -> None:
        self.student = copy.deepcopy(self.student)
        self.teacher = copy.deepcopy(self.teacher)
        self.student.train()
        self.teacher.train()  # spec 3.5: the teacher runs in train mode
        self.theta = self.cfg.theta_init
        self.lr = self.cfg.lr

    def _event(self, name: str) -> None:
        self.events[name] = self.events.get(name, 0) + 1

    # ---- spec 3.2: pseudo-labels -----------------------------------------------------------------
    def pseudo_label(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's logits (C, H, W) -> label, mask."""
        tau = self.cfg.tau
        if self.cfg.multilabel:
            p = 1.0 / (1.0 + torch.exp(-logits))
            return (p >= 0.5).double(), ((p >= tau) | (p <= 1.0 - tau)).double()
        e = torch.exp(logits - logits.max(dim=0).values)
        p = e / e.sum(dim=0)
        return p.argmax(dim=0), (p.max(dim=0).values > tau).double()

    def hard_label(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.multilabel:
            return (1.0 / (1.0 + torch.exp(-logits)) >= 0.5).double()
        return logits.argmax(dim=0)

    def foreground_classes(self, label: torch.Tensor, n_out: int) -> list[torch.Tensor]:
        """Binary map per scored class (multi-label: every channel; exclusive: classes 1..C-1)."""
        if self.cfg.multilabel:
            return [label[c] > 0.5 for c in range(n_out)]
        return [label == c for c in range(1, n_out)]

    def union_foreground(self, label: torch.Tensor) -> torch.Tensor:
        if self.cfg.multilabel:
            return (label > 0.5).any(dim=0)
        return label > 0

    # ---- spec 3.3: the segmentation loss ---------------------------------------------------------
    def seg(self, z: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """CE term (mean over all pixels, not over Σm) + Dice term (batch Dice, squared denominator)."""
        eps = self.cfg.dice_eps
        if m is None:
            m = torch.ones_like(y, dtype=z.dtype)
        if self.cfg.multilabel:
            # BCE with logits written out: max(z,0) - z y + log(1 + exp(-|z|))
            bce = torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
            ce = (bce * m).sum() / bce.numel()
            p = 1.0 / (1.0 + torch.exp(-z))
            dice = 1.0 - (2.0 * (p * y * m).sum() + eps) / ((p * p * m).sum() + (y * y * m).sum() + eps)
            return ce + dice
        b, c = z.shape[:2]
        logp = z - torch.logsumexp(z, dim=1, keepdim=True)
        ce_pix = -logp.gather(1, y[:, None]).squeeze(1)
        ce = (ce_pix * m).sum() / ce_pix.numel()
        p = torch.softmax(z, dim=1)
        per_class = []
        for k in range(c):
            yk = (y == k).double()
            mk = torch.ones_like(m) if k == 0 else m  # the original ignores the mask for class 0
            inter = (p[:, k] * yk * mk).sum()
            den = (p[:, k] ** 2 * mk).sum() + (yk ** 2 * mk).sum()
            per_class.append(1.0 - (2.0 * inter + eps) / (den + eps))
        return ce + sum(per_class) / c

    # ---- spec 4.1: TP-RAM, per sample and channel, in NumPy with fftshift as the original ----------
    def tpram(self, src: torch.Tensor, style: torch.Tensor, lam: float) -> torch.Tensor:
        s = (src.detach().numpy() + 1.0) * 127.5
        g = (style.detach().numpy() + 1.0) * 127.5
        _, h, w = s.shape
        b = int(math.floor(min(h, w) * self.cfg.band))
        hc, wc = h // 2, w // 2
        out = np.empty_like(s)
        for ch in range(s.shape[0]):
            f_s = np.fft.fft2(s[ch])
            amp_s, pha_s = np.abs(f_s), np.angle(f_s)
            amp_g = np.abs(np.fft.fft2(g[ch]))
            a_s = np.fft.fftshift(amp_s)
            a_g = np.fft.fftshift(amp_g)
            win = (slice(hc - b, hc + b + 1), slice(wc - b, wc + b + 1))
            a_s[win] = (1 - lam) * a_s[win] + lam * a_g[win]
            amp = np.fft.ifftshift(a_s)
            rec = np.real(np.fft.ifft2(amp * np.exp(1j * pha_s)))
            out[ch] = np.clip(rec, 0.0, 255.0)
        return torch.from_numpy(out / 127.5 - 1.0)

    # ---- schedules (spec 1.5) ----------------------------------------------------------------------
    def weight(self, k: int) -> float:
        e = k // (self.cfg.max_iter / 200)  # Python float floor division, as the original
        e = min(max(e, 0.0), 200.0)
        return math.exp(-5.0 * (1.0 - e / 200.0) ** 2)


    def optimise(self, loss: torch.Tensor, k: int) -> None:
        """Backward, SGD (momentum, weight decay on every parameter, no dampening), EMA of parameters."""
        params = dict(self.student.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        lr, mu, wd = self.lr, self.cfg.momentum, self.cfg.weight_decay
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                d = g + wd * p
                buf = self.momentum_buf.get(name)
                buf = d.clone() if buf is None else mu * buf + d
                self.momentum_buf[name] = buf
                p -= lr * buf
            alpha = min(1.0 - 1.0 / (k + 1), self.cfg.ema_decay)
            t_params = dict(self.teacher.named_parameters())
            for name, p in params.items():
                t_params[name].copy_(alpha * t_params[name] + (1.0 - alpha) * p)
        # poly LR, set after step k (so steps 0 and 1 both use the base LR)
        self.lr = self.cfg.lr * (1.0 - k / self.cfg.max_iter) ** self.cfg.poly_power

    # ---- shared pieces of 4.2 / 4.3 -----------------------------------------------------------------
    def _teacher_and_ucp(self, k: int, u_w, u_s, src, src_y, src_k, boxes, lam_u):
        """Steps 3-6: TP-RAM, teacher forwards + SymGD, UCP inputs/targets/weights."""
        b = len(u_w)
        t = k / self.cfg.max_iter
        shifted = [self.tpram(src[i], u_w[i], lam_u[i] * t) for i in range(b)]
        mix_ul, mix_lu = [], []
        for i in range(b):
            y, x, h, w = boxes[i]
            a = u_w[i].clone()
            a[:, y:y + h, x:x + w] = src[i][:, y:y + h, x:x + w]
            mix_ul.append(a)
            c = src[i].clone()
            c[:, y:y + h, x:x + w] = u_w[i][:, y:y + h, x:x + w]
            mix_lu.append(c)
        with torch.no_grad():
            p0 = self.teacher(u_w)
            p_ul = self.teacher(torch.stack(mix_ul))
            p_lu = self.teacher(torch.stack(mix_lu))
        y0, k0, yf, ks = [], [], [], []
        for i in range(b):
            y0_i, k0_i = self.pseudo_label(p0[i])
            yul, kul = self.pseudo_label(p_ul[i])
            ylu, klu = self.pseudo_label(p_lu[i])
            y, x, h, w = boxes[i]
            f_y, f_k = yul.clone(), kul.clone()
            f_y[..., y:y + h, x:x + w] = ylu[..., y:y + h, x:x + w]
            f_k[..., y:y + h, x:x + w] = klu[..., y:y + h, x:x + w]
            s_k = ((f_k > 0) & (k0_i > 0) & (f_y == y0_i)).double()
            y0.append(y0_i)
            k0.append(k0_i)
            yf.append(f_y)
            ks.append(s_k)
        ucp = {"x_ul": [], "y_ul": [], "k_ul": [], "x_lu": [], "y_lu": [], "k_lu": []}
        for i in range(b):
            y, x, h, w = boxes[i]
            box = (..., slice(y, y + h), slice(x, x + w))
            a = u_s[i].clone()
            a[box] = shifted[i][box]
            ya, ka = y0[i].clone(), k0[i].clone()
            ya[box] = src_y[i][box]
            ka[box] = src_k[i][box]
            c = shifted[i].clone()
            c[box] = u_s[i][box]
            yc, kc = src_y[i].clone(), src_k[i].clone()
            yc[box] = y0[i][box]
            kc[box] = k0[i][box]
            for key, v in zip(ucp, (a, ya, ka, c, yc, kc)):
                ucp[key].append(v)
        ucp = {key: torch.stack(v) for key, v in ucp.items()}
        return y0, k0, torch.stack(yf), torch.stack(ks), ucp

    def _total(self, k: int, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.weight(k)
        return terms["loss_sup"] + w * (terms["loss_ul"] + terms["loss_lu"] + w * terms["loss_s"])

    # ---- spec 4.2 ----------------------------------------------------------------------------------
    def midss_step(self, k: int, x_l, y_l, u_w, u_s, boxes: list[Box], lam_u: list[float]) -> dict[str, float]:
        b = len(u_w)
        src, src_y = [x_l[i] for i in range(b)], [y_l[i] for i in range(b)]
        src_k = [torch.ones_like(y_l[i], dtype=torch.float64) for i in range(b)]
        _, _, yf, ks, ucp = self._teacher_and_ucp(k, u_w, u_s, src, src_y, src_k, boxes, lam_u)
        z_l = self.student(x_l)
        z_ul = self.student(ucp["x_ul"])
        z_lu = self.student(ucp["x_lu"])
        z_s = self.student(u_s)
        terms = {
            "loss_sup": self.seg(z_l, y_l, None),
            "loss_ul": self.seg(z_ul, ucp["y_ul"], ucp["k_ul"]),
            "loss_lu": self.seg(z_lu, ucp["y_lu"], ucp["k_lu"]),
            "loss_s": self.seg(z_s, yf, ks),
        }
        loss = self._total(k, terms)
        self.optimise(loss, k)
        return {name: float(v.detach()) for name, v in terms.items()} | {"loss": float(loss.detach())}

    # ---- spec 4.3 ----------------------------------------------------------------------------------
    def smoothed_dice(self, pred: torch.Tensor, gt: torch.Tensor) -> float:
        """Spec 3.4 item 1, UST rule: 0 when both are empty."""
        s_p, s_g = int(pred.sum()), int(gt.sum())
        if s_p + s_g == 0:
            return 0.0
        inter = int((pred & gt).sum())
        return (2.0 * inter + 1.0) / (s_p + s_g + 1.001)

    def ustrun_step(self, k: int, x_l, y_l, u_w, u_s, boxes: list[Box], lam_u: list[float],
                    draws: UstDraws) -> dict[str, float]:
        cfg = self.cfg
        b = len(u_w)
        if k % cfg.epoch_length == 0:
            self.lq = None  # the unreliable slot is emptied at the start of every epoch
        # 2. source pool: labelled batch (GT, weight 1), then the queue (Y0, K0)
        n_q = min(b // 2, len(self.queue))
        if n_q:
            self._event("queue_source")
        assert len(draws.queue_picks) == n_q and len(draws.labelled_picks) == b - n_q
        pool = [(self.queue[s].image, self.queue[s].label, self.queue[s].mask) for s in draws.queue_picks]
        pool += [(x_l[j], y_l[j], torch.ones_like(y_l[j], dtype=torch.float64)) for j in draws.labelled_picks]
        chosen = [pool[draws.perm[i]] for i in range(b)]
        src = [c[0] for c in chosen]
        src_y = [c[1].to(y_l.dtype) for c in chosen]
        src_k = [c[2] for c in chosen]
        # 3-4. TP-RAM, boxes, teacher, SymGD
        y0, k0, yf, ks, ucp = self._teacher_and_ucp(k, u_w, u_s, src, src_y, src_k, boxes, lam_u)
        # 5. student on the weak view, for hardness (keeps its graph in the original; unused by the loss)
        z_w = self.student(u_w)
        y_hat = [self.hard_label(z_w[i].detach()) for i in range(b)]
        # 9. unreliable mix with the LQ sample of the previous iteration
        lq_mix = None
        if self.lq is not None:
            lq_img, lq_y, lq_k = self.lq
            j = draws.lq_labelled
            region = self.union_foreground(lq_y) | self.union_foreground(y_l[j])
            self._event("lq_mix")
            if region.any():
                rows = [r for r in range(region.shape[0]) if bool(region[r].any())]
                cols = [c for c in range(region.shape[1]) if bool(region[:, c].any())]
                y, x, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            else:
                self._event("lq_fallback_box")
                y, x, h, w = draws.lq_fallback_box
            box = (..., slice(y, y + h), slice(x, x + w))
            xi, yi, ki = lq_img.clone(), lq_y.clone(), lq_k.clone()
            xi[box] = x_l[j][box]
            yi[box] = y_l[j][box]
            ki[box] = 1.0
            lq_mix = (xi[None], yi[None], ki[None])
        # 7. student forwards in the original order, then S(x_lq) (batch of 1)
        z_l = self.student(x_l)
        z_ul = self.student(ucp["x_ul"])
        z_lu = self.student(ucp["x_lu"])
        z_s = self.student(u_s)
        z_lq = self.student(lq_mix[0]) if lq_mix is not None else None
        # 8. hardness per sample; forced to 1 in the first epoch
        n_out = z_w.shape[1]
        hard = []
        for i in range(b):
            classes_s = self.foreground_classes(y_hat[i], n_out)
            classes_t = self.foreground_classes(y0[i], n_out)
            dices = [self.smoothed_dice(p, g) for p, g in zip(classes_s, classes_t)]
            hard.append(1.0 - sum(dices) / len(dices))
        if k < cfg.epoch_length:
            hard = [1.0] * b
        # 10. refill LQ with the hardest sample (first on ties)
        worst = max(range(b), key=lambda i: (hard[i], -i))
        self.lq = (u_w[worst].clone(), y0[worst].clone(), k0[worst].clone())
        # 11. queue update and adaptive threshold
        reliable = [i for i in range(b) if hard[i] < self.theta]
        entries = [QueueEntry(u_w[i].clone(), y0[i].clone(), k0[i].clone(), hard[i]) for i in reliable]
        if not self.queue:
            self.queue = entries
            if self.queue:
                self.theta = min(self.theta, max(e.hardness for e in self.queue))
        elif entries:
            old = self.queue
            if len(old) + len(entries) > cfg.queue_len:
                self._event("queue_drop")
                old = old[:cfg.queue_len - len(entries)]
            self.queue = entries + old
            self.theta = min(self.theta, max(e.hardness for e in self.queue))
        else:
            self._event("theta_relax")
            self.theta = min(cfg.growth * self.theta, cfg.theta_init)
        # 12. losses
        if lq_mix is not None and cfg.lq_mode == "loss":
            loss_ul = self.seg(torch.cat([z_ul, z_lq]), torch.cat([ucp["y_ul"], lq_mix[1]]),
                               torch.cat([ucp["k_ul"], lq_mix[2]]))
        else:
            loss_ul = self.seg(z_ul, ucp["y_ul"], ucp["k_ul"])
        terms = {
            "loss_sup": self.seg(z_l, y_l, None),
            "loss_ul": loss_ul,
            "loss_lu": self.seg(z_lu, ucp["y_lu"], ucp["k_lu"]),
            "loss_s": self.seg(z_s, yf, ks),
        }
        loss = self._total(k, terms)
        self.optimise(loss, k)
        return {name: float(v.detach()) for name, v in terms.items()} | {"loss": float(loss.detach())}
