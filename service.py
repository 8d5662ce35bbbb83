"""BentoML wiring: the HTTP-facing CLIP service (port 8080) and its runner dependency.

Routes: `GET /ping` (SageMaker health check), `POST /invocations` (the original container's
contract; also the Hugging Face toolkit's zero-shot shape and raw image bodies), `POST /classify`,
`POST /embed_images`, `POST /embed_texts`, and the demo page at `/ui`. The work itself lives in
clip_runner/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response

from clip_runner.answers.direct_runner import DirectRunnerClient, calls_per_connection
from clip_runner.answers.embedding_format import EncodingFormat
from clip_runner.answers.hf_toolkit import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    parse_zero_shot_request,
    toolkit_answer,
)
from clip_runner.answers.invocation import InvocationContext, image_embeddings, invoke
from clip_runner.answers.invocation import classify as classify_images
from clip_runner.answers.invocation import embed_texts as embed_texts_flow
from clip_runner.answers.runner_calls import (
    RUNNER_ERRORS,
    fast_preprocessing_note,
    forwards_jpegs,
    resilient,
    runner_calls,
    runner_overloaded,
    text_call_passes,
)
from clip_runner.answers.shared_build import SharedBuild
from clip_runner.answers.token_ids import PromptTokenizer
from clip_runner.bound_apis import bind_apis_once
from clip_runner.config import (
    DEFAULT_TEMPLATE,
    DEFAULT_TOP_K,
    get_settings,
    refuse_bentoml_worker_counts,
    refuse_ports_it_cannot_listen_on,
)
from clip_runner.errors import RequestError, error_body
from clip_runner.gc_tuning import settle_after_loading
from clip_runner.gil_handover import hand_over_gil_after
from clip_runner.host_lookup import check_host_lookup_in_background
from clip_runner.images.decode_budget import DecodeBudget
from clip_runner.images.fetch import AddressPolicy, FetchLimits, new_fetch_client
from clip_runner.images.loading import ImageLimits, compiled_resizer
from clip_runner.malloc_tuning import reuse_freed_memory
from clip_runner.metrics import LABEL_CACHE_LOOKUPS, TEXT_CACHE_LOOKUPS, forget_dead_workers
from clip_runner.model.batching import QueueWaitExceeded
from clip_runner.model.embedding_cache import EmbeddingCache
from clip_runner.model.encodings_in_flight import EncodingsInFlight
from clip_runner.model.model_facts import PILLOW, ModelFacts
from clip_runner.model.model_source import check_served_model
from clip_runner.model.runner import RUNNER_SERVICE_NAME, CLIPRunner
from clip_runner.model.shutdown_order import (
    exit_failed_if_stopped,
    order_the_supervisors_stop,
)
from clip_runner.model.simplejpeg_pixels import cpu_decoder_name
from clip_runner.open_files import raise_open_file_limit
from clip_runner.web.answer_json import embedding_json, json_body
from clip_runner.web.auth import ApiKeyMiddleware
from clip_runner.web.connection_recycling import ConnectionRecyclingMiddleware
from clip_runner.web.direct_json import DirectJsonMiddleware, DirectRoute
from clip_runner.web.error_responses import (
    JSONErrorMiddleware,
    answer_unparsable_requests_in_json,
    quiet_caller_error_logs,
)
from clip_runner.web.header_limits import HeaderLimits, bound_request_headers
from clip_runner.web.http_spans import one_span_per_request
from clip_runner.web.jsonlines import InvocationLine, JsonLinesMiddleware, execution_parameters
from clip_runner.web.openapi_document import SCHEMAS, ApiDocumentationMiddleware, served_document
from clip_runner.web.raw_images import RawImageBodyMiddleware
from clip_runner.web.readyz import ReadyzMiddleware
from clip_runner.web.route_metrics import count_routed_requests_only
from clip_runner.web.schemas import (
    ClassifyResponse,
    ClassList,
    EmbeddingResponse,
    EncodingFormatField,
    ImageList,
    LabelList,
    OptionalTopK,
    Prediction,
    Template,
    TemplateList,
    TextList,
    ToolkitInputs,
    TopK,
    ZeroShotParameters,
)
from clip_runner.web.send_deadline import bound_unread_answers
from clip_runner.web.traffic import RequestGuardMiddleware
from clip_runner.web.trailing_slash import TrailingSlashMiddleware
from clip_runner.web.ui import demo_page

logger = logging.getLogger("clip_service")
# BentoML shows its own loggers' INFO lines but leaves other loggers at the root's WARNING. This
# project's loggers get BentoML's level, so the log says which model, device and JPEG decoder
# each process serves with (and follows `--quiet` / `--debug` as BentoML's own lines do).
for _project_logger in ("clip_service", "clip_runner"):
    logging.getLogger(_project_logger).setLevel(logging.getLogger("bentoml").getEffectiveLevel())
settings = get_settings()
# A CLIP_MODEL_DIR (/opt/ml/model) holding something that is not a CLIP checkpoint, or without one
# a CLIP_MODEL_TAG store entry that is none (another model, a half-written import), stops the
# start here, before any worker spawns, with one line saying what is wrong (a bad store entry
# had the runner fail at each restart, forever; clip_runner/model/model_source.py).
check_served_model(settings.model_tag, settings.model_dir)
# A port in use (a server still running) stops the start in one line, not a traceback.
refuse_ports_it_cannot_listen_on()
# Every worker inherits it: a connection holds a file descriptor (open_files.py).
raise_open_file_limit()
# A runner whose model does not load stops the server; the supervisor then exits 78, not 0.
exit_failed_if_stopped()
# Stopped, the supervisor refuses new connections at once and keeps the runners reachable
# until its workers have stopped.
order_the_supervisors_stop()
# Set by the Dockerfile of BentoML's image, where its supervisor then starts no worker again that
# ended: a runner that exits on a broken or stalled GPU (status 70: model/device_health.py) or
# crashes stayed gone, one of two silently halving a GPU's capacity, the last one stopping the
# supervisor and with it the container, until SageMaker replaced the instance. Taken out before
# the supervisor reads it, so the image restarts its workers as `bentoml serve` does.
os.environ.pop("BENTOML_CONTAINERIZED", None)
SERVICE_NAME = "clip_service"
refuse_bentoml_worker_counts(
    {
        SERVICE_NAME: ("CLIP_API_WORKERS", settings.api_worker_count),
        RUNNER_SERVICE_NAME: ("CLIP_RUNNER_WORKERS", settings.runner_workers),
    }
)
READY_PROBE_TIMEOUT_S = 1.5
READY_PROBE_INTERVAL_S = 1.0
# A /ping that finds its worker not ready asks the runner once more, within this (SageMaker
# allows 2 s a ping).
PING_PROBE_TIMEOUT_S = 1.0
# Prompts whose token ids each API worker remembers (token_ids.py), per text cache entry: the
# ids are cheap (about 400 bytes a prompt), and they outlive the embeddings the cache evicts.
TOKEN_CACHE_ENTRIES_PER_TEXT_ENTRY = 4


async def ping(_: Request) -> Response:
    """200 with an empty body once the runner has loaded and warmed the model, else 503.

    While ready, answered from the last background probe, so it costs nothing and stays fast
    under load; while not, after one more probe (`ClipService.ready_for_ping`).
    """
    if await bentoml.get_current_service().ready_for_ping():
        return Response(status_code=200)
    return JSONResponse(
        error_body("not_ready", "the model is still loading or the runner is unavailable"),
        status_code=503,
    )


async def batch_execution_parameters(_: Request) -> Response:
    """SageMaker Batch Transform asks this once per job when the job leaves them unset."""
    return JSONResponse(execution_parameters(settings))


async def invocation_line(line: InvocationLine) -> Any:
    """One line of a JSON Lines `/invocations` body, answered by this worker's service."""
    return await bentoml.get_current_service().invocation_line(line)


def direct_route(api: str, answer: str) -> DirectRoute:
    """`api` answered by DirectJsonMiddleware: its body validated by BentoML's input model of
    the API, then the service's `answer` method called with the fields, as the API method
    would call it."""
    model = ClipService.apis[api].input_spec

    async def handler(request: Any) -> Any:
        service = bentoml.get_current_service()
        fields = {name: getattr(request, name) for name in type(request).model_fields}
        return await service.checked(getattr(service, answer)(**fields))

    return DirectRoute(model, handler)


health_app = Starlette(
    routes=[
        Route("/ping", ping, methods=["GET"]),
        Route("/ui", demo_page, methods=["GET"]),
        Route("/execution-parameters", batch_execution_parameters, methods=["GET"]),
    ]
)


@bentoml.asgi_app(health_app, path="/")
@bentoml.service(
    name=SERVICE_NAME,
    http={"port": settings.port},
    workers=settings.api_worker_count,
    # A line per request costs an API worker about a sixth of its CPU per request where JPEGs
    # go to the device, and at GPU rates gigabytes of logs a day: on a GPU it is off by default
    # (CLIP_ACCESS_LOG=auto; the 4-core server served 1.47 x without it, BENCHMARKS.md).
    logging={"access": {"enabled": settings.access_log}},
    # RequestGuardMiddleware answers 408 at body_timeout_s and then 504 at request_timeout_s;
    # BentoML's own timer (around both) is a backstop.
    traffic={"timeout": settings.body_timeout_s + settings.request_timeout_s + 5},
)
class ClipService:
    """Zero-shot image classification with CLIP, answering the original container's API."""

    runner = bentoml.depends(CLIPRunner)

    def __init__(self) -> None:
        # numba's resize loaded in this API worker now, before any request; which resize runs
        # is said once: without numba the resize takes about 4.5 x the CPU (the same pixels).
        logger.info(
            "API worker: images resized on the CPU by %s",
            "numba's compiled loops" if compiled_resizer() else "Pillow (no usable numba)",
        )
        self.image_limits = ImageLimits(
            fetch=FetchLimits(
                max_bytes=settings.max_image_bytes,
                timeout_s=settings.fetch_timeout_s,
                connect_timeout_s=settings.fetch_connect_timeout_s,
                max_redirects=settings.fetch_max_redirects,
            ),
            max_pixels=settings.max_image_pixels,
            fetch_concurrency=settings.fetch_concurrency,
            fast_preprocessing=settings.fast_preprocessing,
            max_request_pixels=settings.max_request_pixels,
            decode_budget=DecodeBudget(settings.max_decoding_pixels),
        )
        logger.info(
            "API worker: at most %s pixels decoded at once, over all requests "
            "(CLIP_MAX_DECODING_PIXELS)",
            f"{self.image_limits.decode_budget.capacity:,}",
        )
        policy = AddressPolicy.from_allowlist(settings.fetch_allow)
        self.http_client = new_fetch_client(policy, self.image_limits.fetch)
        self.text_cache = EmbeddingCache(
            settings.text_cache_size, TEXT_CACHE_LOOKUPS, misses_counted_elsewhere=True
        )
        self.label_cache = EmbeddingCache(settings.text_cache_size, LABEL_CACHE_LOOKUPS)
        self._context = SharedBuild(self._build_context)
        self.runner_ready = False
        self._probe_task: asyncio.Task | None = None
        self._ping_probe: asyncio.Future[bool] | None = None
        self._direct_runner: DirectRunnerClient | None = None  # made with the context
        bind_apis_once(self)  # BentoML looks each API up per request (bound_apis.py)
        # Here, in the API workers only (BentoML makes the instance before their server takes a
        # connection), for their clients: the runner's server, the same uvicorn class in its
        # own processes, serves the API workers, whose calls' one header lists each prompt's
        # token count (over 64 KiB from about 25,000 prompts, were CLIP_MAX_TEXT_BATCH_SIZE
        # that large).
        bound_request_headers(HeaderLimits(settings.header_timeout_s, settings.max_header_bytes))
        bound_unread_answers(settings.send_timeout_s)

    async def probe_runner(self) -> bool:
        """Whether the runner answers its readiness probe and its model facts are known.

        Two attempts of `READY_PROBE_TIMEOUT_S`: one slow or dropped probe under heavy load must
        not tell SageMaker the instance is unhealthy.
        """
        for _ in range(2):
            if await self._probe_once(READY_PROBE_TIMEOUT_S):
                return True
        return False

    async def _probe_once(self, timeout_s: float) -> bool:
        try:
            if await self.runner.to_async.is_ready(timeout_s):
                await asyncio.wait_for(self.context(), timeout_s)
                return True
        except RUNNER_ERRORS:
            pass
        return False

    async def ready_for_ping(self) -> bool:
        """Ready by the last background probe; if not, by one more probe now (within
        `PING_PROBE_TIMEOUT_S`), shared by the pings that arrive meanwhile.

        Each API worker learns that the runner is up at its own moment of the probe loop. Without
        asking again, a ping reaching a worker that had not asked yet read 503 just after another
        worker's 200 (the container test saw it once the API workers started seconds before the
        runner), and SageMaker counts a failed ping against the instance.
        """
        if self.runner_ready:
            return True
        if self._ping_probe is None or self._ping_probe.done():
            probe = asyncio.wait_for(self._probe_once(PING_PROBE_TIMEOUT_S), PING_PROBE_TIMEOUT_S)
            self._ping_probe = asyncio.ensure_future(probe)
        try:
            return await asyncio.shield(self._ping_probe)  # one ping's disconnect cancels no other
        except TimeoutError:
            return False

    async def _probe_forever(self) -> None:
        while True:
            ready = await self.probe_runner()
            if ready != self.runner_ready:
                log = logger.info if ready else logger.warning
                log("runner %s", "ready" if ready else "NOT answering: /ping reports 503")
            self.runner_ready = ready
            await asyncio.sleep(READY_PROBE_INTERVAL_S if ready else 0.2)

    @bentoml.on_startup
    async def start_runner_probe(self) -> None:
        self._probe_task = asyncio.create_task(self._probe_forever())
        # Everything loaded so far (BentoML, pydantic, this service's modules) lives for the
        # process's lifetime: kept out of garbage collections, which otherwise stall the event
        # loop (and /ping) for hundreds of ms under load (gc_tuning.py).
        frozen = settle_after_loading()
        logger.info("API worker: %d objects loaded at start kept out of garbage collection", frozen)
        hand_over_gil_after(settings.switch_interval_ms, "API worker")
        reuse_freed_memory()  # each request's image buffers, not page faults (malloc_tuning.py)
        forget_dead_workers()  # a killed worker's requests in progress (metrics.py)
        if bentoml.server_context.worker_index == 1:  # one warning per start is enough
            check_host_lookup_in_background()  # a start slowed by the supervisor (host_lookup.py)

    async def context(self) -> InvocationContext:
        """Built once, on first use (the readiness probe's), and shared: it needs the runner's
        model facts (logit scale, geometry) and its tokenizer. A probe that stops waiting leaves
        the build running for the next (answers/shared_build.py)."""
        return await self._context.get()

    async def _build_context(self) -> InvocationContext:
        attempt_s = (settings.request_timeout_s - 1) / 2
        facts = ModelFacts(**await resilient(self.runner.to_async.describe, attempt_s)())
        # Each prompt's token ids, untruncated: the length check counts them and the
        # runner encodes them.
        tokenize = PromptTokenizer(
            await resilient(self.runner.to_async.tokenizer, attempt_s)(),
            TOKEN_CACHE_ENTRIES_PER_TEXT_ENTRY * settings.text_cache_size,
            facts.max_text_tokens,
        )
        if settings.direct_runner_calls:
            self._direct_runner = DirectRunnerClient(
                self.runner.to_async.url, calls_per_connection(settings.runner_workers)
            )
        calls = runner_calls(
            self._direct_runner or self.runner.to_async,
            facts,
            attempt_s,
            (settings.api_worker_count, settings.runner_workers),
            settings.max_latency_ms / 1000,
            settings.runner_calls,
        )
        forward = forwards_jpegs(settings.decode_jpegs_on, facts)
        if note := fast_preprocessing_note(settings.fast_preprocessing, forward):
            logger.warning(note)
        context = InvocationContext(
            facts=facts,
            encode_images=calls.encode_images,
            encode_tokens=calls.encode_tokens,
            tokenize=tokenize,
            http_client=self.http_client,
            text_cache=self.text_cache,
            label_cache=self.label_cache,
            texts_in_flight=EncodingsInFlight(TEXT_CACHE_LOOKUPS),
            image_limits=dataclasses.replace(
                self.image_limits,
                forward_jpegs=forward,
                pillow_runner=facts.jpeg_decoder == PILLOW,
            ),
            encode_jpegs=calls.encode_jpegs,
            max_prompt_chars=2 * settings.max_class_name_chars,
        )
        logger.info(
            "serving model %s on %s in %s; JPEGs decoded %s; runner called %s, text "
            "calls of up to %d pass(es) (a pass %.1f ms)",
            facts.tag,
            facts.device,
            facts.dtype,
            f"on the runner ({facts.jpeg_decoder})"
            if forward
            else f"in the API workers by {cpu_decoder_name()}",
            "in its wire format" if self._direct_runner else "through BentoML's client",
            text_call_passes(facts.text_pass_s),
            1000 * facts.text_pass_s,
        )
        return context

    async def answer(self, work: Awaitable[Any]) -> Response:
        """The API's result as JSON, or the JSON error a caller's mistake or a runner problem
        deserves.

        The result is serialised here (pydantic's serialiser, as BentoML's would; embedding
        answers come as their JSON already: answer_json.py) rather than by BentoML's output
        layer, which rebuilt the return type's JSON schema on every response to find its media
        type: 11% of the API worker's event loop at load (py-spy). The declared return types
        still give the OpenAPI schema and the Python client's types.
        """
        try:
            return Response(json_body(await self.checked(work)), media_type="application/json")
        except RequestError as error:
            return error.to_response()

    @staticmethod
    async def checked(work: Awaitable[Any]) -> Any:
        """The result, with runner failures turned into the RequestError (503) they answer."""
        try:
            return await work
        except (QueueWaitExceeded, *RUNNER_ERRORS) as exc:
            # Queued too long in this worker (call merging) or in the runner: the same answer.
            if isinstance(exc, QueueWaitExceeded) or runner_overloaded(exc):
                raise RequestError(
                    503, "overloaded", "the model's queue is full; retry shortly"
                ) from None
            logger.warning("runner call failed: %s: %s", type(exc).__name__, exc)
            # A timeout says how long it waited (runner_calls.resilient); other failures are the
            # runner's to log, not the caller's to read.
            reason = str(exc) if isinstance(exc, TimeoutError) and str(exc) else ""
            raise RequestError(
                503,
                "runner_unavailable",
                f"{reason or 'the model runner is not answering'}; retry shortly",
            ) from None

    @bentoml.api(route="/invocations")
    async def invocations(
        self,
        images: ImageList | None = None,
        classes: ClassList | None = None,
        template: Template = DEFAULT_TEMPLATE,
        top_k: TopK = DEFAULT_TOP_K,
        inputs: ToolkitInputs = None,
        parameters: ZeroShotParameters | None = None,
    ) -> list[Prediction] | list[Any]:
        """Classify each image against the classes: the original container's request and answer.

        Also answers the Hugging Face SageMaker toolkit's zero-shot request (`inputs` +
        `parameters.candidate_labels`) in that toolkit's shape, chosen by the body's keys, and
        raw JPEG/PNG/WebP bodies with `labels=...` in `X-Amzn-SageMaker-Custom-Attributes`.
        """
        return await self.answer(
            self.invocation_answer(images, classes, template, top_k, inputs, parameters)
        )

    async def invocation_line(self, line: InvocationLine) -> Any:
        """One JSON Lines record, as `invocations` answers it; errors raise RequestError."""
        work = self.invocation_answer(
            line.images, line.classes, line.template, line.top_k, line.inputs, line.parameters
        )
        return await self.checked(work)

    async def invocation_answer(
        self,
        images: list[str] | None,
        classes: list | None,
        template: str,
        top_k: int,
        inputs: Any,
        parameters: ZeroShotParameters | None,
    ) -> list[Any]:
        if inputs is not None or parameters is not None:
            return await self._toolkit_invocation(images, classes, inputs, parameters)
        return await self._original_invocation(images, classes, template, top_k)

    async def _original_invocation(
        self, images: list[str] | None, classes: list | None, template: str, top_k: int
    ) -> list[dict[str, Any]]:
        for field, value in (("images", images), ("classes", classes)):
            if value is None:
                raise RequestError(
                    422,
                    "invalid_request",
                    f"{field}: Field required (or send the Hugging Face toolkit's shape: "
                    "inputs + parameters.candidate_labels)",
                )
        return await invoke(await self.context(), images, classes, template, top_k)

    async def _toolkit_invocation(
        self,
        images: list[str] | None,
        classes: list | None,
        inputs: Any,
        parameters: ZeroShotParameters | None,
    ) -> list[Any]:
        if images is not None or classes is not None:
            raise RequestError(
                422,
                "invalid_request",
                "send either images + classes (the original's shape) or inputs + parameters "
                "(the Hugging Face toolkit's), not both",
            )
        request = parse_zero_shot_request(
            inputs, parameters.model_dump() if parameters is not None else None
        )
        ranked = await classify_images(
            await self.context(),
            request.images,
            request.labels,
            [request.template],
            None,
            label_field="parameters.candidate_labels",
            image_field="inputs",
            template_field=(
                None
                if request.template == DEFAULT_HYPOTHESIS_TEMPLATE
                else lambda _: "parameters.hypothesis_template"
            ),
        )
        return toolkit_answer(ranked, request.single_image)

    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: ImageList,
        labels: LabelList,
        templates: TemplateList = [DEFAULT_TEMPLATE],  # noqa: B006 (BentoML reads the default)
        top_k: OptionalTopK = None,
    ) -> ClassifyResponse:
        """Per image, the labels sorted by score; several templates are averaged per label."""
        return await self.answer(self.classify_answer(images, labels, templates, top_k))

    async def classify_answer(
        self, images: list[str], labels: list[str], templates: list[str], top_k: int | None
    ) -> ClassifyResponse:
        context = await self.context()
        results = await classify_images(
            context,
            images,
            labels,
            templates,
            top_k,
            template_field=None if templates == [DEFAULT_TEMPLATE] else "templates[{}]".format,
        )
        return ClassifyResponse(model=context.facts.tag, results=results)

    @bentoml.api(route="/embed_images")
    async def embed_images(
        self, images: ImageList, encoding_format: EncodingFormatField = "float"
    ) -> EmbeddingResponse:
        """L2-normalised image embeddings, one per image, in request order."""
        return await self.answer(self.image_embedding_answer(images, encoding_format))

    async def image_embedding_answer(
        self, images: list[str], encoding_format: EncodingFormat
    ) -> bytes:
        context = await self.context()
        embeddings = await image_embeddings(context, images)
        return self._embedding_answer(context, embeddings, encoding_format)

    @bentoml.api(route="/embed_texts")
    async def embed_texts(
        self, texts: TextList, encoding_format: EncodingFormatField = "float"
    ) -> EmbeddingResponse:
        """L2-normalised text embeddings (texts as given, no template), in request order."""
        return await self.answer(self.text_embedding_answer(texts, encoding_format))

    async def text_embedding_answer(
        self, texts: list[str], encoding_format: EncodingFormat
    ) -> bytes:
        context = await self.context()
        embeddings = await embed_texts_flow(context, texts)
        return self._embedding_answer(context, embeddings, encoding_format)

    @staticmethod
    def _embedding_answer(
        context: InvocationContext, embeddings: Any, encoding_format: EncodingFormat
    ) -> bytes:
        """The EmbeddingResponse's JSON, its numbers written from the array (answer_json.py)."""
        facts = context.facts
        return embedding_json(facts.tag, facts.embedding_dim, encoding_format, embeddings)

    @bentoml.on_shutdown
    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._direct_runner is not None:
            await self._direct_runner.close()
        await self.http_client.aclose()


# Every API's JSON requests, answered before BentoML's endpoint layers (direct_json.py).
def refuse_unknown_fields(*apis: str) -> None:
    """These APIs refuse a field they do not take (a 422 naming it): `/classify`'s `topk`, or
    `template` (as `/invocations` spells it), and `/embed_*`'s `encoding` had been ignored and
    answered 200 with the defaults. BentoML builds each API's input model from its signature;
    both its endpoint and DirectJsonMiddleware validate with that model. `/invocations` keeps
    the original's leniency: its clients may send keys the original ignored."""
    for api in apis:
        model = ClipService.apis[api].input_spec
        model.model_config["extra"] = "forbid"
        model.model_rebuild(force=True)


refuse_unknown_fields("classify", "embed_images", "embed_texts")


def openapi_document() -> dict[str, Any]:
    """/docs.json: BentoML's document of the service, corrected (openapi_document.py)."""
    input_schemas = {
        f"/{name}": api.input_spec.model_json_schema(ref_template=SCHEMAS + "{model}")
        for name, api in ClipService.apis.items()
    }
    return served_document(
        ClipService.openapi_spec.asdict(), input_schemas, api_key=settings.api_key is not None
    )


DIRECT_ROUTES = {
    "/invocations": direct_route("invocations", "invocation_answer"),
    "/classify": direct_route("classify", "classify_answer"),
    "/embed_images": direct_route("embed_images", "image_embedding_answer"),
    "/embed_texts": direct_route("embed_texts", "text_embedding_answer"),
}
one_span_per_request()  # before BentoML builds the app: no per-message spans
count_routed_requests_only()  # ... and no metric series per made-up path
ClipService.add_asgi_middleware(JSONErrorMiddleware)
ClipService.add_asgi_middleware(TrailingSlashMiddleware)
ClipService.add_asgi_middleware(
    ConnectionRecyclingMiddleware, every=settings.answers_per_connection
)
# Before any body is read; a refused one is dropped within the body deadline (traffic.py).
ClipService.add_asgi_middleware(
    ApiKeyMiddleware, key=settings.api_key, body_timeout_s=settings.body_timeout_s
)
ClipService.add_asgi_middleware(
    RequestGuardMiddleware,
    max_concurrency=settings.max_concurrency,
    max_body_bytes=settings.max_body_bytes,
    timeout_s=settings.request_timeout_s,
    json_paths=tuple(DIRECT_ROUTES),
    raw_image_paths=("/invocations",),
    body_timeout_s=settings.body_timeout_s,
    max_waiting_bodies=settings.max_waiting_bodies,
    max_waiting_body_bytes=settings.max_waiting_body_bytes,
)
# Inside the guard: a body sent to them is read under its deadline, as to any route.
ClipService.add_asgi_middleware(ReadyzMiddleware, answer=request_response(ping))
ClipService.add_asgi_middleware(ApiDocumentationMiddleware, document=openapi_document)
ClipService.add_asgi_middleware(
    RawImageBodyMiddleware, path="/invocations", max_image_bytes=settings.max_image_bytes
)
ClipService.add_asgi_middleware(
    JsonLinesMiddleware,
    handler=invocation_line,
    path="/invocations",
    max_in_flight=settings.max_concurrency,
    max_lines=settings.max_lines,
    lines_sent_as_json=settings.endpoint_kind == "batch",
)
ClipService.add_asgi_middleware(
    DirectJsonMiddleware, routes=DIRECT_ROUTES, service_name=SERVICE_NAME
)
quiet_caller_error_logs()
answer_unparsable_requests_in_json()
