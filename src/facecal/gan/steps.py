"""One training step of any architecture: the networks, their optimisers and the update
(`Trainer`), and the learning-rate schedule (`lr_at`)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facecal.gan import models
from facecal.gan.params import GanParams
from facecal.gan.runtime import Runtime
from facecal.metrics import ssim


def lr_at(params: GanParams, step: int, total: int) -> float:
    """Constant, then linearly to zero over the last `lr_decay` of the run (pix2pix's schedule);
    a pure function of the step, so a resumed run needs no scheduler state."""
    decay = round(params.lr_decay * total)
    if decay <= 0 or step < total - decay:
        return params.lr
    return params.lr * (total - step) / (decay + 1)


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@contextlib.contextmanager
def _frozen(modules: list[nn.Module], active: bool):
    """No weight gradients for these modules inside (skipped under DDP, whose reducer expects
    every parameter to produce one)."""
    if not active:
        yield
        return
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m in modules:
            m.requires_grad_(True)


class Trainer:
    """Networks, optimisers and one training step of any architecture.

    `generator_extra` are generator options that come from the data, not from params (the
    warp_refine mesh)."""

    def __init__(
        self,
        params: GanParams,
        image_size: int,
        in_channels: int,
        rt: Runtime,
        seed: int,
        generator_extra: dict[str, Any] | None = None,
    ):
        self.params, self.rt, self.in_channels = params, rt, in_channels
        self.points = models.takes_points(params.arch)
        g_kw, d_kw = params.model_kwargs()
        g_kw = {**g_kw, **(generator_extra or {})}
        torch.manual_seed(seed)  # equal initial weights on every rank and every run
        G = models.build_generator(params.arch, image_size, in_channels, **g_kw)
        Ds = models.build_discriminators(params.arch, image_size, in_channels, **d_kw)
        self.nets: dict[str, nn.Module] = {"G": G, **Ds}
        for name, net in self.nets.items():
            net.to(rt.device)
            if rt.channels_last:
                net.to(memory_format=torch.channels_last)
            if rt.distributed:
                self.nets[name] = nn.parallel.DistributedDataParallel(
                    net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
                )
        betas = (float(params.betas[0]), float(params.betas[1]))
        self.optims = {
            name: torch.optim.Adam(net.parameters(), lr=params.lr, betas=betas)
            for name, net in self.nets.items()
        }
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        self.gate_p = torch.tensor(params.pldt.gate_p, dtype=torch.float64).reshape(3, 3)
        self.single = not rt.distributed

    # --- helpers
    def module(self, name: str) -> nn.Module:
        net = self.nets[name]
        return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net

    def autocast(self):
        if self.rt.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self, names: list[str]) -> None:
        for n in names:
            if self.scaler:
                self.scaler.step(self.optims[n])
            else:
                self.optims[n].step()
        if self.scaler:
            self.scaler.update()

    def train(self) -> None:
        for net in self.nets.values():
            net.train()

    def set_lr(self, lr: float) -> None:
        for opt in self.optims.values():
            for group in opt.param_groups:
                group["lr"] = lr

    # --- steps
    def _forward(self, G: nn.Module, x: torch.Tensor, points: torch.Tensor | None):
        """G on inputs `x`; point architectures also get (reference, target) points (N×2×68×2)."""
        if not self.points:
            return G(x)
        if points is None:
            raise ValueError(f"{self.params.arch} needs the pairs' landmark points")
        return G(x, points[:, 0], points[:, 1])

    def step(
        self,
        batch: torch.Tensor,
        other_faces: torch.Tensor | None,
        points: torch.Tensor | None = None,
        choice: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One update from a [−1, 1] batch (generator input ⊕ face) and, for warp_refine, its
        points and their pixels' target triangles (`warp.triangle_choice`, optional);
        returns detached losses."""
        x, face = batch[:, : self.in_channels], batch[:, self.in_channels :]
        if self.params.arch == "pldt":
            return self._step_pldt(x, face, other_faces)
        return self._step_pix2pix(x, face, points, choice)

    def _step_pix2pix(self, x, face, points=None, choice=None):
        """pix2pix's update; warp_refine's too (plus its mask penalty)."""
        G, D = self.nets["G"], self.nets["D"]
        refine = self.params.arch == "warp_refine"
        lam = (self.params.warp_refine if refine else self.params.pix2pix).lambda_l1
        mask_term = None
        if refine and points is None:
            raise ValueError(
                "warp_refine needs the pairs' landmark points (pairs/<split>/points.npz)"
            )
        if refine and self.params.warp_refine.self_share > 0:
            x, points = self._self_references(x, face, points)
        with self.autocast():
            if refine:
                fake, mask = G(x, points[:, 0], points[:, 1], with_mask=True, choice=choice)
                # Paint only where the warp cannot do it (GANimation's attention penalty).
                mask_term = (1.0 - mask.float()).mean()
            else:
                fake = G(x)
        # D first: real pairs → 1, generated → 0 (each forward followed by its backward: DDP)
        self.optims["D"].zero_grad(set_to_none=True)
        with self.autocast():
            loss_real = _bce(D(torch.cat([x, face], 1)), True)
        self._backward(0.5 * loss_real)
        with self.autocast():
            loss_fake = _bce(D(torch.cat([x, fake.detach()], 1)), False)
        self._backward(0.5 * loss_fake)
        self._step(["D"])
        # then G against the updated D
        self.optims["G"].zero_grad(set_to_none=True)
        with _frozen([self.module("D")], self.single), self.autocast():
            loss_gan = _bce(D(torch.cat([x, fake], 1)), True)
            loss_l1 = F.l1_loss(fake.float(), face.float())
            loss_g = loss_gan + lam * loss_l1
            if mask_term is not None:
                loss_g = loss_g + self.params.warp_refine.lambda_mask * mask_term
            loss_ssim = None
            if refine and self.params.warp_refine.lambda_ssim > 0:
                # L1 alone prefers a blur over a sharp face a pixel off; SSIM (what evaluate
                # reports) rewards structure (Zhao et al. 2017 mix the two the same way). In
                # fp32 even under autocast: var = E[x²] − E[x]² in bf16 loses more than SSIM's
                # constants (measured: SSIM 2.09 for bright flat faces).
                with torch.autocast(self.rt.device.type, enabled=False):
                    s = ssim((fake.float() + 1) / 2, (face.float() + 1) / 2, data_range=1.0)
                loss_ssim = (1.0 - s).mean()
                loss_g = loss_g + self.params.warp_refine.lambda_ssim * loss_ssim
        self._backward(loss_g)
        self._step(["G"])
        losses = {
            "loss_g": loss_g.detach(),
            "loss_d": (0.5 * (loss_real + loss_fake)).detach(),
            "loss_g_gan": loss_gan.detach(),
            "loss_l1": loss_l1.detach(),
        }
        if mask_term is not None:
            losses["painted_share"] = mask_term.detach()
        if loss_ssim is not None:
            losses["loss_ssim"] = loss_ssim.detach()
        return losses

    def _self_references(self, x, face, points):
        """A share of the batch gets its own face as the reference (points: its own). Served, a
        warp_refine model warps the person's own photo, often already close to the target; a
        net trained only on neutral references paints expression regions whether or not the
        warped face already has them. Pairs whose answer is their reference teach it to leave
        a right warp alone. Drawn from the torch RNG (seeded, checkpointed)."""
        pick = torch.rand(x.shape[0]) < self.params.warp_refine.self_share
        if not pick.any():
            return x, points
        pick = pick.to(x.device)
        x, points = x.clone(), points.clone()
        x[pick, 3:6] = face[pick].to(x.dtype)
        points[pick, 0] = points[pick, 1]
        return x, points

    def _step_pldt(self, x, face, other):
        G, D, DA = self.nets["G"], self.nets["D"], self.nets["DA"]
        for opt in self.optims.values():
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            fake = G(x)
        # G's loss against the current D and DA (the three updates are simultaneous)
        with _frozen([self.module("D"), self.module("DA")], self.single), self.autocast():
            loss_g = 0.5 * (_bce(D(fake), True) + _bce(DA(torch.cat([x, fake], 1)), True))
        self._backward(loss_g)
        if not self.single:  # D/DA weight gradients of G's loss are not theirs to apply
            self.optims["D"].zero_grad(set_to_none=True)
            self.optims["DA"].zero_grad(set_to_none=True)
        fake = fake.detach()
        terms_d = [(face, True), (other, True), (fake, False)]
        terms_a = [(face, True), (other, False), (fake, False)]
        loss_d = loss_a = 0.0
        for img, real in terms_d:
            with self.autocast():
                loss = _bce(D(img), real) / 3
            self._backward(loss)
            loss_d = loss_d + loss.detach()
        for img, real in terms_a:
            with self.autocast():
                loss = _bce(DA(torch.cat([x, img], 1)), real) / 3
            self._backward(loss)
            loss_a = loss_a + loss.detach()
        losses = {"loss_g": loss_g.detach(), "loss_d": loss_d, "loss_a": loss_a}
        update = True
        if self.params.pldt.gate:
            e = torch.stack([loss_g.detach(), loss_d, loss_a]).double()
            if self.rt.distributed:  # every rank must take the same decision
                torch.distributed.all_reduce(e)
                e /= self.rt.world
            e = e.cpu()
            update = bool(e @ e > e @ self.gate_p @ e)
        if update:
            self._step(["G", "D", "DA"])
        losses["updated"] = torch.tensor(float(update))
        return losses

    # --- state
    def state(self) -> dict[str, Any]:
        return {
            "nets": {
                n: {k: v.detach().cpu() for k, v in self.module(n).state_dict().items()}
                for n in self.nets
            },
            "optims": {n: o.state_dict() for n, o in self.optims.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for n in self.nets:
            self.module(n).load_state_dict(state["nets"][n])
            self.optims[n].load_state_dict(state["optims"][n])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def param_checksum(self) -> str:
        h = hashlib.sha256()
        for n in sorted(self.nets):
            for k, p in sorted(self.module(n).named_parameters()):
                h.update(k.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def sync_buffers(self) -> None:
        """BN running statistics from rank 0 (DDP broadcasts them only before each forward)."""
        if not self.rt.distributed:
            return
        for n in self.nets:
            for b in self.module(n).buffers():
                torch.distributed.broadcast(b, 0)

    @torch.no_grad()
    def generate(
        self, x: torch.Tensor, points: torch.Tensor | None = None, batch: int = 64
    ) -> torch.Tensor:
        """G in eval mode (as exported and served) on [−1, 1] inputs → [−1, 1] float32."""
        G = self.module("G")
        G.eval()
        out = []
        for i in range(0, len(x), batch):
            pts = points[i : i + batch] if points is not None else None
            with self.autocast():
                out.append(self._forward(G, x[i : i + batch], pts).float())
        G.train()
        return torch.cat(out) if out else x.new_zeros((0, 3, *x.shape[2:]))
