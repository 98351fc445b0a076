"""Recipes: networks (parameter counts of the papers) and the LightningModule's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.models import ARCH_NAMES, DigitsCNN, build_model, resnet18, resnet20
from recipes.module import ClassificationModule, _Schedule


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_the_papers_parameter_count():
    model = resnet20(num_classes=10)
    assert count(model) == 269_722  # He et al. report 0.27M
    # option-A shortcuts carry no parameters: 19 convolutions, 19 batch norms, one linear layer
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 19
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count(resnet20(num_classes=100)) == 269_722 + 65 * 90


def test_resnet18_cifar_variant():
    model = resnet18(num_classes=10)
    assert count(model) == 11_173_962
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_small_networks_for_digits():
    assert count(DigitsCNN()) == 38_282
    assert count(build_model("mlp", 10, 1, 8)) == 64 * 128 + 128 + 128 * 10 + 10
    for arch in set(ARCH_NAMES) - {"resnet18"}:  # resnet18 has its own test
        size, channels = (8, 1) if arch in ("digits_cnn", "mlp") else (32, 3)
        out = build_model(arch, 7, channels, size)(torch.randn(3, channels, size, size))
        assert out.shape == (3, 7) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="num_classes"):
        resnet20(num_classes=0)
    with pytest.raises(ValueError, match="8x8"):
        DigitsCNN()(torch.randn(1, 1, 16, 16))


def test_learning_rate_schedules():
    cosine = _Schedule("cosine", total=100, warmup=10, milestones=(), gamma=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(5) == pytest.approx(0.55)
    assert (
        cosine(10) == pytest.approx(1.0)
        and cosine(55) == pytest.approx(0.5)
        and cosine(100) == pytest.approx(0.0)
    )
    step = _Schedule("step", total=100, warmup=0, milestones=(0.5, 0.75), gamma=0.1)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert _Schedule("constant", 100, 0, (), 0.1)(77) == 1.0
    assert math.isclose(cosine(1000), 0.0, abs_tol=1e-12)  # past the end: stays at zero


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of"):
        ClassificationModule(schedule="linear")
    with pytest.raises(ValueError, match="milestones"):
        ClassificationModule(milestones=(0.5, 2.0))
    with pytest.raises(ValueError, match="momentum"):
        ClassificationModule(momentum=1.0)
    module = ClassificationModule(arch="mlp", num_classes=10, in_channels=1, image_size=8)
    assert module(torch.randn(4, 1, 8, 8)).shape == (4, 10)
