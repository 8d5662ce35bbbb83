"""scripts/classify.py: its pure functions, its retry/split logic against a scripted transport,
and the command itself as a subprocess against a real `bentoml serve` of the tiny model.

The CLI's answers are checked against `POST /classify` called directly with the same images, so a
batching, ordering or encoding mistake in the client shows up as a wrong score or label. Only
127.0.0.1 (the server) and 127.0.0.2 (the image host) are contacted.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import GUARD_KEY, REPO_ROOT, encode, free_port, photo_like

SCRIPT = REPO_ROOT / "scripts" / "classify.py"
_SPEC = importlib.util.spec_from_file_location("classify_cli", SCRIPT)
assert _SPEC is not None and _SPEC.loader is not None
cli = importlib.util.module_from_spec(_SPEC)
sys.modules["classify_cli"] = cli  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(cli)

LABELS = ["cat", "dog", "person with a bag"]


# ------------------------------------------------------------------------- pure functions


def test_parse_labels_splits_trims_and_drops_empties_and_repeats():
    assert cli.parse_labels([" cat, dog,,cat ", "person with a bag", ","]) == LABELS
    assert cli.parse_labels([", ,"]) == []


@pytest.mark.parametrize("n_bytes", [0, 1, 2, 3, 4, 5, 6, 7, 1000, 1001, 1002])
def test_base64_length_is_the_encoded_length(n_bytes):
    assert cli.base64_length(n_bytes) == len(base64.b64encode(bytes(n_bytes)))


def test_make_batches_respects_the_item_limit_and_keeps_order():
    assert cli.make_batches([10] * 5, max_items=2, max_bytes=10_000) == [[0, 1], [2, 3], [4]]


def test_make_batches_counts_the_commas_between_items():
    # two items of 4 bytes make `"..","..` = 4 + 1 + 4 = 9 bytes
    assert cli.make_batches([4, 4, 4], max_items=8, max_bytes=9) == [[0, 1], [2]]
    assert cli.make_batches([4, 4, 4], max_items=8, max_bytes=8) == [[0], [1], [2]]


def test_make_batches_gives_an_oversized_item_its_own_batch():
    assert cli.make_batches([3, 50, 3], max_items=8, max_bytes=10) == [[0], [1], [2]]
    assert cli.make_batches([], max_items=8, max_bytes=10) == []


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=100), max_size=60),
    max_items=st.integers(min_value=1, max_value=10),
    max_bytes=st.integers(min_value=100, max_value=400),
)
def test_make_batches_fills_each_batch_greedily_within_both_limits(sizes, max_items, max_bytes):
    batches = cli.make_batches(sizes, max_items, max_bytes)
    assert [i for batch in batches for i in batch] == list(range(len(sizes)))

    def cost(batch: list[int]) -> int:
        return sum(sizes[i] for i in batch) + len(batch) - 1

    for batch, following in zip(batches, batches[1:], strict=False):
        assert len(batch) <= max_items and cost(batch) <= max_bytes
        # the next item did not fit: batches are as full as the limits allow
        assert len(batch) == max_items or cost([*batch, following[0]]) > max_bytes
    if batches:
        assert len(batches[-1]) <= max_items and cost(batches[-1]) <= max_bytes


def test_payload_sizes_add_up_to_the_exact_body_length(tmp_path):
    """The byte budget is only right if each image's size is what it adds to the real body."""
    sources = []
    for n_bytes in (0, 1, 2, 3, 1000, 4097):
        path = tmp_path / f"f{n_bytes}.bin"
        path.write_bytes(bytes(range(256)) * (n_bytes // 256) + bytes(n_bytes % 256))
        sources.append(cli.Source(name=str(path), path=path))
    sources.append(cli.Source(name="u", url='http://127.0.0.2/a b"c?x=1&y=\u00e9'))
    base = cli.request_body(LABELS, ["a photo of a {}", "art of a {name}"], 2)
    overhead = len(cli.encode_body(base))
    body = cli.encode_body({**base, "images": [source.payload() for source in sources]})
    sizes = [source.payload_size() for source in sources]
    assert len(body) == overhead + sum(sizes) + len(sizes) - 1
    assert json.loads(body)["images"][0] == ""  # an empty file is sent (the server judges it)


def test_folder_images_are_sorted_filtered_and_recursive_only_when_asked(tmp_path):
    for name in ["b.png", "a.JPG", ".hidden.png", "notes.txt", "sub/c.webp", ".git/d.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    flat = cli.folder_images(tmp_path, recursive=False)
    assert [s.path.relative_to(tmp_path).as_posix() for s in flat] == ["a.JPG", "b.png"]
    deep = cli.folder_images(tmp_path, recursive=True)
    assert [s.path.relative_to(tmp_path).as_posix() for s in deep] == [
        "a.JPG",
        "b.png",
        "sub/c.webp",
    ]
    assert deep[0] == cli.Source(name=str(tmp_path / "a.JPG"), path=tmp_path / "a.JPG")


def test_a_subfolder_that_cannot_be_listed_fails_the_run_by_name(tmp_path, monkeypatch):
    """os.walk skipped it silently and the run said every image was classified (exit 0). The
    permission error is made here: as root (CI) a mode-000 folder is listed all the same."""
    for name in ["a.png", "locked/b.png", "open/c.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", path)
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = cli.folder_images(tmp_path, recursive=True)
    assert [s.name for s in found] == [str(tmp_path / n) for n in ["a.png", "locked", "open/c.png"]]
    assert found[1].unread == "Permission denied"
    server = ScriptedServer()
    outcomes, stopped, _ = scripted_run(server, found)
    assert stopped is None and "results" in outcomes[0] and "results" in outcomes[2]
    assert outcomes[1]["error"] == {
        "type": "unreadable_file",
        "message": "folder not listed: Permission denied",
    }
    assert sum(map(len, server.requests)) == 2  # nothing of it is sent


def test_a_named_pipe_in_a_folder_is_not_an_image(tmp_path):
    """Reading a FIFO named like an image had blocked the run for good."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")  # reported as unreadable
    found = [s.path.name for s in cli.folder_images(tmp_path, recursive=False)]
    assert found == ["a.png", "gone.png", "link.png"]


def test_collect_sources_keeps_argument_order_and_kinds(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.png").write_bytes(b"x")
    odd = tmp_path / "photo.unknown"
    odd.write_bytes(b"x")
    sources, folder_given = cli.collect_sources(
        [str(odd), "HTTPS://127.0.0.2/a.png", str(tmp_path / "dir")]
    )
    assert folder_given
    assert [s.name for s in sources] == [
        str(odd),
        "HTTPS://127.0.0.2/a.png",
        str(tmp_path / "dir" / "x.png"),
    ]
    assert sources[0].path == odd and sources[1].url == "HTTPS://127.0.0.2/a.png"
    assert cli.collect_sources([str(odd)]) == ([cli.Source(name=str(odd), path=odd)], False)


def test_collect_sources_refuses_missing_paths_and_imageless_folders(tmp_path):
    with pytest.raises(cli.UsageError, match="nope.jpg: no such file"):
        cli.collect_sources([str(tmp_path / "nope.jpg")])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.png").write_bytes(b"x")
    with pytest.raises(cli.UsageError, match="no image files.*--recursive"):
        cli.collect_sources([str(tmp_path / "empty")])
    assert len(cli.collect_sources([str(tmp_path / "empty")], recursive=True)[0]) == 1


def test_a_data_uri_or_an_s3_url_is_sent_as_it_is(tmp_path):
    """The server takes both; a data: URI had been looked up as a file (a traceback for one
    past 255 characters: File name too long), an s3:// URL refused as missing."""
    data = "data:image/png;base64," + "A" * 400
    sources, _ = cli.collect_sources([data, "s3://bucket/cat.jpg", "S3://b/k"])
    assert [(s.url, s.path) for s in sources] == [
        (data, None),
        ("s3://bucket/cat.jpg", None),
        ("S3://b/k", None),
    ]
    digest = hashlib.sha256(data.encode()).hexdigest()[:8]
    assert sources[0].name == (
        f"data:image/png;base64,AAAAAAAAAAAAAAAAAA... (422 characters, {digest})"
    )
    other = data[:-1] + "B"  # another image of the same length: told apart
    assert cli.collect_sources([other])[0][0].name != sources[0].name


def test_a_file_named_like_a_data_uri_is_a_file(tmp_path, monkeypatch):
    """A data: URI has a comma; `data:cat.png` had been sent as a malformed one."""
    monkeypatch.chdir(tmp_path)
    Path("data:cat.png").write_bytes(b"x")
    sources, _ = cli.collect_sources(["data:cat.png"])
    assert sources == [cli.Source(name="data:cat.png", path=Path("data:cat.png"))]


def test_a_path_that_cannot_be_looked_at_is_a_usage_error_or_fails_alone(tmp_path, monkeypatch):
    """Path.is_dir and is_file raise for a name too long and for a folder that cannot be
    searched, which had ended the run in a traceback. The first is no such file (exit 2), the
    second an unreadable file, reported with the rest."""
    with pytest.raises(cli.UsageError, match="x{300}.jpg: no such file or folder"):
        cli.collect_sources([str(tmp_path / ("x" * 300 + ".jpg"))])
    looked_at = Path.stat

    def stat(path, **kwargs):
        if path.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return looked_at(path, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    locked = tmp_path / "locked" / "a.jpg"
    sources, _ = cli.collect_sources([str(locked)])
    assert sources == [cli.Source(name=str(locked), path=locked)]
    outcomes, _, _ = scripted_run(ScriptedServer(), sources)
    assert outcomes[0]["error"] == {"type": "unreadable_file", "message": "Permission denied"}


def test_control_characters_in_names_and_messages_are_escaped(tmp_path):
    """A newline in a file name had broken the table, and an escape sequence reached the
    terminal (`\\x1b[2J` clears it)."""
    odd = tmp_path / "a\nb\x1b[2J.png"
    odd.write_bytes(b"x")
    name = cli.shown_name(odd)
    assert name.endswith("a\\x0ab\\x1b[2J.png") and name.isprintable()
    failed = cli.failure("bad\x07type", "images[0]: line\nbreak")
    assert failed == {"error": {"type": "bad\\x07type", "message": "line\\x0abreak"}}
    assert cli.printable("café ✓") == "café ✓"
    # a right-to-left override prints "cat\u202egnp.exe" as "catexe.png"
    assert cli.printable("cat\u202egnp.exe") == "cat\\u202egnp.exe"
    assert cli.printable("cat\u061cgnp.exe") == "cat\\u061cgnp.exe"  # Arabic letter mark


def test_an_answer_whose_ranked_labels_are_not_label_scores_is_a_bad_answer():
    """A 200 from some other server whose results held strings had crashed the table."""
    odd = (200, {"model": "m", "results": [["cat"]]}, {})
    outcomes, _, _ = scripted_run(ScriptedServer(odd), urls("a"))
    assert outcomes[0]["error"]["type"] == "bad_answer"
    refusal = {"error": {"type": "invalid_image", "message": {"nested": 1}, "index": 0}}
    outcomes, _, _ = scripted_run(ScriptedServer((422, refusal, {})), urls("a", "b"))
    assert outcomes[0]["error"]["message"] == "{'nested': 1}"  # had been a TypeError


def test_strip_image_index_only_removes_the_leading_request_index():
    assert cli.strip_image_index("images[12]: not a decodable image") == "not a decodable image"
    assert cli.strip_image_index("labels[0]: images[1]: x") == "labels[0]: images[1]: x"


def test_retry_delay_honours_retry_after_and_backs_off_otherwise():
    assert cli.retry_delay("3", attempt=0) == 3
    assert cli.retry_delay(None, attempt=0) == 1
    assert cli.retry_delay(None, attempt=2) == 4
    assert cli.retry_delay("garbage", attempt=1) == 2
    assert cli.retry_delay("3600", attempt=0) == cli.MAX_RETRY_WAIT_S
    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:13:25 GMT"  # now + 5 s
    assert cli.retry_delay(date, attempt=0, now=now) == pytest.approx(5)
    assert cli.retry_delay(date, attempt=0, now=now + 60) == 0


def test_format_table_aligns_rows_and_shows_errors_in_place():
    outcomes = [
        {
            "image": "photos/cat.jpg",
            "results": [{"label": "cat", "score": 0.91234}, {"label": "dog", "score": 0.08766}],
        },
        {"image": "b.png", "results": [{"label": "person with a bag", "score": 0.5}]},
        {"image": "bad.jpg", "error": {"type": "invalid_image", "message": "not an image"}},
    ]
    lines = cli.format_table(outcomes).splitlines()
    assert lines[0].split() == ["image", "label", "score", "others"]
    assert lines[1].split() == ["photos/cat.jpg", "cat", "0.9123", "dog", "0.0877"]
    assert lines[2].split()[-1] == "0.5000"
    assert lines[3] == f"{'bad.jpg':<14}  error: invalid_image: not an image"
    # the score column starts at the same offset in every row
    assert lines[1].index("0.9123") == lines[2].index("0.5000") == lines[0].index("score")
    assert lines[1].index("dog") == lines[0].index("others")
    single = cli.format_table(outcomes[1:2]).splitlines()
    assert "others" not in single[0]


def test_summary_names_the_failed_images():
    outcomes = [{"image": "a.png", "results": []}] + [
        {"image": f"bad{i}.png", "error": {"type": "x", "message": "y"}} for i in range(7)
    ]
    line = cli.summary(outcomes, "clip:abc", 1.25)
    assert line.startswith("classified 1 of 8 images with clip:abc in 1.2 s; 7 failed: ")
    assert "bad0.png, bad1.png, bad2.png, bad3.png, bad4.png and 2 more" in line


# ------------------------------------------------------------------------- retry and split logic


class ScriptedServer:
    """An httpx transport answering from a script: each call pops the next (status, body,
    headers), or computes a 200 from the request; records every request's images."""

    def __init__(self, *answers: tuple[int, Any, dict[str, str]] | None) -> None:
        self.answers = list(answers)
        self.requests: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        images = json.loads(request.content)["images"]
        self.requests.append(images)
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            results = [
                [{"label": "cat", "score": 1.0}, {"label": image, "score": 0.0}] for image in images
            ]
            return httpx.Response(200, json={"model": "clip:test", "results": results})
        status, body, headers = answer
        return httpx.Response(status, json=body, headers=headers)


def scripted_run(server, sources, batch_size=8, max_body_bytes=10_000, retries=2):
    sleeps: list[float] = []
    client = httpx.Client(transport=httpx.MockTransport(server), timeout=5)
    classifier = cli.Classifier(
        client, "http://127.0.0.1:1", ["cat"], retries=retries, sleep=sleeps.append
    )
    outcomes, stopped = cli.run(classifier, sources, batch_size, max_body_bytes)
    return outcomes, stopped, sleeps


def urls(*names: str) -> list[Any]:
    return [cli.Source(name=name, url=f"http://127.0.0.2/{name}") for name in names]


def classified_as(outcome: dict[str, Any]) -> str:
    """The scripted server echoes each image as its second label."""
    return outcome["results"][1]["label"]


def test_busy_answers_are_retried_after_retry_after():
    busy = {"error": {"type": "too_many_requests", "message": "busy"}}
    server = ScriptedServer((429, busy, {"Retry-After": "2"}), (503, busy, {}))
    outcomes, stopped, sleeps = scripted_run(server, urls("a", "b"))
    assert stopped is None and sleeps == [2.0, 2.0]  # Retry-After, then backoff 2^1
    assert [classified_as(o) for o in outcomes] == ["http://127.0.0.2/a", "http://127.0.0.2/b"]
    assert len(server.requests) == 3


def test_a_server_taking_fewer_images_per_request_gets_halves():
    """A server whose CLIP_MAX_IMAGES_PER_REQUEST is under the batch size had stopped the run
    (exit 2); its 422 about the image list now halves the batch, as a 413 does."""
    fewer = {
        "error": {
            "type": "invalid_request",
            "message": "images: List should have at most 2 items after validation, not 4",
        }
    }
    server = ScriptedServer((422, fewer, {}))
    outcomes, stopped, _ = scripted_run(server, urls("a", "b", "c", "d"), batch_size=4)
    assert stopped is None
    assert [classified_as(o) for o in outcomes] == [f"http://127.0.0.2/{n}" for n in "abcd"]
    assert [len(images) for images in server.requests] == [4, 2, 2]


def test_busy_until_retries_run_out_fails_that_batch_only():
    busy = (503, {"error": {"type": "overloaded", "message": "queue full"}}, {})
    server = ScriptedServer(busy, busy, busy)
    outcomes, stopped, sleeps = scripted_run(server, urls("a", "b", "c"), batch_size=2)
    assert stopped is None and sleeps == [1.0, 2.0]
    assert outcomes[0]["error"] == {"type": "overloaded", "message": "queue full", "status": 503}
    assert outcomes[1]["error"]["type"] == "overloaded"
    assert classified_as(outcomes[2]) == "http://127.0.0.2/c"


def test_one_bad_image_fails_alone_and_its_neighbours_are_resent():
    bad = {"error": {"type": "invalid_image", "message": "images[1]: HTTP 404", "index": 1}}
    server = ScriptedServer((422, bad, {}))
    outcomes, stopped, _ = scripted_run(server, urls("a", "b", "c"))
    assert server.requests == [
        ["http://127.0.0.2/a", "http://127.0.0.2/b", "http://127.0.0.2/c"],
        ["http://127.0.0.2/a", "http://127.0.0.2/c"],
    ]
    assert outcomes[1] == {
        "image": "b",
        "error": {"type": "invalid_image", "message": "HTTP 404", "status": 422},
    }
    assert [classified_as(outcomes[i]) for i in (0, 2)] == [
        "http://127.0.0.2/a",
        "http://127.0.0.2/c",
    ]


def test_a_413_halves_the_batch_and_a_lone_image_keeps_the_error():
    too_large = (413, {"error": {"type": "payload_too_large", "message": "too big"}}, {})
    server = ScriptedServer(too_large, None, too_large, too_large)
    outcomes, _, _ = scripted_run(server, urls("a", "b", "c", "d"))
    assert [len(images) for images in server.requests] == [4, 2, 2, 1, 1]
    assert [("error" in o) for o in outcomes] == [False, False, True, False]
    assert outcomes[2]["error"]["type"] == "payload_too_large"


def test_files_too_large_for_the_body_limit_are_not_sent(tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    small.write_bytes(b"s" * 100)
    large.write_bytes(b"L" * 3000)
    server = ScriptedServer()
    sources = [cli.Source(name=str(p), path=p) for p in (large, small)]
    outcomes, _, _ = scripted_run(server, sources, max_body_bytes=1000)
    assert server.requests == [[base64.b64encode(b"s" * 100).decode()]]
    assert outcomes[0]["error"]["type"] == "too_large" and "results" in outcomes[1]


def test_a_request_level_refusal_stops_the_run():
    refused = {"error": {"type": "invalid_request", "message": "templates[0]: no {name}"}}
    server = ScriptedServer((422, refused, {}))
    with pytest.raises(cli.RunRefused) as caught:
        scripted_run(server, urls("a", "b"))
    assert caught.value.status == 422 and "templates[0]" in caught.value.error["message"]


@pytest.mark.parametrize(
    ("status", "error_type", "tries"), [(429, "too_many_requests", 3), (408, "body_timeout", 1)]
)
def test_busy_or_slow_until_retries_run_out_fails_that_batch_only(status, error_type, tries):
    """A 429 after its retries (or a 408, not retried) is the batch's failure, as a 503 is: the
    run had stopped there and printed nothing of what it had classified."""
    answer = (status, {"error": {"type": error_type, "message": "no"}}, {})
    server = ScriptedServer(None, *[answer] * tries)
    outcomes, stopped, _ = scripted_run(server, urls("a", "b", "c"), batch_size=1)
    assert stopped is None
    assert classified_as(outcomes[0]) == "http://127.0.0.2/a"
    assert outcomes[1]["error"] == {"type": error_type, "message": "no", "status": status}
    assert classified_as(outcomes[2]) == "http://127.0.0.2/c"


def test_a_refusal_after_the_first_answers_keeps_them_and_marks_the_rest_not_sent():
    refused = (401, {"error": {"type": "unauthorized", "message": "key changed"}}, {})
    server = ScriptedServer(None, refused)
    outcomes, stopped, _ = scripted_run(server, urls("a", "b", "c"), batch_size=1)
    assert stopped == "the server refused a request (HTTP 401): key changed"
    assert classified_as(outcomes[0]) == "http://127.0.0.2/a"
    assert [o["error"]["type"] for o in outcomes[1:]] == ["not_sent", "not_sent"]


def test_names_that_are_not_utf8_are_shown_escaped(tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.png")
    (folder / latin1).write_bytes(b"png")
    sources, _ = cli.collect_sources([str(folder)], recursive=False)
    assert sources[0].name == str(folder / "caf\\xe9.png")
    assert sources[0].name.encode("utf-8")  # printable, and valid JSON text
    assert sources[0].path == folder / latin1  # the file itself is still read


def test_an_unreachable_server_stops_the_run_and_marks_the_rest_not_sent():
    def handler(request: httpx.Request) -> httpx.Response:
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        calls.append(request)
        return ScriptedServer()(request)

    calls: list[httpx.Request] = []
    outcomes, stopped, _ = scripted_run(handler, urls("a", "b", "c"), batch_size=1)
    assert stopped is not None and "cannot reach the server" in stopped
    assert "results" in outcomes[0]
    assert [o["error"]["type"] for o in outcomes[1:]] == ["not_sent", "not_sent"]


# ------------------------------------------------------------------------- the command, for real


def run_cli(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def classify_directly(served, images: list[str], **fields: Any) -> list[list[dict[str, Any]]]:
    body = {"images": images, "labels": LABELS, **fields}
    response = httpx.post(f"{served.url}/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(images)
    return results


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same_ranking(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [item["label"] for item in got] == [item["label"] for item in want]
    np.testing.assert_allclose(
        [item["score"] for item in got], [item["score"] for item in want], rtol=0, atol=1e-6
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """a.png, b.jpg, c.webp at the top, sub/d.png below: different sizes, formats and seeds."""
    root = tmp_path_factory.mktemp("cli-photos")
    (root / "sub").mkdir()
    specs = [("a.png", "PNG", 96), ("b.jpg", "JPEG", 97), ("c.webp", "WEBP", 98)]
    specs.append(("sub/d.png", "PNG", 99))
    for name, fmt, seed in specs:
        (root / name).write_bytes(encode(photo_like(160 + seed, 120, seed=seed), fmt))
    return root


def test_files_folder_and_url_in_json_equal_classify_called_directly(
    served, photos, tmp_path, image_dir, image_server
):
    single = tmp_path / "single.png"
    single.write_bytes(encode(photo_like(200, 150, seed=95)))
    (image_dir / "cli-url.png").write_bytes(encode(photo_like(140, 210, seed=94)))
    url = f"{image_server}/cli-url.png"
    templates = ["a photo of a {}.", "art of the {name}"]
    result = run_cli(
        *("--labels", ",".join(LABELS[:2]), "--labels", LABELS[2]),
        *("--template", templates[0], "--template", templates[1], "--top-k", "2"),
        *("--batch-size", "2", "--recursive", "--json", "--url", served.url),
        single,
        photos,
        url,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # nothing else on stdout: the bar went to stderr
    folder = [photos / name for name in ("a.png", "b.jpg", "c.webp", "sub/d.png")]
    assert [entry["image"] for entry in document] == [str(single), *map(str, folder), url]
    direct = classify_directly(
        served,
        [b64(single), *map(b64, folder), url],
        templates=templates,
        top_k=2,
    )
    for entry, want in zip(document, direct, strict=True):
        assert set(entry) == {"image", "results"}
        assert len(entry["results"]) == 2
        assert_same_ranking(entry["results"], want)
    # a folder turns the progress bar on even though stderr is a pipe
    assert re.search(r"\d+/6 ", result.stderr), result.stderr
    assert "classified 6 of 6 images with clip:" in result.stderr


def test_table_lists_each_image_with_its_labels_and_scores(served, photos):
    files = [photos / "a.png", photos / "b.jpg"]
    result = run_cli("--labels", ",".join(LABELS), "--url", served.url, "--no-progress", *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", "label", "score", "others"]
    direct = classify_directly(served, [b64(path) for path in files])
    for line, path, ranked in zip(lines[1:], files, direct, strict=True):
        top, *others = ranked
        expected = f"{top['label']} {top['score']:.4f}   " + ", ".join(
            f"{item['label']} {item['score']:.4f}" for item in others
        )
        assert line.startswith(str(path)) and re.sub(r" +", " ", line).endswith(
            re.sub(r" +", " ", expected)
        ), (line, expected)
    assert len(lines) == 3
    assert "/2 [" not in result.stderr  # --no-progress


@pytest.mark.parametrize("as_json", [True, False])
def test_a_bad_file_fails_alone_and_is_named(served, photos, tmp_path, as_json):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [folder / "1.png", folder / "3.png"]
    good[0].write_bytes((photos / "a.png").read_bytes())
    good[1].write_bytes((photos / "sub" / "d.png").read_bytes())
    bad = folder / "2.jpg"
    bad.write_text("this is not a picture\n")
    result = run_cli(
        "--labels", ",".join(LABELS), "--url", served.url, *(["--json"] if as_json else []), folder
    )
    assert result.returncode == 1, result.stderr
    direct = classify_directly(served, [b64(path) for path in good])
    assert f"1 failed: {bad}" in result.stderr
    if as_json:
        first, failed, last = json.loads(result.stdout)
        assert failed["image"] == str(bad) and "results" not in failed
        assert failed["error"]["type"] == "invalid_image" and failed["error"]["status"] == 422
        assert "images[" not in failed["error"]["message"]  # a request index means nothing here
        for entry, want in zip([first, last], direct, strict=True):
            assert_same_ranking(entry["results"], want)
    else:
        rows = result.stdout.splitlines()[1:]
        assert [row.split()[0] for row in rows] == [str(good[0]), str(bad), str(good[1])]
        assert rows[1].split()[1:3] == ["error:", "invalid_image:"]
        for row, ranked in zip([rows[0], rows[2]], direct, strict=True):
            assert f"  {ranked[0]['label']}" in row and f"{ranked[0]['score']:.4f}" in row


def test_unreachable_server_gives_a_clear_message(photos):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("--labels", "cat,dog", "--url", url, photos / "a.png", timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"cannot reach the server at {url}/classify" in result.stderr
    assert "Traceback" not in result.stderr


def test_arguments_the_server_refuses_are_a_usage_error(served, photos):
    result = run_cli(
        "--labels", "cat,dog", "--template", "no placeholder", "--url", served.url, photos
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "templates[0]" in result.stderr and "slot {}" in result.stderr


def test_json_output_is_one_document_when_the_first_request_is_refused(served, photos):
    """A pipeline reading `--json` from stdout had got nothing at all when the server refused
    the run's first request (a 404 at a wrong `--url`, a template it cannot fill)."""
    result = run_cli("--labels", "cat,dog", "--json", "--url", f"{served.url}/v1", photos)
    assert result.returncode == 1
    outcomes = json.loads(result.stdout)
    assert outcomes and all(o["error"]["type"] == "not_sent" for o in outcomes)
    assert "HTTP 404" in outcomes[0]["error"]["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a.png"], "the following arguments are required: --labels"),
        (["--labels", " , ", "a.png"], "no labels given"),
        (["--labels", "cat", "{missing}"], "missing: no such file or folder"),
        (["--labels", "cat", "{empty}"], "no image files"),
        (["--labels", "cat", "--batch-size", "0", "a.png"], "must be at least 1"),
        (["--labels", "cat", "--url", "127.0.0.1:8080", "a.png"], "expected http://host:port"),
        (["--labels", "cat"], "the following arguments are required: PATH_OR_URL"),
    ],
)
def test_usage_errors_exit_2_before_contacting_anything(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.png").write_bytes(b"x")
    filled = [
        arg.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
        if arg.startswith("{")
        else str(tmp_path / arg)
        if arg == "a.png"
        else arg
        for arg in args
    ]
    # port 9 (discard) on 127.0.0.1: a request would fail, so exit 2 proves none was made
    result = run_cli(*filled, *([] if "--url" in args else ["--url", "http://127.0.0.1:9"]))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_the_api_key_is_sent_and_an_over_budget_batch_is_split(guarded, tmp_path):
    """On the `guarded` server (an API key, a 1,000,000-pixel budget per request): three
    600x600 images in one batch are over the budget; the 413 halves the batch and all pass."""
    files = []
    for seed in range(3):
        files.append(tmp_path / f"{seed}.png")
        files[-1].write_bytes(encode(photo_like(600, 600, seed=seed)))
    whole = {"images": [b64(path) for path in files], "labels": LABELS}
    auth = {"Authorization": f"Bearer {GUARD_KEY}"}
    direct = httpx.post(f"{guarded.url}/classify", json=whole, headers=auth, timeout=60)
    assert direct.status_code == 413 and direct.json()["error"]["type"] == "too_many_pixels"
    args = ("--labels", ",".join(LABELS), "--url", guarded.url, "--batch-size", "3", "--json")
    result = run_cli(*args, "--api-key", GUARD_KEY, *files)
    assert result.returncode == 0, result.stderr
    assert all("results" in entry for entry in json.loads(result.stdout))
    refused = run_cli(*args, *files)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "--api-key or CLIP_API_KEY" in refused.stderr


def test_a_key_read_from_a_file_is_trimmed_and_a_bad_one_refused_unsent(guarded, tmp_path):
    """A key with its file's line ending had been refused by httpx, reported as the server being
    unreachable, with the key quoted whole in the message and the --json results."""
    image = tmp_path / "one.png"
    image.write_bytes(encode(photo_like(40, 30, seed=1)))
    args = ("--labels", ",".join(LABELS), "--url", guarded.url, "--json", image)
    trimmed = run_cli("--api-key", f"{GUARD_KEY}\r\n", *args)
    assert trimmed.returncode == 0, trimmed.stderr
    assert "results" in json.loads(trimmed.stdout)[0]
    odd = GUARD_KEY[:3] + "\u2011" + GUARD_KEY[3:]  # a non-breaking hyphen, pasted from a page
    refused = run_cli("--api-key", odd, *args)
    assert refused.returncode == 2 and "printable ASCII" in refused.stderr
    assert GUARD_KEY[3:] not in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
