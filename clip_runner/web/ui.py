"""The demo page at `/ui`: one static HTML file (no build step) that calls `/classify`."""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse

PAGE = Path(__file__).with_name("ui.html")


@functools.cache
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


async def demo_page(_: Request) -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})
