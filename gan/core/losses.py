"""Adversarial losses and penalties. The loss owns the maths; the loop owns the order.

Each phase computes its loss, calls backward, and returns detached statistics. The
relativistic pairing loss ('rpgan', Huang et al. 2024, after Jolicoeur-Martineau 2019) scores
each generated image against the real image at the same row of its batch, so its phases
take both; with R1 and R2 (zero-centred gradient penalties on real and on generated images,
Mescheder et al. 2018) it is the R3GAN objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from gan.core.config import LossConfig

Augment = Callable[[torch.Tensor], torch.Tensor]


def d_adversarial(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "rpgan":  # softplus(-(D(real) - D(fake))), pair by pair
        return F.softplus(fake_logits - _paired(real_logits, fake_logits)).mean()
    if kind == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def g_adversarial(kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    """``real_logits``: D's logits of the real images paired with the generated ones ('rpgan' only)."""
    if kind == "rpgan":  # the mirror: softplus(-(D(fake) - D(real)))
        if real_logits is None:
            raise ValueError("loss.kind='rpgan' pairs each generated image with a real one: pass real_logits")
        return F.softplus(_paired(real_logits, fake_logits) - fake_logits).mean()
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def _paired(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if real_logits.shape != fake_logits.shape:
        raise ValueError(
            f"relativistic pairing needs as many real as generated images: {tuple(real_logits.shape)} real "
            f"logits against {tuple(fake_logits.shape)} generated"
        )
    return real_logits


def input_gradient_sq_norm(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample ||d sum(outputs) / d inputs||^2, differentiable (create_graph)."""
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.square().flatten(1).sum(1)


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mescheder et al. 2018: gamma/2 * E ||grad_x D(x)||^2 on real data (R1); the same at
    generated images is R2."""
    return 0.5 * gamma * input_gradient_sq_norm(real_logits, real_inputs).mean()


r2_penalty = r1_penalty
"""R2: R1's zero-centred penalty, taken at generated images."""


def every_parameter(*logits: torch.Tensor) -> torch.Tensor:
    """Zero, through every parameter the logits came from: added to a penalty, it makes each of
    D's parameters take part in its backward (with a zero gradient where the input gradient
    misses it, as it does D's last bias), as DistributedDataParallel needs to finish its
    all-reduce; the gradients keep their values to the bit."""
    return sum(x.sum() for x in logits) * 0


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, labels, alpha: torch.Tensor, weight: float):
    """Gulrajani et al. 2017: weight * E (||grad D(x_hat)|| - 1)^2 on interpolates."""
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    norms = input_gradient_sq_norm(D(x_hat, labels), x_hat).add(1e-12).sqrt()
    return weight * (norms - 1).square().mean()


class GANLoss:
    """``autocast`` wraps the adversarial forward passes (bf16); penalties and every
    backward run in float32. With ``one_call`` D scores a D step's real and generated
    images in one call (D must hold no batch statistics across them)."""

    gamma_scale: float = 1.0
    """The share of loss.r1_gamma and loss.r2_gamma the penalties take now (the loop's schedule sets it)."""

    def __init__(
        self,
        cfg: LossConfig,
        augment: Augment | None = None,
        autocast: Callable[[], AbstractContextManager] | None = None,
        one_call: bool = False,
        observe: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """``observe`` takes D's overfitting signal from every main D update (adaptive
        augmentation): its logits on the real images, or with 'rpgan' each real logit minus
        its paired generated one, whose sign is what the relativistic loss rewards."""
        self.cfg = cfg
        self.augment = augment or (lambda x: x)
        self.autocast = autocast or contextlib.nullcontext
        self.one_call = one_call
        self.observe = observe

    def d_main(self, D, real, real_labels, fake, fake_labels, gp_alpha=None, D_penalty=None) -> dict[str, torch.Tensor]:
        """D on real vs (detached) fake images; WGAN-GP adds its penalty here, through
        ``D_penalty`` when given (the same D, not compiled: the penalty differentiates twice).
        With ``class_weight`` D also learns to classify the real images."""
        stats = {}
        with self.autocast():
            if self.one_call:
                real_logits, fake_logits, class_term = self._logits_together(
                    D, real, real_labels, fake, fake_labels, stats
                )
            else:
                real_logits, class_term = self._logits(D, real, real_labels, stats, "loss/d/class")
                fake_logits = D(self.augment(fake), fake_labels).float()
        loss = d_adversarial(self.cfg.kind, real_logits, fake_logits) + class_term
        stats |= {"d/real": real_logits.detach().mean(), "d/fake": fake_logits.detach().mean()}
        if self.observe is not None:
            self.observe(real_logits - fake_logits if self.cfg.kind == "rpgan" else real_logits)
        if self.cfg.kind == "wgan-gp":
            penalty = gradient_penalty(D_penalty or D, real, fake, real_labels, gp_alpha, self.cfg.gp_weight)
            stats["loss/d/gp"] = penalty.detach()
            loss = loss + penalty
        loss.backward()
        stats["loss/d"] = loss.detach()
        return stats

    def d_reg(self, D, real, real_labels, fake=None, fake_labels=None) -> dict[str, torch.Tensor]:
        """Lazy R1 (StyleGAN2) and, with ``loss.r2_gamma``, R2 at the generated images ``fake``
        (R3GAN): every r1_every D steps, scaled by r1_every. Through the augmentation, by the
        gradient at the images before it. ``D`` must be eager: the penalties differentiate twice."""
        real = real.detach().requires_grad_(True)
        if not self.cfg.r2_gamma:
            logits = D(self.augment(real), real_labels)
            penalty = r1_penalty(logits, real, self.cfg.r1_gamma * self.gamma_scale)
            (penalty * self.cfg.r1_every + every_parameter(logits)).backward()
            return {"loss/d/r1": penalty.detach()}
        if fake is None:
            raise ValueError("loss.r2_gamma > 0 penalises D at the generated images: pass them to d_reg as fake=")
        fake = fake.detach().requires_grad_(True)
        if self.one_call:
            labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
            real_logits, fake_logits = D(torch.cat([self.augment(real), self.augment(fake)]), labels).chunk(2)
        else:
            real_logits, fake_logits = D(self.augment(real), real_labels), D(self.augment(fake), fake_labels)
        # One backward for both: each image's gradient comes from its own logit.
        r1 = r1_penalty(real_logits, real, self.cfg.r1_gamma * self.gamma_scale)
        r2 = r2_penalty(fake_logits, fake, self.cfg.r2_gamma * self.gamma_scale)
        ((r1 + r2) * self.cfg.r1_every + every_parameter(real_logits, fake_logits)).backward()
        return {"loss/d/r1": r1.detach(), "loss/d/r2": r2.detach()}

    def g_main(self, D, fake, fake_labels, real=None, real_labels=None) -> dict[str, torch.Tensor]:
        """With ``class_weight`` G is also pushed to draw what D classifies as the label.
        'rpgan' scores ``fake`` against the paired real images ``real`` (the D phase's)."""
        stats = {}
        real_logits = None
        with self.autocast():
            if self.cfg.kind != "rpgan":
                logits, class_term = self._logits(D, fake, fake_labels, stats, "loss/g/class")
            elif real is None:
                raise ValueError("loss.kind='rpgan' pairs each generated image with a real one: pass g_main real=")
            elif self.one_call:
                real_logits, logits, class_term = self._logits_together(
                    D, real.detach(), real_labels, fake, fake_labels, stats, classify_fake=True
                )
            else:
                real_logits = D(self.augment(real.detach()), real_labels).float()
                logits, class_term = self._logits(D, fake, fake_labels, stats, "loss/g/class")
        loss = g_adversarial(self.cfg.kind, logits, real_logits) + class_term
        loss.backward()
        return stats | {"loss/g": loss.detach()}

    def _logits_together(self, D, real, real_labels, fake, fake_labels, stats, classify_fake=False):
        """``_logits`` of the real images (of the generated ones with ``classify_fake``, G's
        phase) and D's logits of the others, from one call of D on both (augmented in the
        same order as two calls would draw)."""
        images = torch.cat([self.augment(real), self.augment(fake)])
        labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
        n = real.shape[0]
        if not self.cfg.class_weight:
            logits = D(images, labels).float()
            return logits[:n], logits[n:], 0.0
        logits, scores = D(images, labels, classes=True)
        scored, wanted = (scores[n:], fake_labels) if classify_fake else (scores[:n], real_labels)
        class_loss = F.cross_entropy(scored.float(), wanted)
        stats["loss/g/class" if classify_fake else "loss/d/class"] = class_loss.detach()
        logits = logits.float()
        return logits[:n], logits[n:], self.cfg.class_weight * class_loss

    def _logits(self, D, images, labels, stats, name) -> tuple[torch.Tensor, torch.Tensor | float]:
        """D's logits, and the weighted cross-entropy of its class scores (recorded in
        ``stats`` as ``name``) when the auxiliary classification is on (AC-GAN, Odena et al.
        2017; D's classifier learns from real images only, as G's samples would teach it
        their own mistakes); 0 when it is off."""
        if not self.cfg.class_weight:
            return D(self.augment(images), labels).float(), 0.0
        logits, scores = D(self.augment(images), labels, classes=True)
        class_loss = F.cross_entropy(scores.float(), labels)
        stats[name] = class_loss.detach()
        return logits.float(), self.cfg.class_weight * class_loss
