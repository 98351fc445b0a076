"""Training entry point of the recipes (LightningCLI: every option comes from YAML or the command line).

    python -m recipes.train fit --config recipes/configs/digits_memsgd_topk1.yaml --trainer.devices 4
    python -m recipes.train fit --config recipes/configs/resnet20_cifar10_deepsqueeze_topk.yaml
    python -m recipes.train fit --config recipes/configs/digits_ddp.yaml --config recipes/configs/wandb.yaml
    python -m recipes.train fit --print_config --config recipes/configs/digits_ddp.yaml   # every option

* ``model``: :class:`recipes.module.ClassificationModule` (network, SGD, learning-rate schedule);
  its ``num_classes``, ``in_channels`` and ``image_size`` are taken from the data module.
* ``data``: any :class:`recipes.data.TensorDataModule` (``CIFAR10DataModule``,
  ``DigitsDataModule``, ``SyntheticDataModule``) by ``class_path``.
* ``trainer.strategy``: a name (``"ddp"``, and those ``lightning_plugin`` registers: ``"memsgd"``,
  ``"deepsqueeze"``, ``"choco"``, ``"dpsgd"``) or a class with its arguments
  (``lightning_plugin.MemSGDStrategy``, ``recipes.baselines.TorchHookDDPStrategy``, ...).
* ``compression_monitor``: :class:`lightning_plugin.CompressionMonitor`, always attached: the
  ``comm/*`` figures go to every logger.  The default logger is CSV (``runs/<name>/``);
  ``recipes/configs/wandb.yaml`` switches to Weights & Biases in offline mode (no account
  needed; ``wandb sync`` uploads later).
"""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI

import lightning_plugin  # noqa: F401 - registers the strategy names
from lightning_plugin import CompressionMonitor
from recipes.data import TensorDataModule
from recipes.module import ClassificationModule

__all__ = ["RecipeCLI", "main"]

logger = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


class RecipeCLI(LightningCLI):
    """LightningCLI with the data set's shape linked into the model and the compression monitor."""

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(CompressionMonitor, "compression_monitor")


def main(args: list[str] | dict | None = None, run: bool = True) -> RecipeCLI:
    """Build the CLI from ``args`` (default: ``sys.argv``); with ``run=False`` it only instantiates."""
    return RecipeCLI(
        ClassificationModule,
        TensorDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
