"""The demo page at `/ui`, driven in a real headless Chromium against the served tiny model.

Debian's `chromium` package (`make test` installs it when root) is launched by Playwright's sync
API; Playwright's own browser downloads are never used. Every number the page shows is checked
against what `POST /classify` answers for the same image and labels. The browser may only talk to
the loopback addresses of the served model and the stand-in image host; anything else is aborted
and fails the test. A screenshot of a successful result is taken on every run, into the test's
temporary folder, or where `UI_SCREENSHOT` names (`make screenshot` refreshes docs/ui.png):
a test run leaves the working tree as it found it.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import (
    GUARD_AUTH,
    GUARD_KEY,
    PUBLIC_HOST,
    encode,
    oriented_exif,
    photo_like,
)

LOCAL_HOSTS = {"127.0.0.1", PUBLIC_HOST}
TYPED_LABELS = ["a red car", "a forest", "a bowl of soup", "a person"]

ROWS_JS = """rows => rows.map(row => {
    const fill = row.querySelector('.bar-fill').getBoundingClientRect();
    const track = row.querySelector('.bar').getBoundingClientRect();
    return {label: row.querySelector('.label').textContent, labelChildren:
            row.querySelector('.label').childElementCount, dataLabel: row.dataset.label,
            score: row.dataset.score, text: row.querySelector('.score').textContent,
            fill: fill.width, track: track.width};
})"""
PREVIEW_LOADED_JS = """() => {
    const img = document.getElementById('preview');
    return !img.hidden && img.complete && img.naturalWidth > 0;
}"""


@contextmanager
def open_page(browser, url: str) -> Iterator[Any]:
    """A fresh page on `url`/ui; off-loopback requests and uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 960, "height": 760})
    outside: list[str] = []
    script_errors: list[str] = []

    def only_loopback(route) -> None:
        url = route.request.url
        if url.startswith("data:") or urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    # What the page's Content-Security-Policy blocked (its script, its style, a call) is told
    # on the console only.
    blocked: list[str] = []
    page.on(
        "console",
        lambda message: blocked.append(message.text) if "Security Policy" in message.text else None,
    )
    response = page.goto(f"{url}/ui")
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    yield page
    context.close()
    assert not outside, f"the page reached beyond loopback: {outside}"
    assert not script_errors, script_errors
    assert not blocked, blocked


@pytest.fixture
def page(browser, served) -> Iterator[Any]:
    with open_page(browser, served.url) as page:
        yield page


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def api_classify(served, image: str, labels: list[str], **extra: Any) -> httpx.Response:
    body = {"images": [image], "labels": labels, **extra}
    return httpx.post(f"{served.url}/classify", json=body, timeout=30)


def classify_in_page(page) -> Any:
    """Click Classify; returns the page's own `/classify` response once the page has shown it."""
    with page.expect_response(lambda r: urlsplit(r.url).path == "/classify") as answer:
        page.click("#classify")
    response = answer.value
    page.wait_for_selector("#classify:not([disabled])")
    return response


def choose_file(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "name => document.getElementById('file-name').textContent === name", arg=path.name
    )


def assert_shows(page, expected: dict) -> None:
    """The bars, labels, order and numbers on the page are exactly the API's answer."""
    ranked = expected["results"][0]
    rows = page.locator(".result-row").evaluate_all(ROWS_JS)
    assert [row["label"] for row in rows] == [item["label"] for item in ranked]
    assert [row["dataLabel"] for row in rows] == [item["label"] for item in ranked]
    assert all(row["labelChildren"] == 0 for row in rows)  # label text, never markup
    for row, item in zip(rows, ranked, strict=True):
        assert float(row["score"]) == pytest.approx(item["score"], abs=1e-6), row
        assert re.fullmatch(r"\d{1,3}\.\d{2}%", row["text"]), row
        assert float(row["text"][:-1]) == pytest.approx(item["score"] * 100, abs=0.005 + 1e-9)
        assert row["track"] > 100, row
        # The bar fills the score's share of its track (to the pixel).
        assert row["fill"] / row["track"] == pytest.approx(item["score"], abs=1.5 / row["track"])
    assert page.text_content("#model") == expected["model"]
    assert page.is_visible("#model-line")
    assert page.is_hidden("#error")


def test_uploaded_image_shows_the_api_scores_as_bars_and_a_bad_file_an_error(
    page, served, tmp_path: Path
) -> None:
    picture = photo_like(320, 240, seed=11)
    png = encode(picture, "PNG")
    photo = tmp_path / "photo.png"
    photo.write_bytes(png)

    choose_file(page, photo)
    page.wait_for_function(PREVIEW_LOADED_JS)
    size = page.eval_on_selector("#preview", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [320, 240]
    page.fill("#labels", ", ".join(TYPED_LABELS))
    response = classify_in_page(page)
    assert response.status == 200
    sent = response.request.post_data_json
    assert sent["labels"] == TYPED_LABELS and "templates" not in sent
    media, _, payload = sent["images"][0].partition(";base64,")
    assert media == "data:image/png" and base64.b64decode(payload) == png

    expected = api_classify(served, data_uri(png, "image/png"), TYPED_LABELS)
    assert expected.status_code == 200, expected.text
    assert len(expected.json()["results"][0]) == len(TYPED_LABELS)
    assert_shows(page, expected.json())
    screenshot = Path(os.environ.get("UI_SCREENSHOT") or tmp_path / "ui.png")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is a text file, not a picture\n" * 20)
    choose_file(page, bad)
    response = classify_in_page(page)
    error = api_classify(served, data_uri(bad.read_bytes(), "image/png"), TYPED_LABELS)
    assert response.status == error.status_code == 422, error.text
    assert error.json()["error"]["type"] == "invalid_image"
    message = error.json()["error"]["message"]
    assert message.startswith("images[0]:")
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#error") == message
    assert page.locator(".result-row").count() == 0
    assert page.is_hidden("#model-line")


def test_dropped_jpeg_with_the_default_labels(page, served) -> None:
    jpeg = encode(photo_like(200, 300, seed=12), "JPEG", quality=90)
    transfer = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            return transfer;
        }""",
        [base64.b64encode(jpeg).decode(), "dropped.jpg"],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_function(PREVIEW_LOADED_JS)
    assert page.text_content("#file-name") == "dropped.jpg"
    labels = [label.strip() for label in page.input_value("#labels").split(",")]
    assert len(labels) >= 2 and all(labels)

    response = classify_in_page(page)
    assert response.status == 200
    assert response.request.post_data_json["images"] == [data_uri(jpeg, "image/jpeg")]
    expected = api_classify(served, data_uri(jpeg, "image/jpeg"), labels)
    assert expected.status_code == 200, expected.text
    assert_shows(page, expected.json())


def test_image_url_with_templates_and_markup_in_a_label(
    page, served, image_server: str, image_dir: Path
) -> None:
    png = encode(photo_like(256, 256, seed=13), "PNG")
    (image_dir / "ui-url-photo.png").write_bytes(png)
    url = f"{image_server}/ui-url-photo.png"
    labels = ["<b>bold</b> & co", "a tree", "a cat"]
    templates = ["a photo of a {}", "a drawing of a {}"]

    page.fill("#url", url)
    page.fill("#labels", ", ".join([*labels, " a cat", "a tree"]))  # each sent once
    page.fill("#templates", "\n".join(templates) + "\n\n")
    response = classify_in_page(page)
    assert response.status == 200
    assert response.request.post_data_json == {
        "images": [url],
        "labels": labels,
        "templates": templates,
    }
    expected = api_classify(served, url, labels, templates=templates)
    assert expected.status_code == 200, expected.text
    assert_shows(page, expected.json())
    page.wait_for_function(PREVIEW_LOADED_JS)
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 256

    missing = f"{image_server}/status/404"
    page.fill("#url", missing)
    response = classify_in_page(page)
    error = api_classify(served, missing, labels, templates=templates)
    assert response.status == error.status_code == 422, error.text
    assert "404" in error.json()["error"]["message"]
    assert page.text_content("#error") == error.json()["error"]["message"]
    assert page.locator(".result-row").count() == 0


def test_missing_input_and_network_failures_are_told_in_words(page) -> None:
    page.click("#classify")
    assert "image" in page.text_content("#error")
    assert page.is_visible("#error")

    page.fill("#url", "http://127.0.0.1:9/cat.png")
    page.fill("#labels", " , ")
    page.click("#classify")
    assert "label" in page.text_content("#error")

    page.fill("#labels", "cat, dog")
    page.route("**/classify", lambda route: route.abort("connectionrefused"))
    page.click("#classify")
    page.wait_for_function(
        "() => document.getElementById('error').textContent.startsWith('Could not reach')"
    )
    assert page.locator(".result-row").count() == 0
    assert page.is_enabled("#classify")


def test_the_api_key_typed_into_the_page_is_sent(browser, guarded, tmp_path: Path) -> None:
    """On the `guarded` server the page loads without a key; classifying needs the one typed."""
    photo = tmp_path / "keyed.png"
    photo.write_bytes(encode(photo_like(120, 90, seed=14), "PNG"))
    with open_page(browser, guarded.url) as page:
        choose_file(page, photo)
        page.fill("#labels", "a cat, a dog")
        refused = classify_in_page(page)
        assert refused.status == 401
        page.wait_for_selector("#error", state="visible")
        said = page.text_content("#error")
        assert "Authorization header is missing" in said and "the API key field" in said

        # A key no server can have (a browser refuses to send it: it had read as the server
        # being unreachable) is told as such, and nothing is sent.
        page.fill("#api-key", "ключ")
        sent: list[str] = []
        page.on("request", lambda request: sent.append(request.url))
        page.click("#classify")
        page.wait_for_function(
            "() => document.getElementById('error').textContent.includes('printable ASCII')"
        )
        assert not [url for url in sent if url.endswith("/classify")]
        # The key field looks like the others (it had the browser's default box).
        style = "e => [getComputedStyle(e).borderRadius, getComputedStyle(e).paddingLeft]"
        assert page.eval_on_selector("#api-key", style) == page.eval_on_selector("#url", style)

        page.fill("#api-key", GUARD_KEY)
        response = classify_in_page(page)
        assert response.status == 200
        assert response.request.headers["authorization"] == f"Bearer {GUARD_KEY}"
        image = response.request.post_data_json["images"][0]
        body = {"images": [image], "labels": ["a cat", "a dog"]}
        expected = httpx.post(f"{guarded.url}/classify", json=body, headers=GUARD_AUTH, timeout=30)
        assert expected.status_code == 200, expected.text
        assert_shows(page, expected.json())


def smooth_picture(width: int, height: int, seed: int, block: int = 8) -> Image.Image:
    """A large photo-like picture, made quickly: smooth waves computed on a grid `block` times
    coarser, each value repeated over its block (48 megapixels of it are a 1-MB JPEG)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : -(-height // block), 0 : -(-width // block)].astype(np.float32) * block
    base = rng.uniform(0, 255, size=3)
    freq = rng.uniform(0.0005, 0.004, size=3)
    channels = [127 + 120 * np.sin(x * freq[c] + y * freq[(c + 1) % 3] + base[c]) for c in range(3)]
    small = np.stack(channels, axis=-1).astype(np.uint8)
    pixels = small.repeat(block, axis=0).repeat(block, axis=1)[:height, :width]
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-sized RGB images, per channel value (0-255)."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def classify_a_copy(
    page, served, path: Path, labels: list[str], size: tuple[int, int]
) -> tuple[int, Image.Image]:
    """Choose `path` and classify it: the page sent (and says it sent) a JPEG copy of this size
    with no EXIF orientation, and shows what the API answers for that copy. Returns the size of
    the request's body and the copy."""
    choose_file(page, path)
    page.wait_for_function(PREVIEW_LOADED_JS)
    page.fill("#labels", ", ".join(labels))
    response = classify_in_page(page)
    assert response.status == 200
    sent = response.request.post_data_json["images"][0]
    media, _, payload = sent.partition(";base64,")
    assert media == "data:image/jpeg"
    copy = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert copy.format == "JPEG" and copy.mode == "RGB"
    assert copy.size == size
    assert copy.getexif().get(0x0112) in (None, 1)  # no orientation left for the server to apply
    note = page.text_content("#file-note")
    assert note.startswith(f"Sent as a {copy.width} × {copy.height} copy"), note
    assert page.eval_on_selector("#preview", "i => [i.naturalWidth, i.naturalHeight]") == list(
        copy.size
    )
    expected = api_classify(served, sent, labels)
    assert expected.status_code == 200, expected.text
    assert_shows(page, expected.json())
    return len(response.request.post_data_buffer), copy


@pytest.mark.parametrize("typed", ["s3://bucket/key.jpg", "not a url", "ftp://host/x.png"])
def test_a_url_the_browser_cannot_show_is_not_previewed(page, typed: str) -> None:
    """An s3:// URL (the server fetches it) or a mistyped one: no preview, so no request the
    page's policy blocks (a console report had followed each) and none to the server for
    `/not%20a%20url`."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.fill("#url", typed)
    page.dispatch_event("#url", "change")
    page.wait_for_timeout(300)
    assert page.is_hidden("#preview")
    assert not [url for url in requested if "not%20a%20url" in url or "key.jpg" in url]


def test_a_photo_over_the_body_limit_is_sent_as_a_smaller_copy(
    page, served, tmp_path: Path
) -> None:
    """A 2048x1536 photo of 7 MB (a phone's, in bytes) is more than the server takes in one
    body once base64-encoded; the page sends a 1024x768 JPEG of it instead."""
    noise = np.random.default_rng(15).integers(0, 256, size=(1536, 2048, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise, "RGB"), "JPEG", quality=95, subsampling=0)
    refused = api_classify(served, data_uri(jpeg, "image/jpeg"), TYPED_LABELS)
    assert refused.status_code == 413, refused.text
    limit = re.search(r"the (\d+)-byte request limit", refused.json()["error"]["message"])
    assert limit, refused.text
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(jpeg)

    body_bytes, copy = classify_a_copy(page, served, photo, TYPED_LABELS, (1024, 768))
    assert body_bytes < int(limit[1])
    # A small file still goes as it is, byte for byte, and the note goes with the copy.
    small = tmp_path / "small.jpg"
    small.write_bytes(encode(photo_like(200, 150, seed=16), "JPEG", quality=90))
    choose_file(page, small)
    assert page.text_content("#file-note") == ""
    response = classify_in_page(page)
    assert response.request.post_data_json["images"] == [data_uri(small.read_bytes(), "image/jpeg")]


def test_a_photo_over_the_pixel_limit_is_sent_as_a_smaller_copy(
    page, served, tmp_path: Path
) -> None:
    """An 8000x6000 JPEG (1 MB: within the body limit) has more pixels than the server decodes;
    the page sends a 1024x768 JPEG of it instead."""
    jpeg = encode(smooth_picture(8000, 6000, seed=17), "JPEG", quality=80)
    refused = api_classify(served, data_uri(jpeg, "image/jpeg"), TYPED_LABELS)
    assert refused.status_code == 422, refused.text
    limit = re.search(r"8000x6000, more than the (\d+)-pixel limit", refused.text)
    assert limit, refused.text
    photo = tmp_path / "48mp.jpg"
    photo.write_bytes(jpeg)

    _, copy = classify_a_copy(page, served, photo, TYPED_LABELS, (1024, 768))
    assert copy.width * copy.height < int(limit[1])
    # A panorama's copy keeps 448 pixels on its shorter side (2x what CLIP resizes it to).
    panorama = tmp_path / "panorama.jpg"
    panorama.write_bytes(encode(smooth_picture(6000, 500, seed=23), "JPEG", quality=85))
    classify_a_copy(page, served, panorama, TYPED_LABELS, (5376, 448))


def test_the_copy_is_upright_and_transparency_white_as_the_server_sees_them(
    page, served, tmp_path: Path
) -> None:
    """A phone's photo is stored on its side with an EXIF orientation, which the server applies:
    the copy is turned upright (a canvas writes no orientation to apply twice). Transparent
    pixels are composited onto white, as the server does, not the black a JPEG gets otherwise."""
    stored = smooth_picture(3000, 2000, seed=18)
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(encode(stored, "JPEG", quality=85, exif=oriented_exif(stored, 6)))
    upright = ImageOps.exif_transpose(Image.open(rotated))
    assert upright.size == (2000, 3000)

    _, copy = classify_a_copy(page, served, rotated, TYPED_LABELS, (683, 1024))
    expected = upright.resize(copy.size, Image.Resampling.BOX)
    turned_wrong = expected.rotate(180)  # what orientation 8 (the other quarter turn) would give
    assert mean_difference(copy, expected) < 4
    assert mean_difference(copy, turned_wrong) > 20

    rgba = smooth_picture(2400, 1600, seed=19).convert("RGBA")
    alpha = np.zeros((1600, 2400), dtype=np.uint8)
    alpha[:, 1200:] = 255  # the left half transparent, the right half opaque
    rgba.putalpha(Image.fromarray(alpha, "L"))
    cutout = tmp_path / "cutout.png"
    cutout.write_bytes(encode(rgba, "PNG", compress_level=1))
    on_white = Image.new("RGB", rgba.size, (255, 255, 255))
    on_white.paste(rgba, (0, 0), rgba)

    _, copy = classify_a_copy(page, served, cutout, TYPED_LABELS, (1024, 683))
    assert mean_difference(copy, on_white.resize(copy.size, Image.Resampling.BOX)) < 4
    assert np.asarray(copy)[:, :500].min() >= 245  # white, where a plain JPEG would be black


def test_a_file_the_browser_cannot_decode_is_sent_as_it_is(page, served, tmp_path: Path) -> None:
    """Chromium reads no TIFF: the page cannot tell its size, so it sends the file and the server
    (which reads TIFF) answers for it."""
    tiff = encode(photo_like(2100, 40, seed=20), "TIFF")
    photo = tmp_path / "scan.tiff"
    photo.write_bytes(tiff)
    choose_file(page, photo)
    page.fill("#labels", ", ".join(TYPED_LABELS))
    response = classify_in_page(page)
    assert response.status == 200
    assert response.request.post_data_json["images"] == [data_uri(tiff, "image/tiff")]
    assert page.text_content("#file-note") == ""
    expected = api_classify(served, data_uri(tiff, "image/tiff"), TYPED_LABELS)
    assert expected.status_code == 200, expected.text
    assert_shows(page, expected.json())


def test_an_answer_for_a_replaced_image_is_not_shown(page, served, tmp_path: Path) -> None:
    """The page's request for one image is held back until another image has been chosen: the
    page cancels it, shows no answer for it beside the new image, and classifies the new one."""
    from playwright.sync_api import Error as PlaywrightError

    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(encode(photo_like(160, 120, seed=21), "PNG"))
    second.write_bytes(encode(photo_like(120, 160, seed=22), "PNG"))
    choose_file(page, first)
    held: list[Any] = []
    settled: list[Any] = []

    def is_classify(request) -> bool:
        return urlsplit(request.url).path == "/classify"

    page.on(
        "requestfinished", lambda request: settled.append(request) if is_classify(request) else 0
    )
    page.on("requestfailed", lambda request: settled.append(request) if is_classify(request) else 0)
    page.route("**/classify", lambda route: held.append(route))
    page.click("#classify")
    wait_until(page, lambda: held)
    assert page.is_disabled("#classify")

    choose_file(page, second)
    page.unroute("**/classify")
    try:  # on to the server now (and its answer back to the page)
        held[0].continue_()
    except PlaywrightError as error:  # unless the page has cancelled it already
        assert "already handled" in error.message, error.message
    wait_until(page, lambda: settled)
    page.wait_for_selector("#classify:not([disabled])")
    assert page.locator(".result-row").count() == 0
    assert page.is_hidden("#model-line") and page.is_hidden("#error")
    assert page.text_content("#file-name") == "second.png"
    assert settled[0].failure == "net::ERR_ABORTED"  # cancelled: the server has no work for it

    page.fill("#labels", ", ".join(TYPED_LABELS))
    response = classify_in_page(page)
    assert response.status == 200
    sent = response.request.post_data_json["images"]
    assert sent == [data_uri(second.read_bytes(), "image/png")]
    expected = api_classify(served, sent[0], TYPED_LABELS)
    assert expected.status_code == 200, expected.text
    assert_shows(page, expected.json())


def wait_until(page, condition, timeout_s: float = 30) -> None:
    """Let the page run (and Playwright deliver its events) until `condition()` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        page.wait_for_timeout(20)
