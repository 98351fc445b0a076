"""The shared argument checks: accepted values come back normalised, refused ones raise a
ValueError naming the parameter and what it allows."""

from __future__ import annotations

import math

import pytest

from ec_hooks.validation import check_choice, check_density, check_int, check_size, check_unit_interval


def test_check_int_accepts_and_bounds():
    assert check_int("seed", 3, 0) == 3 and type(check_int("seed", 3, 0)) is int
    assert check_int("bits", 16, 2, 16) == 16
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 16\], got 17"):
        check_int("bits", 17, 2, 16)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        check_int("seed", -1, 0)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
            check_int("seed", bad, 0)


def test_check_size_is_a_count():
    assert check_size("n", 4) == 4
    with pytest.raises(ValueError, match=r"rows must be an integer >= 1, got 0"):
        check_size("rows", 0)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, math.nan, True, "0.5"])
def test_check_unit_interval_refuses_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"consensus_step must be a float in \(0, 1\] \(the eta\)"):
        check_unit_interval("consensus_step", bad, "the eta")


def test_check_unit_interval_none_only_when_allowed():
    assert check_unit_interval("consensus_step", None, allow_none=True) is None
    assert check_unit_interval("consensus_step", 1) == 1.0
    with pytest.raises(ValueError, match=r"must be a float in \(0, 1\], got None"):
        check_unit_interval("consensus_step", None)
    with pytest.raises(ValueError, match=r"must be a float in \(0, 1\] or None, got 2"):
        check_unit_interval("consensus_step", 2, allow_none=True)


def test_check_density_and_choice():
    assert check_density(1) == 1.0
    with pytest.raises(
        ValueError, match=r"density must be in \(0, 1\] \(the fraction of entries kept\), got 0.0"
    ):
        check_density(0)
    with pytest.raises(ValueError, match=r"density must be a float in \(0, 1\]"):
        check_density(False)
    assert check_choice("backend", "cpu", ("auto", "cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'cpu'\], got 'gpu'"):
        check_choice("backend", "gpu", ("auto", "cpu"))
