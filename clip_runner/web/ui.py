"""The demo page at `/ui`: one static HTML file (no build step) that calls `/classify`.

It (and the API documentation's page, `docs.html`) is sent with a Content-Security-Policy
that allows its own inline script and style (by their hashes, so an edit of the page needs no
edit here), calls to this server only, previews from files (`blob:`, `data:`) and image URLs,
and no framing by another site: the page has a field for the API key.
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
def page_html(name: str = "ui.html") -> str:
    """One of this folder's static pages (the demo page, the API documentation's)."""
    return PAGE.with_name(name).read_text(encoding="utf-8")


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for each `<tag>...</tag>` block of `html` (attributes-free)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
        for block in blocks
    ]


@functools.cache
def page_headers(
    name: str = "ui.html",
    scripts: str = "",
    styles: str = "",
    images: str = "'self' blob: data: http: https:",
) -> dict[str, str]:
    """The headers a static page is sent with: a policy allowing its own inline scripts and
    styles (and the sources `scripts` and `styles` name besides), calls to this server only,
    and images from `images` (the demo page previews image URLs from anywhere)."""
    html = page_html(name)
    policy = "; ".join(
        [
            "default-src 'none'",
            " ".join(filter(None, ["script-src", scripts, *inline_hashes(html, "script")])),
            " ".join(filter(None, ["style-src", styles, *inline_hashes(html, "style")])),
            "connect-src 'self'",
            f"img-src {images}",
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
