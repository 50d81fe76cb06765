"""The Swagger UI at /docs renders in a real headless browser with no internet."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from spear.node import NodeHandle
from tests.conftest import require_real_part

pytestmark = pytest.mark.browser

# Flags that keep Chromium off the network (DESIGN: no internet) and quiet as root in CI.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require_real_part("chromium", path is not None, "headless chromium is not installed")
    assert path is not None
    return path


async def test_swagger_ui_renders_every_operation(node: NodeHandle, tmp_path: Path) -> None:
    browser = chromium()
    argv = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = await trio.run_process(
        [*argv, "--dump-dom", f"{node.http_url}/docs"], capture_stdout=True, capture_stderr=True
    )
    html = dom.stdout.decode()
    # Swagger UI built these from /api/openapi.json in the browser: the page really rendered.
    assert 'class="swagger-ui"' in html
    assert "opblock" in html
    for path in (
        "/api/v1/tasks/{task}/invoke",
        "/api/v1/files",
        "/api/v1/executions/{execution_id}",
    ):
        assert path.replace("{", "").replace("}", "") in html.replace("{", "").replace("}", "")
    await trio.run_process(
        [
            *argv,
            f"--screenshot={tmp_path / 'docs.png'}",
            "--window-size=1280,2000",
            f"{node.http_url}/docs",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert (tmp_path / "docs.png").stat().st_size > 10_000
