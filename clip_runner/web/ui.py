"""The demo page at `/ui`: one static HTML file (no build step) that calls `/classify`.

It is sent with a Content-Security-Policy that allows its own inline script and style (by their
hashes, so an edit of the page needs no edit here), calls to this server only, previews from
files (`blob:`, `data:`) and image URLs, and no framing by another site: the page has a field
for the API key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse

PAGE = Path(__file__).with_name("ui.html")


@functools.cache
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for each `<tag>...</tag>` block of `html` (attributes-free)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
        for block in blocks
    ]


@functools.cache
def page_headers() -> dict[str, str]:
    html = page_html()
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(inline_hashes(html, "script")),
            "style-src " + " ".join(inline_hashes(html, "style")),
            "connect-src 'self'",
            "img-src 'self' blob: data: http: https:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


async def demo_page(_: Request) -> HTMLResponse:
    return HTMLResponse(page_html(), headers=page_headers())
