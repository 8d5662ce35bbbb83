"""Classify local images, image URLs or whole folders against labels with a running CLIP server.

    python scripts/classify.py --labels cat,dog,person photo.jpg https://example.com/dog.png
    python scripts/classify.py --labels cat,dog --top-k 1 --recursive photos/
    python scripts/classify.py --labels cat,dog --template "a photo of a {}." \\
        --template "a drawing of a {}." --json photos/ > results.json

It talks to the server's `POST /classify` over HTTP and needs only httpx (and tqdm for the
progress bar); it does not import the service, so it runs wherever those two are installed.
Local files go as base64, URLs (http(s)://, s3://) and data: URIs as they are (the server
fetches the URLs). Images are sent several per request, each request kept under the server's
body limit; 429/502/503 answers are retried (honouring Retry-After); one bad image is reported
on its own and its neighbours are re-sent.

Output: a table on stdout (or one JSON document with --json); the progress bar and the summary
go to stderr, so stdout stays clean for pipes.

Exit status: 0 every image classified; 1 at least one image failed (the output names each, with
the server's reason), or the server could not be reached or stopped answering; 2 usage error (no
labels, a path that does not exist, a folder without images, arguments the server refuses);
130 on Ctrl-C, after printing what was classified so far.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import errno
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
)  # what the server decodes (clip_runner/images/formats.py)
DEFAULT_URL = "http://127.0.0.1:8080"
# The server's defaults (CLIP_MAX_BODY_BYTES, CLIP_MAX_IMAGES_PER_REQUEST); SageMaker's too.
DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024
SERVER_MAX_IMAGES = 32
RETRY_STATUSES = frozenset({429, 502, 503})
# Answers that fail the batch they answer, not the run: a lone image over the body limit, a
# body that did not arrive in time, a server still busy after the retries (and any 5xx).
BATCH_FAILURES = frozenset({408, 413, 429})
MAX_RETRY_WAIT_S = 30.0
TABLE_NAME_WIDTH = 60  # longer names push their own row out instead of widening every row
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
INTERRUPTED = "interrupted (Ctrl-C)"
# C0 and C1 controls, and the bidirectional ones, which can make a name print as another.
CONTROL_CHARACTERS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
# A data: URI's row is named by its start, length and digest, not the whole image.
DATA_URI_NAME_CHARS = 40


class UsageError(Exception):
    """A mistake in the command line, found before (or by) the server: exit status 2."""


class ServerUnreachable(Exception):
    """The server cannot be reached or stopped answering: the run stops, nothing more is sent."""


class RunRefused(Exception):
    """The server refused a request as a whole (not one image): every batch would fail alike."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.error = error
        self.message = str(error.get("message", ""))
        # One per source, as `run` returns them, once `run` has given up on the run.
        self.outcomes: list[dict[str, Any]] = []
        super().__init__(f"HTTP {status}: {self.message}")


def shown_name(path: str | Path) -> str:
    """A path as the table and the JSON name it: a name that is not UTF-8 (a file copied from an
    old Latin-1 system, `caf\xe9.png`) with its odd bytes escaped (`caf\\xe9.png`); as Python
    holds it (a lone surrogate) it could be neither printed to a UTF-8 terminal nor read back by
    a strict JSON reader, and the run's results were lost with it. Control characters are
    escaped likewise (`printable`): a newline in a name had broken the table, and an escape
    sequence (`\x1b[2J`) reached the terminal."""
    return printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


def printable(text: str) -> str:
    """`text` with its control characters escaped (`\\x1b`, `\\u202e`), as the output prints
    it."""
    return CONTROL_CHARACTERS.sub(escaped, text)


def escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@dataclass(frozen=True)
class Source:
    """One image to classify: `name` is how the user knows it (path as given, or the URL)."""

    name: str
    path: Path | None = None  # a local file, sent as base64
    url: str | None = None  # sent as it is; the server fetches it
    unread: str | None = None  # why a folder's images could not be listed: reported, not sent

    def payload_size(self) -> int:
        """Bytes this image adds to the JSON body (its string and quotes), without reading it."""
        if self.url is not None:
            return len(json.dumps(self.url))
        assert self.path is not None
        return base64_length(self.path.stat().st_size) + 2

    def payload(self) -> str:
        """The string sent in `images`; files are read only now, one batch at a time."""
        if self.url is not None:
            return self.url
        assert self.path is not None
        return base64.b64encode(self.path.read_bytes()).decode("ascii")


# ------------------------------------------------------------------------- pure functions


def base64_length(n_bytes: int) -> int:
    """Length of the padded base64 text of `n_bytes` bytes."""
    return 4 * ((n_bytes + 2) // 3)


def is_url(argument: str) -> bool:
    """An image the server reads itself, sent as it is: an http(s) or s3:// URL (the server
    fetches it, where it may), or a data: URI (the image inline, after a comma: a file named
    `data:cat.png` is a file)."""
    return re.match(r"(?i)(https?://|s3://|data:[^,]*,)", argument) is not None


def parse_labels(values: Sequence[str]) -> list[str]:
    """`--labels a,b --labels c` -> [a, b, c]: trimmed, empties dropped, duplicates once.

    A duplicate label would split its probability mass in two, which is never what is meant.
    """
    labels: list[str] = []
    for value in values:
        for label in value.split(","):
            label = label.strip()
            if label and label not in labels:
                labels.append(label)
    return labels


def folder_images(folder: Path, recursive: bool) -> list[Source]:
    """Image files of a folder by name (sorted, so runs are repeatable), hidden files skipped;
    and each subfolder that could not be listed, as a source that fails (os.walk had skipped
    it silently, and the run said every image was classified).

    Hidden files are mostly editor or OS debris (macOS writes `._photo.jpg` resource forks that
    are not images); symlinked folders are not followed, so a link loop cannot recurse forever.
    Only regular files (or links to them) count: reading a named pipe or a device called
    `x.jpg` had blocked the run for good. A broken link is kept: it is reported unreadable.
    """
    found: list[Source] = []

    def unlisted(error: OSError) -> None:
        name = shown_name(error.filename)
        found.append(Source(name=name, path=Path(error.filename), unread=error.strerror))

    for root, dirs, files in os.walk(folder, onerror=unlisted):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            path = Path(root) / name
            if (
                not name.startswith(".")
                and path.suffix.lower() in IMAGE_SUFFIXES
                and (path.is_file() or not path.exists())
            ):
                found.append(Source(name=shown_name(path), path=path))
    return sorted(found, key=lambda source: Path(source.path or "").relative_to(folder).parts)


def path_kind(path: Path) -> str:
    """`folder`, `file`, `other` (a pipe, a device), `missing`, or `unreadable` where the path
    cannot even be looked at (its folder unreadable): Path.is_dir and is_file raise for that,
    and for a name too long, which had ended the run in a traceback."""
    try:
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "file"
        return "other" if path.exists() else "missing"
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            return "missing"
        return "unreadable"


def collect_sources(arguments: Sequence[str], recursive: bool = False) -> tuple[list[Source], bool]:
    """Turn the positional arguments into images, in order; also says whether a folder was given.

    A file named explicitly is sent whatever its suffix (the server judges the bytes); a folder
    contributes only its image files. Raises UsageError for a missing path or an imageless folder.
    """
    sources: list[Source] = []
    folder_given = False
    for argument in arguments:
        if is_url(argument):
            name = argument
            if argument[:5].lower() == "data:" and len(argument) > DATA_URI_NAME_CHARS:
                # its start is its type's (every PNG's is alike): the digest tells them apart
                digest = hashlib.sha256(argument.encode()).hexdigest()[:8]
                name = f"{argument[:DATA_URI_NAME_CHARS]}... ({len(argument)} characters, {digest})"
            sources.append(Source(name=shown_name(name), url=argument))
            continue
        path = Path(argument)
        kind = path_kind(path)
        if kind == "folder":
            folder_given = True
            images = folder_images(path, recursive)
            if not images:
                kinds = ", ".join(sorted(suffix[1:] for suffix in IMAGE_SUFFIXES))
                hint = "" if recursive else " (add --recursive to look in subfolders)"
                raise UsageError(f"{argument}: no image files ({kinds}) in this folder{hint}")
            sources.extend(images)
        elif kind in ("file", "unreadable"):  # an unreadable one fails alone, when it is read
            sources.append(Source(name=shown_name(argument), path=path))
        elif kind == "other":
            raise UsageError(f"{shown_name(argument)}: not a regular file or folder")
        else:
            raise UsageError(
                f"{shown_name(argument)}: no such file or folder (URLs must start with "
                "http(s):// or s3://, inline images with data:)"
            )
    return sources, folder_given


def request_body(labels: Sequence[str], templates: Sequence[str], top_k: int | None) -> dict:
    """The `/classify` body without its images: what every request of the run repeats."""
    body: dict[str, Any] = {"images": [], "labels": list(labels)}
    if templates:
        body["templates"] = list(templates)
    if top_k is not None:
        body["top_k"] = top_k
    return body


def encode_body(body: dict[str, Any]) -> bytes:
    """Compact JSON, ASCII only: its length is exactly what `make_batches` budgeted for."""
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def make_batches(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[list[int]]:
    """Group item indices, in order, into batches of at most `max_items` whose JSON list
    (`sizes` of the encoded strings plus one comma between neighbours) fits in `max_bytes`.

    Consecutive, order-keeping batches keep the output in argument order and let each batch's
    files be read just before it is sent. An item over `max_bytes` on its own gets a batch of its
    own (callers report such items instead of sending them).
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes):
        added = size + (1 if current else 0)
        if current and (len(current) >= max_items or used + added > max_bytes):
            batches.append(current)
            current, used, added = [], 0, size
        current.append(index)
        used += added
    if current:
        batches.append(current)
    return batches


def strip_image_index(message: str) -> str:
    """The server names a bad image `images[i]`, i counting within one request, which means
    nothing to the user; the output names the file instead."""
    return re.sub(r"^images\[\d+\]:\s*", "", message)


def retry_delay(retry_after: str | None, attempt: int, now: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): the server's Retry-After
    (seconds or an HTTP date) when it sends one, else 1, 2, 4, ... seconds; at most 30."""
    delay = float(2**attempt)
    if retry_after:
        value = retry_after.strip()
        if value.isdigit():
            delay = float(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
            else:
                delay = max(0.0, when - (time.time() if now is None else now))
    return min(delay, MAX_RETRY_WAIT_S)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The server's `{"error": {...}}` object, or a stand-in when the body is something else
    (a proxy's HTML page, an empty 502)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and "message" in error:
        return error
    text = response.text.strip()
    if not text or text.startswith("<"):
        text = response.reason_phrase or "no message"
    return {"type": "http_error", "message": text[:300]}


def is_label_score(item: object) -> bool:
    """`{"label": str, "score": number}`: one ranked label as /classify answers it."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("label"), str)
        and isinstance(item.get("score"), int | float)
    )


def too_many_images(status: int, error: dict[str, Any]) -> bool:
    """A 422 about the request's image list itself (no image's `index`): its length, over the
    server's CLIP_MAX_IMAGES_PER_REQUEST."""
    message = error.get("message")
    return (
        status == 422
        and error.get("index") is None
        and isinstance(message, str)
        and message.startswith("images: ")
    )


def failure(error_type: object, message: object, status: int | None = None) -> dict[str, Any]:
    """One image's outcome when it failed: `{"error": {"type", "message", "status"?}}`; what
    another server sent as the type or message is taken as text, whatever it is."""
    message = strip_image_index(str(message))
    error: dict[str, Any] = {"type": printable(str(error_type)), "message": printable(message)}
    if status is not None:
        error["status"] = status
    return {"error": error}


def format_score(score: float) -> str:
    return f"{score:.4f}"


def format_table(outcomes: Sequence[dict[str, Any]]) -> str:
    """One row per image: name, top label, its score, then the rest of the returned labels.

    Failed images get `error: <type>: <message>` in place of the labels, in the same column, so
    a failure is visible exactly where the user looks for the answer.
    """
    if not outcomes:
        return ""
    name_width = min(max(len("image"), *(len(o["image"]) for o in outcomes)), TABLE_NAME_WIDTH)
    tops = [o["results"][0]["label"] for o in outcomes if o.get("results")]
    label_width = max([len("label"), *map(len, tops)])
    has_others = any(len(o.get("results") or []) > 1 for o in outcomes)
    header = f"{'image':<{name_width}}  {'label':<{label_width}}  {'score':<6}"
    lines = [header + "   others" if has_others else header.rstrip()]
    for outcome in outcomes:
        name = f"{outcome['image']:<{name_width}}"
        results = outcome.get("results")
        if "error" in outcome:
            error = outcome["error"]
            lines.append(f"{name}  error: {error['type']}: {error['message']}")
        elif not results:
            lines.append(f"{name}  (no labels returned)")
        else:
            top, others = results[0], results[1:]
            row = f"{name}  {top['label']:<{label_width}}  {format_score(top['score'])}"
            if others:
                row += "   " + ", ".join(
                    f"{item['label']} {format_score(item['score'])}" for item in others
                )
            lines.append(row)
    return "\n".join(lines)


def summary(outcomes: Sequence[dict[str, Any]], model: str | None, seconds: float) -> str:
    """One stderr line: how many worked, which failed (the first few), with what, how long."""
    failed = [o["image"] for o in outcomes if "error" in o]
    done = len(outcomes) - len(failed)
    text = f"classified {done} of {len(outcomes)} image{'s' if len(outcomes) != 1 else ''}"
    if model:
        text += f" with {model}"
    text += f" in {seconds:.1f} s"
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        text += f"; {len(failed)} failed: {shown}"
    return text


# ------------------------------------------------------------------------- talking to the server


class Classifier:
    """Sends batches to `POST /classify` and turns every answer into per-image outcomes.

    `sleep` is injectable so that retry waits can be tested without waiting.
    """

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        labels: Sequence[str],
        templates: Sequence[str] = (),
        top_k: int | None = None,
        retries: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.endpoint = url.rstrip("/") + "/classify"
        self.base = request_body(labels, templates, top_k)
        self.retries = retries
        self.sleep = sleep
        self.model: str | None = None

    def overhead(self) -> int:
        """Bytes of a request body with an empty image list."""
        return len(encode_body(self.base))

    def post(self, images: list[str]) -> httpx.Response:
        """One request, retried on 429/502/503 and on a connection dropped under it."""
        content = encode_body({**self.base, "images": images})
        headers = {"Content-Type": "application/json"}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.client.post(self.endpoint, content=content, headers=headers)
            except httpx.TimeoutException as exc:
                timeout = self.client.timeout.read
                raise ServerUnreachable(
                    f"no answer from {self.endpoint} within {timeout:g} s "
                    "(a slow server may need a larger --timeout)"
                ) from exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # e.g. a pooled keep-alive connection the server closed meanwhile: worth a retry.
                if last:
                    raise ServerUnreachable(f"{self.endpoint}: connection lost ({exc})") from exc
                self.sleep(retry_delay(None, attempt))
                continue
            except httpx.TransportError as exc:
                raise ServerUnreachable(
                    f"cannot reach the server at {self.endpoint} ({exc or type(exc).__name__}); "
                    "is it running (make serve), and is --url right?"
                ) from exc
            if response.status_code not in RETRY_STATUSES or last:
                return response
            self.sleep(retry_delay(response.headers.get("Retry-After"), attempt))
        raise AssertionError("unreachable")  # the loop always returns or raises

    def classify(self, sources: Sequence[Source]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index into `sources`, outcome) for each image of one batch, as they are known.

        A 422 naming one image fails only that image: the others are sent again without it (the
        server names the first bad image only, so this repeats until the rest succeed). A 413
        halves the batch (the server's limit may be lower than ours); a lone image gets the 413.
        So does a 422 about the request's `images` as a whole: a server whose
        CLIP_MAX_IMAGES_PER_REQUEST is under the batch size (it had stopped the run).
        """
        pending: list[list[tuple[int, str]]] = []
        readable: list[tuple[int, str]] = []
        for index, source in enumerate(sources):
            try:
                readable.append((index, source.payload()))
            except OSError as exc:
                yield index, failure("unreadable_file", exc.strerror or str(exc))
        if readable:
            pending.append(readable)
        while pending:
            batch = pending.pop(0)
            response = self.post([payload for _, payload in batch])
            status = response.status_code
            if status == 200:
                yield from self._results(batch, response)
                continue
            error = error_of(response)
            bad = error.get("index")
            if status == 422 and isinstance(bad, int) and 0 <= bad < len(batch):
                yield (
                    batch[bad][0],
                    failure(error.get("type", "http_error"), error["message"], status),
                )
                rest = batch[:bad] + batch[bad + 1 :]
                if rest:
                    pending.insert(0, rest)
            elif len(batch) > 1 and (status == 413 or too_many_images(status, error)):
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
            elif status in BATCH_FAILURES or status >= 500:
                for index, _ in batch:
                    yield (
                        index,
                        failure(error.get("type", "http_error"), error["message"], status),
                    )
            else:
                raise RunRefused(status, error)

    def _results(
        self, batch: list[tuple[int, str]], response: httpx.Response
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            answer = response.json()
            results = answer["results"]
            valid = (
                isinstance(results, list)
                and len(results) == len(batch)
                and all(isinstance(ranked, list) for ranked in results)
                and all(is_label_score(item) for ranked in results for item in ranked)
            )
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            for index, _ in batch:
                yield index, failure("bad_answer", "the server's answer is not /classify's")
            return
        self.model = answer.get("model", self.model)
        for (index, _), ranked in zip(batch, results, strict=True):
            yield index, {"results": ranked}


def run(
    classifier: Classifier,
    sources: Sequence[Source],
    batch_size: int,
    max_body_bytes: int,
    progress: Any = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Classify every source; returns one outcome per source, in order, and why the run stopped
    early (None if it did not). A request refused before any image was classified raises
    RunRefused: the run's arguments were wrong; it carries the outcomes all the same."""
    outcomes: list[dict[str, Any] | None] = [None] * len(sources)
    budget = max_body_bytes - classifier.overhead()
    sendable: list[int] = []
    sizes: list[int] = []
    for index, source in enumerate(sources):
        if source.unread is not None:
            outcomes[index] = failure("unreadable_file", f"folder not listed: {source.unread}")
            continue
        try:
            size = source.payload_size()
        except OSError as exc:
            outcomes[index] = failure("unreadable_file", exc.strerror or str(exc))
            continue
        if size > budget:
            outcomes[index] = failure(
                "too_large",
                f"needs {size:,} bytes of the request (files go as base64), more than the "
                f"{max_body_bytes:,}-byte limit leaves beside the labels; resize it, serve it from "
                "a URL, or raise --max-body-bytes if the server allows more",
            )
            continue
        sendable.append(index)
        sizes.append(size)
    if progress is not None:
        progress.update(len(sources) - len(sendable))
    stopped: str | None = None
    refused: RunRefused | None = None
    for batch in make_batches(sizes, batch_size, budget):
        members = [sendable[i] for i in batch]
        try:
            for position, outcome in classifier.classify([sources[i] for i in members]):
                outcomes[members[position]] = outcome
                if progress is not None:
                    progress.update(1)
        except ServerUnreachable as exc:
            stopped = str(exc)
            break
        except RunRefused as exc:
            # Refused from the start (a wrong URL, key or label): the run's arguments, told as
            # such. Refused later: what was classified is still printed, the rest not sent.
            if not any(outcome and "results" in outcome for outcome in outcomes):
                refused = exc
            stopped = f"the server refused a request (HTTP {exc.status}): {exc.message}"
            break
        except KeyboardInterrupt:  # Ctrl-C on a long run still prints what was classified
            stopped = INTERRUPTED
            break
    for index, outcome in enumerate(outcomes):
        if outcome is None:
            outcomes[index] = failure("not_sent", f"not classified: {stopped}")
    named = [
        {"image": source.name, **(outcome or {})}
        for source, outcome in zip(sources, outcomes, strict=True)
    ]
    if refused is not None:
        refused.outcomes = named
        raise refused
    return named, stopped


# ------------------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all classified, 1 some image failed or the server is unreachable, "
        "2 usage error, 130 interrupted.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH_OR_URL",
        help="image files, folders, http(s):// or s3:// URLs (the server fetches them), data: URIs",
    )
    parser.add_argument(
        "--labels",
        "-l",
        action="append",
        required=True,
        help="comma-separated labels; may be repeated (--labels cat,dog --labels 'a person')",
    )
    parser.add_argument(
        "--template",
        "-t",
        action="append",
        default=[],
        help="prompt template with {} or {name} for the label (default: the server's, \"a photo "
        'of a {name}"); repeat it to average several (prompt ensembling)',
    )
    parser.add_argument(
        "--top-k", "-k", type=positive_int, help="labels to return per image (default: all)"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CLIP_API_KEY") or None,
        help="sent as 'Authorization: Bearer <key>' to a server that sets CLIP_API_KEY "
        "(default: $CLIP_API_KEY)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document, not a table")
    parser.add_argument(
        "--recursive", "-r", action="store_true", help="also take images from subfolders"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help=f"images per request (default 8; the server takes at most {SERVER_MAX_IMAGES})",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=60.0, help="seconds per request (default 60)"
    )
    parser.add_argument(
        "--retries", type=int, default=4, help="retries of a busy (429/502/503) answer (default 4)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"request body limit (default {DEFAULT_MAX_BODY_BYTES}, the server's default)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal or a folder is given)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no summary line"
    )
    return parser


def make_progress(enabled: bool, total: int) -> Any:
    """A tqdm bar on stderr, or None (also when tqdm is not installed: the bar is a nicety)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = parse_labels(args.labels)
    if not labels:
        parser.error("--labels: no labels given")
    if not is_url(args.url):
        parser.error(f"--url {args.url!r}: expected http://host:port")
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    # As the server reads CLIP_API_KEY: a key from a file ends with its newline, a pasted one
    # may carry a space; httpx refused such a header, and its message quoted the key whole.
    api_key = (args.api_key or "").strip()
    if not all("!" <= character <= "~" for character in api_key):
        parser.error(
            "--api-key / CLIP_API_KEY: the key must be printable ASCII without spaces (as the "
            "server's CLIP_API_KEY must be)"
        )
    try:
        sources, folder_given = collect_sources(args.inputs, args.recursive)
    except UsageError as exc:
        parser.error(str(exc))

    show_bar = not args.quiet and (
        args.progress if args.progress is not None else (sys.stderr.isatty() or folder_given)
    )
    started = time.monotonic()
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    progress = make_progress(show_bar, len(sources))
    try:
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(timeout=timeout, headers=auth) as client:
            classifier = Classifier(
                client, args.url, labels, args.template, args.top_k, args.retries
            )
            outcomes, stopped = run(
                classifier, sources, args.batch_size, args.max_body_bytes, progress
            )
    except RunRefused as exc:
        if progress is not None:
            progress.close()
        if args.json:  # stdout is one JSON document whatever happened
            print(json.dumps(exc.outcomes, indent=2))
            sys.stdout.flush()
        print(
            f"error: the server refused the request (HTTP {exc.status}): {exc.message}",
            file=sys.stderr,
        )
        if exc.status == 404:
            print(f"is {args.url} this project's CLIP server (with /classify)?", file=sys.stderr)
        if exc.status == 401:
            print("the server needs its API key: --api-key or CLIP_API_KEY", file=sys.stderr)
        return EXIT_USAGE if exc.status == 422 else EXIT_FAILED
    if progress is not None:
        progress.close()

    classified = sum("results" in o for o in outcomes)
    if args.json:
        print(json.dumps(outcomes, indent=2))
    elif not stopped or any(o.get("error", {}).get("type") != "not_sent" for o in outcomes):
        print(format_table(outcomes))  # (a table of nothing but "not sent" rows says nothing)
    sys.stdout.flush()
    if stopped:
        print(f"error: {stopped}", file=sys.stderr)
    if not args.quiet or stopped:
        print(summary(outcomes, classifier.model, time.monotonic() - started), file=sys.stderr)
    if stopped == INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_OK if classified == len(outcomes) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
