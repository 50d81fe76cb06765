"""`require_real_part`: a missing real part skips locally and fails under CI=true."""

from __future__ import annotations

import pytest

from tests.conftest import require_real_part


def test_present_part_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require_real_part("zig", True, "")


def test_missing_part_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="zig is not available: not installed"):
        require_real_part("zig", False, "not installed")


def test_missing_part_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required under CI=true"):
        require_real_part("zig", False, "not installed")
