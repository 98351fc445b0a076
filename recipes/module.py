"""The LightningModule of the recipes: image classification with SGD and a learning-rate schedule."""

from __future__ import annotations

import logging
import math
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from recipes.models import ARCH_NAMES, build_model

__all__ = ["ClassificationModule"]

logger = logging.getLogger(__name__)


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification of images.

    Args:
        arch: network name, one of ``recipes.models.ARCH_NAMES``.
        num_classes, in_channels, image_size: filled in from the data module by the entry point.
        lr: peak learning rate (after warm-up), for the global batch as configured.
        momentum, nesterov, weight_decay: of ``torch.optim.SGD``.
        optimizer: ``"sgd"`` (default), ``"adam"`` or ``"adamw"`` (``lr`` and ``weight_decay``
            apply; ``momentum`` and ``nesterov`` are SGD's only).
        schedule: ``"cosine"`` (to 0 over the run), ``"step"`` (times ``gamma`` at each fraction of
            the run in ``milestones``) or ``"constant"``; applied per optimizer step.
        warmup_steps: linear warm-up from ``lr / 10`` over this many optimizer steps.

    Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``,
    ``lr``.  The evaluation figures are torchmetrics (sums of correct predictions, of losses and of
    samples, reduced across ranks once at epoch end), so they count every sample once when the
    ranks hold different numbers of samples (``recipes.data``'s unrepeated evaluation sampler).
    The loss is a ``MeanMetric`` weighted by the batch size rather than ``self.log(...,
    sync_dist=True)``: Lightning averages the sample counts of the ranks as integers (25 samples
    on 3 ranks count as 3 x 8), which biases the mean as soon as the counts differ.  Nothing in
    the evaluation steps communicates, so ranks may run different numbers of batches.
    """

    def __init__(
        self,
        arch: str = "digits_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
        warmup_steps: int = 0,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
    ) -> None:
        super().__init__()
        if arch not in ARCH_NAMES:
            raise ValueError(f"arch must be one of {list(ARCH_NAMES)}, got {arch!r}")
        if schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be one of ['cosine', 'step', 'constant'], got {schedule!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if any(not 0 < m < 1 for m in milestones):
            raise ValueError(f"milestones must be fractions of the run in (0, 1), got {milestones!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be one of ['sgd', 'adam', 'adamw'], got {optimizer!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, in_channels, image_size)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluation_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log(f"{stage}/loss", self.val_loss)
        self.log(f"{stage}/acc", self.val_acc, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        else:
            adam = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            optimizer = adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _Schedule(hp.schedule, total, hp.warmup_steps, tuple(hp.milestones), hp.gamma)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx):
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)


class _Schedule:
    """Multiplier of the peak learning rate at optimizer step ``step`` (a picklable callable)."""

    def __init__(
        self, kind: str, total: int, warmup: int, milestones: tuple[float, ...], gamma: float
    ) -> None:
        self.kind, self.total, self.warmup, self.milestones, self.gamma = (
            kind,
            total,
            warmup,
            milestones,
            gamma,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 0.1 + 0.9 * step / self.warmup
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** sum(step >= m * self.total for m in self.milestones)
        return 1.0
