"""The gateway's FastAPI application: `create_app(config, backend)`.

Routes:

    POST /v1/chat/completions, POST /v1/completions    generation (services.gateway.serving)
    POST /v1/responses                                 OpenAI's Responses API, stateless, text and tools
                                                       (services.gateway.responses_api)
    GET  /v1/models                                    the served model
    GET  /v1/models/{model}                            its card; 404 (model_not_found) for any other id
    POST /tokenize, POST /detokenize                   vLLM's tokenizer routes (services.gateway.tokenize)
    GET  /version                                      {"version": tristage's package version}
    GET  /health                                       200 while the process serves (liveness)
    GET  /ready                                        200 while the backend can serve a request (some
                                                       engine worker alive: Backend.is_ready), else 503
    GET  /metrics                                      Prometheus text

Every /v1 route, /tokenize and /detokenize require `Authorization: Bearer KEY` when `config.api_keys`
is not empty (and so do /metrics, /openapi.json and /docs with `config.protect_metrics_and_docs`); the
key is compared in constant time with every configured key. (vLLM leaves its tokenizer routes open;
here they use the tokenizer threads that generation needs, so only a key holder may.) /version,
/health and /ready stay open. With `config.allowed_hosts`, a request naming another host gets 400
before anything else (services.gateway.hosts). Every error, from any layer, is answered in OpenAI's
shape (services.gateway.errors).

Connection limits live in the HTTP server, not here: run the app under uvicorn with
`services.gateway.http_server.uvicorn_options(app)`, which counts connections against
`app.state.connections`.

The app owns the tokenizer threads (services.gateway.tokenizer_pool): a few, each with its own
tokenizer, so long prompts stay off the event loop and cannot hold every core.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.admission import AdmissionController
from services.gateway.backend import Backend, WorkerSnapshot
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, install_error_handlers
from services.gateway.hosts import HostCheckMiddleware
from services.gateway.http_server import ConnectionCap
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from services.gateway.responses_api import ResponsesService
from services.gateway.serving import GenerationService, model_not_found
from services.gateway.tokenize import TokenizationService
from services.gateway.tokenizer_pool import TokenizerPool

logger = logging.getLogger(__name__)


# FastAPI's documentation routes and Prometheus' scrape path (protect_metrics_and_docs)
METRICS_AND_DOCS_PATHS = frozenset({"/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})  # outside /v1, keyed like it


class ApiKeyMiddleware:
    """Refuses /v1 requests (and `protected_paths`) without a configured bearer key (401) before
    anything is read."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], protected_paths: frozenset[str] = frozenset()) -> None:
        self._app = app
        self._keys = [key.encode("utf-8") for key in api_keys]
        self._protected_paths = protected_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._keys and self._is_protected(scope["path"]):
            error = self._check(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def _is_protected(self, path: str) -> bool:
        return _is_api_path(path) or path in self._protected_paths

    def _check(self, scope: Scope) -> ApiError | None:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        if header is None:
            return _auth_error(
                "You didn't provide an API key. Provide it in an Authorization header "
                "using Bearer auth (Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # Compare with every key (no early exit), so the timing does not tell which key nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self._keys]
        if scheme.lower() != b"bearer" or not any(matches):
            return _auth_error("Incorrect API key provided.")
        return None


def _is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _auth_error(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(config: GatewayConfig, backend: Backend) -> FastAPI:
    admission = AdmissionController(
        config.max_queued_requests,
        config.max_queued_tokens,
        config.max_queued_sequences,
        config.max_queued_prompt_bytes,
    )
    metrics = GatewayMetrics(config.served_model_name, admission, backend.max_model_len)
    connections = ConnectionCap(config.max_connections, on_refused=lambda: metrics.count_rejection("connections"))
    metrics.track_connections(connections)
    tokenizers = TokenizerPool(backend.tokenizer, backend.processor, config.tokenizer_threads)
    service = GenerationService(config, backend, admission, metrics, tokenizers)
    tokenization = TokenizationService(config, backend, admission, metrics, tokenizers)
    responses = ResponsesService(config, service)
    card = ModelCard(id=config.served_model_name, created=int(time.time()), max_model_len=backend.max_model_len)
    tristage_version = package_version()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        tokenizers.shutdown()

    app = FastAPI(title="tristage", lifespan=lifespan)
    app.state.config = config
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.connections = connections
    install_error_handlers(app)
    protected_paths = TOKENIZER_PATHS | (METRICS_AND_DOCS_PATHS if config.protect_metrics_and_docs else frozenset())
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys, protected_paths=protected_paths)
    if config.allowed_hosts is not None:  # added last: runs first
        app.add_middleware(HostCheckMiddleware, allowed_hosts=config.allowed_hosts)

    _document_request_bodies(
        app,
        {
            "/v1/chat/completions": (ChatCompletionRequest,),
            "/v1/completions": (CompletionRequest,),
            "/v1/responses": (ResponsesRequest,),
            "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest),
            "/detokenize": (DetokenizeRequest,),
        },
    )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.completions(request)

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await responses.create(request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @app.get("/v1/models/{model:path}")  # :path: a served name may hold slashes ("org/model")
    async def model_card(model: str) -> ModelCard:
        if model != card.id:
            raise model_not_found(model)
        return card

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: Request) -> Response:
        return await tokenization.tokenize(request)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request) -> Response:
        return await tokenization.detokenize(request)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": tristage_version}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not backend.is_ready():
            raise ApiError(
                503,
                "The model is not ready yet.",
                code="service_unavailable",
                headers={"Retry-After": str(config.retry_after_s)},
            )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        snapshot = await _snapshot(backend, config.snapshot_timeout_s) if config.export_worker_metrics else []
        return Response(content=metrics.render(snapshot, backend.cluster_stats()), media_type=CONTENT_TYPE_LATEST)

    return app


def _document_request_bodies(app: FastAPI, bodies: dict[str, tuple[type[BaseModel], ...]]) -> None:
    """The generation and tokenizer routes read their bodies themselves (strict parsing, every error a
    400 in OpenAI's shape, never FastAPI's 422), so FastAPI cannot see their schemas: add each body's
    schema (any of several shapes, as /tokenize's) to /openapi.json, for clients' code generators and
    for the fuzzing in tests/integration/test_schemathesis.py."""
    build_default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build_default()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, models in bodies.items():
            refs = []
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                refs.append({"$ref": f"#/components/schemas/{model.__name__}"})
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
            }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def package_version() -> str:
    """tristage's version, as installed (a source checkout is installed too, editable)."""
    try:
        return importlib.metadata.version("tristage")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _snapshot(backend: Backend, timeout_s: float) -> list[WorkerSnapshot]:
    """The workers' gauges; without them (a slow or failing backend) /metrics still answers."""
    try:
        return await asyncio.wait_for(backend.snapshot(), timeout_s)
    except Exception:
        logger.warning("backend snapshot unavailable for /metrics", exc_info=True)
        return []
