"""HTTP gateway: an OpenAI-compatible Ray Serve application in front of the router actor.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``stream: true``; chat answers carry ``X-Chat-Template: model|override|none``, which
template rendered the conversation), ``GET /v1/models``, ``POST /tokenize`` and
``POST /detokenize`` (llama-server's), ``GET /health`` (200 only while the router and at
least one node are live), ``GET /metrics`` (Prometheus). With an API key configured, every
``/v1/``, ``/tokenize`` and ``/detokenize`` request must carry ``Authorization: Bearer KEY``
or gets 401 before anything is routed; ``/health`` and ``/metrics`` stay open for probes and
scrapers. Errors are OpenAI error bodies (400/401/404/413/429/503), never stack traces.

``start_http`` runs it from the ``serve --http`` command; ``build_app`` is the import path
for Serve configs and KubeRay's RayService (``cluster.api.gateway:build_app``), and creates the
deployment (router + node actors) first when it is given a model.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time.

import asyncio
import hmac
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cluster.api.metrics import GatewayMetrics
from cluster.api.openai_api import (
    APIError,
    APIRequest,
    Limits,
    error_from_exception,
    models_list,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from cluster.api.openai_responses import StreamChunks, response
from cluster.distributed.client import completion
from cluster.distributed.deploy import HEAD_NODE_RESOURCE, app_name
from cluster.distributed.protocol import NAMESPACE, ROUTER_NAME, Cancelled, Finished, Piece, Routed, StreamItem, Usage
from cluster.distributed.status import RouterStatus
from cluster.engine.engine_config import MAX_SLOTS
from cluster.engine.expert_selection import EXACT_SELECTION, ExpertSelection
from cluster.engine.node_memory import parse_cache_mb
from cluster.errors import InvalidParameterError, NoNodesError, RouterUnavailableError, SniperError

API_KEY_ENV = "SNIPER_API_KEY"
STATUS_TIMEOUT_S = 5.0
KEEPALIVE_S = 5.0  # GatewayConfig.keepalive_s: under httpx's default read timeout (5 s), nginx's (60 s), openai's (600 s)
KEEPALIVE_COMMENT = ": waiting for the first token\n\n"  # an SSE comment: clients skip it (WHATWG HTML, 9.2.6)


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the gateway; ``api_key`` None means: read ``SNIPER_API_KEY`` in the replica."""

    namespace: str = NAMESPACE
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    # a streamed request whose first token has not come within this many seconds (a long prompt's
    # prefill under memory pressure takes minutes, issue 22) gets its response (200, event
    # stream) and then an SSE comment every as many seconds until its text comes, so that a
    # client or proxy reading with a timeout keeps the connection; errors before then keep their
    # HTTP status, later ones end the stream as an error event
    keepalive_s: float = KEEPALIVE_S
    # the replica's internal gRPC server listens on its Ray node's address instead of every
    # interface (Ray Serve binds it to [::]); False where Serve's own options decide (RayService)
    grpc_on_node_address: bool = True


async def _first_event(events: AsyncIterator[StreamItem]) -> tuple[StreamItem, Routed | None]:
    """The stream's first item from a node (a piece, or its end), and the dispatch's announcement
    before it (a chat's template origin and format). Errors before any text raise here, so they
    keep their HTTP status."""
    routed = None
    try:
        item = await events.__anext__()
        while isinstance(item, Routed):
            routed = item
            item = await events.__anext__()
        return item, routed
    except StopAsyncIteration:
        raise APIError(503, "the request's stream ended before its first message", type="service_unavailable") from None


async def _resumed(first: StreamItem, events: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
    """``first`` (already read), then the rest of ``events``."""
    yield first
    async for item in events:
        yield item


class CallerGone(Exception):
    """The HTTP client went away before its request was read (counted as 499, nothing to answer)."""


CHAT_TEMPLATE_HEADER = "X-Chat-Template"  # chat answers: model, override or none (plain role: content lines)


class _StreamEnd:
    """Ends a streamed request once, whichever comes first: the stream's own end (its status) or
    the response's background task (499: the client went away, perhaps before the first byte).
    Closing the events cancels the request on its node; ``finish`` counts it."""

    def __init__(self, events: Any, finish: Any, first: asyncio.Task[Any] | None = None) -> None:
        self._events = events
        self._finish = finish
        self._first = first  # the task reading the first item, when the response started before it came
        self._done = False

    async def __call__(self, status_code: int) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._first is not None and not self._first.done():  # it iterates the events: stopped first
                self._first.cancel()
                await asyncio.gather(self._first, return_exceptions=True)
            await self._events.aclose()
        finally:
            self._finish(status_code)


def _sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# Serve pickles the FastAPI app when the class below is decorated: everything its methods use
# must already be defined here.
api = FastAPI(title="Expert Sniper Cluster", docs_url=None, redoc_url=None, openapi_url=None)
api.state.api_key = None


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status,
                        headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods answer as OpenAI errors; under /v1/ only with the key (an
    unauthenticated caller learns nothing about what exists)."""
    key = request.app.state.api_key
    if key is not None and request.url.path.startswith("/v1/") and not _authorized(request, key):
        return await _api_error(request, _unauthorized())
    message = "unknown path" if exc.status_code == 404 else exc.detail
    return await _api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {message}",
                                              code="not_found" if exc.status_code == 404 else None))


def _unauthorized() -> APIError:
    return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _authorized(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _bind_internal_grpc_to_node_address() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server to [::] (every interface,
    plaintext; ray/serve/_private/replica.py, ``_on_initialized``). Called from the replica's
    constructor, before that runs, this makes it listen on the address the Ray node uses, which
    on a loopback cluster is 127.0.0.1."""
    import ray
    from ray.serve._private import replica

    host = ray.util.get_node_ip_address()
    original = replica.add_port_to_grpc_server
    if getattr(original, "sniper_bound", False):
        return

    def bound(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bound.sniper_bound = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bound


# on the head node, with Serve's proxy and the router: a worker node lost takes no gateway with it
@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}, max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    """One replica of the HTTP front end: it renders and tokenizes its requests itself
    (``cluster.distributed.edge``, through the client) and asks the router actor only for a node."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV) or None
        api.state.api_key = self.api_key  # for the handler of unknown paths
        if config.grpc_on_node_address:
            _bind_internal_grpc_to_node_address()
        self.metrics = GatewayMetrics()
        self._client: Any = None
        self._model: str | None = None
        self._started = int(time.time())

    # -- plumbing ----------------------------------------------------------------------------

    async def _router_client(self) -> Any:
        """The client: it finds the router (and the nodes) by name when it first needs them, and
        again after a router restart (``cluster.distributed.dispatch``)."""
        if self._client is None:
            from cluster.distributed.client import Client

            self._client = Client(namespace=self.config.namespace)
        return self._client

    async def _status(self) -> RouterStatus:
        import ray

        client = await self._router_client()
        try:
            status = await asyncio.wait_for(client.astatus(), STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RouterUnavailableError(f"the router did not answer within {STATUS_TIMEOUT_S:g} s") from None
        except ray.exceptions.RayError as exc:
            raise RouterUnavailableError(f"the router is not reachable: {type(exc).__name__}") from None
        self._model = status.model or self._model
        return status

    async def _model_name(self) -> str:
        if self._model is None:
            await self._status()
        if self._model is None:
            raise NoNodesError("the router did not say which model it serves")
        return self._model

    def _authorize(self, request: Request) -> None:
        if self.api_key is not None and not _authorized(request, self.api_key):
            raise _unauthorized()

    async def _json_body(self, request: Request) -> Any:
        limits = self.config.limits
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limits.max_body_bytes} bytes",
                           code="request_too_large")

        async def read() -> bytearray:
            body = bytearray()
            async for part in request.stream():
                body += part
                if len(body) > limits.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes",
                                   code="request_too_large")
            return body

        try:
            body = await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body was not received within {limits.body_timeout_s:g} s",
                           code="request_timeout") from None
        except (ClientDisconnect, TaskCancelledError):  # Serve's proxy cancels the body's receive when the client goes
            raise CallerGone() from None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise APIError(400, "the request body is JSON nested too deeply") from None

    @api.get("/openapi.json")
    async def openapi(self, request: Request) -> Response:
        """The API's description, for those who hold the key."""
        self._authorize(request)
        return JSONResponse(api.openapi())

    # -- generation --------------------------------------------------------------------------

    async def _generate(self, request: Request, endpoint: str, parse: Any) -> Response:
        started = time.monotonic()
        status_code, events, streaming = 499, None, False  # 499: the caller went away
        self.metrics.in_progress.inc()
        try:
            self._authorize(request)
            body = await self._json_body(request)
            req: APIRequest = parse(body, self.config.limits, await self._model_name())
            client = await self._router_client()
            events = client.aevents(req.prompt, req.params, session_id=req.session_id,
                                    max_prompt_tokens=self.config.limits.max_prompt_tokens,
                                    restartable=not req.stream)  # an answer sent whole can start again elsewhere
            first_event = asyncio.ensure_future(_first_event(events))
            try:
                if req.stream:
                    await asyncio.wait({first_event}, timeout=self.config.keepalive_s)
                    if not first_event.done():  # a slow first token: the response starts, kept alive until it comes
                        streaming = True
                        end = _StreamEnd(events, lambda status: self._finish(endpoint, status, started), first_event)
                        return StreamingResponse(self._sse_kept_alive(req, endpoint, started, first_event, events, end),
                                                 media_type="text/event-stream", background=BackgroundTask(end, 499),
                                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                first, routed = await first_event  # errors before any text keep their HTTP status
            except BaseException:
                first_event.cancel()
                raise
            template = routed.chat_template if routed is not None else None
            answer_format = (routed.chat_format, routed.thinking_open) if routed is not None else (None, False)
            headers = {CHAT_TEMPLATE_HEADER: template} if template else {}
            if req.stream:
                streaming = True
                end = _StreamEnd(events, lambda status: self._finish(endpoint, status, started))
                # the background task runs once the response is over, also when the client went away
                # before its first byte (the body's generator then never starts: nothing else ends it)
                return StreamingResponse(self._sse(req, endpoint, started, first, events, end, answer_format),
                                         media_type="text/event-stream", background=BackgroundTask(end, 499),
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
            if isinstance(first, Piece):
                self.metrics.first_token.labels(endpoint).observe(time.monotonic() - started)
            done = await completion(_resumed(first, events))  # a Restarted item voids the text so far
            self._count_tokens(done.usage)
            status_code = 200
            return JSONResponse(response(req, done.choices, done.usage, done.node, *answer_format), headers=headers)
        except CallerGone:
            status_code = 499  # the client went away while sending its request: nobody to answer
            return Response(status_code=499)
        except Exception as exc:
            error = error_from_exception(exc)
            status_code = error.status
            raise error from None
        finally:
            if not streaming:
                if events is not None:
                    await events.aclose()
                self._finish(endpoint, status_code, started)

    async def _sse_kept_alive(self, req: APIRequest, endpoint: str, started: float, first_event: asyncio.Task[Any],
                              events: AsyncIterator[StreamItem], end: _StreamEnd) -> AsyncIterator[str]:
        """An event stream started before its first token: an SSE comment every ``keepalive_s``
        until the first item comes, then ``_sse``; an error before it ends the stream as an error
        event. (No ``X-Chat-Template`` header: the headers went before the routing said it.)"""
        try:
            while True:
                yield KEEPALIVE_COMMENT
                await asyncio.wait({first_event}, timeout=self.config.keepalive_s)
                if first_event.done():
                    break
            first, routed = first_event.result()
        except Exception as exc:
            error = error_from_exception(exc)
            yield _sse_data(error.body())
            await end(error.status)
            return
        finally:
            if not first_event.done():  # the client went away: the request stops on its node
                await end(499)
        answer_format = (routed.chat_format, routed.thinking_open) if routed is not None else (None, False)
        async for chunk in self._sse(req, endpoint, started, first, events, end, answer_format):
            yield chunk

    async def _sse(self, req: APIRequest, endpoint: str, started: float, first: StreamItem,
                   events: AsyncIterator[StreamItem], end: _StreamEnd,
                   answer_format: tuple[str | None, bool] = (None, False)) -> AsyncIterator[str]:
        status_code = 499  # unless the stream reaches its end or an error
        chunks = StreamChunks(req, *answer_format)
        try:
            item, timed = first, False
            while True:
                if isinstance(item, Piece):
                    if not timed:
                        self.metrics.first_token.labels(endpoint).observe(time.monotonic() - started)
                        timed = True
                    for body in chunks.piece(item.index, item.text, item.logprobs):
                        yield _sse_data(body)
                elif isinstance(item, Cancelled):
                    raise StopAsyncIteration
                elif isinstance(item, Finished):
                    self._count_tokens(item.usage)
                    status_code = 200
                    for body in chunks.end(item):
                        yield _sse_data(body)
                    yield "data: [DONE]\n\n"
                    return
                item = await events.__anext__()
        except StopAsyncIteration:
            status_code = 503
            yield _sse_data(APIError(503, "the stream ended without a final message", type="service_unavailable").body())
        except Exception as exc:  # a node died after sending text: the stream ends with the cause
            error = error_from_exception(exc)
            status_code = error.status
            yield _sse_data(error.body())
        finally:
            await end(status_code)  # a caller that went away cancels the request on its node

    def _count_tokens(self, usage: Usage) -> None:
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generated_tokens.inc(usage.completion_tokens)

    def _finish(self, endpoint: str, status_code: int, started: float) -> None:
        self.metrics.in_progress.dec()
        self.metrics.requests.labels(endpoint, str(status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    # -- routes --------------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", parse_completion)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions", parse_chat)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """llama-server's ``/tokenize``: ``{"tokens": [ids]}``, or ``[{"id", "piece"}]`` with ``with_pieces``."""
        self._authorize(request)
        try:
            spec = parse_tokenize(await self._json_body(request))
            client = await self._router_client()
            tokens = await client.atokenize(spec.content, spec.add_special, spec.parse_special, spec.with_pieces)
            return JSONResponse({"tokens": tokens})
        except Exception as exc:
            raise error_from_exception(exc) from None

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """llama-server's ``/detokenize``: ``{"content": text}`` of ``{"tokens": [ids]}``."""
        self._authorize(request)
        try:
            tokens = parse_detokenize(await self._json_body(request))
            client = await self._router_client()
            return JSONResponse({"content": await client.adetokenize(tokens)})
        except Exception as exc:
            raise error_from_exception(exc) from None

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        try:
            return JSONResponse(models_list(await self._model_name(), self._started))
        except Exception as exc:
            raise error_from_exception(exc) from None

    @api.get("/health")
    async def health(self) -> Response:
        try:
            status = await self._status()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": f"router: {type(exc).__name__}: {exc}"[:300]},
                                status_code=503)
        live = status.live_nodes()
        healthy = [n.name for n in live if not n.crash_looping]
        body = {"status": "ok" if healthy else "unavailable", "policy": status.policy, "nodes": healthy}
        if not live:
            body["reason"] = "no live node is registered with the router"
        elif not healthy:
            body["reason"] = ("every node is crash-looping (its process was replaced repeatedly within minutes): "
                              + ", ".join(f"{n.name} ({n.restarts} restarts)" for n in live))
        return JSONResponse(body, status_code=200 if healthy else 503)

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        try:
            status = await self._status()
        except Exception:
            status = None
        return Response(self.metrics.exposition(status), media_type="text/plain; version=0.0.4; charset=utf-8")


# -- entry points ------------------------------------------------------------------------------

def gateway_app(config: GatewayConfig) -> Any:
    return Gateway.bind(config)


def start_http(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 60.0) -> str:
    """Starts Serve's HTTP proxy on the head node only (local nodes share one host) and the gateway.

    Returns once ``/health`` answers on ``host:port``; a Serve instance already running with
    other HTTP options (Serve keeps its first ones) or a port taken by another program is
    reported instead of leaving the gateway unreachable.
    """
    check_route_free(config.namespace)
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(gateway_app(config), name=app_name(config.namespace), route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=5):
                return url
        except urllib.error.HTTPError:
            return url  # the gateway answered (503 while no node is live yet)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SniperError(f"the gateway does not answer at {url} ({exc}); if Serve was already running with "
                                  f"other HTTP options, remove it first: python -m cluster shutdown") from None
            time.sleep(0.5)


def check_route_free(namespace: str) -> None:
    """Serve routes by path prefix and every gateway answers at ``/``: a second namespace's gateway
    cannot join a running one (Serve would refuse it only after the deployment had started)."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return  # Serve is not running
    for other in serve.status().applications:
        if other != app_name(namespace):
            raise SniperError(f"another Serve application ('{other}') already answers at '/' on this Ray cluster; "
                              f"remove it first (python -m cluster shutdown --namespace ...) or serve without --http")


BUILD_ARGS = ("model", "nodes", "cache_mb", "threads", "slots", "policy", "namespace", "api_key", "max_tokens_limit",
              "max_prompt_tokens", "max_body_bytes", "chat_template", "expert_selection", "selection_max_weight",
              "selection_min_ratio")
_SELECTION_ARGS = {"expert_selection": "mode", "selection_max_weight": "max_changed_weight",
                   "selection_min_ratio": "min_score_ratio"}
"""build_app's expert-selection arguments and the ``ExpertSelection`` field each sets."""


def expert_selection_arg(args: dict[str, Any]) -> ExpertSelection:
    """The deployment's ``ExpertSelection`` from build_app's arguments (a Serve config's values:
    numbers or their text); the defaults where absent. Checked by ``ExpertSelection.validate``,
    its error naming the argument. Raises InvalidParameterError."""
    fields: dict[str, Any] = {}
    for arg, name in _SELECTION_ARGS.items():
        if arg in args:
            value = args[arg]
            if name != "mode" and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass  # validate names it
            fields[name] = value
    selection = ExpertSelection(**fields)
    try:
        selection.validate()
    except InvalidParameterError as exc:
        arg = {name: a for a, name in _SELECTION_ARGS.items()}.get(exc.param or "", exc.param)  # the mode's: itself
        raise InvalidParameterError(f"{arg}: {exc}" if arg else str(exc), param=arg) from None
    return selection


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: cluster.api.gateway:build_app``).

    With ``model``, it first deploys the router and ``nodes`` node actors unless the namespace
    already has a router; without, it fronts an existing deployment. ``chat_template`` (a Jinja
    file) overrides the model's template in the deployment it creates, so it needs ``model``; so
    do ``expert_selection`` (``exact``, the default, or ``cache-aware``), ``selection_max_weight``
    and ``selection_min_ratio`` (its bounds: ``cluster.engine.expert_selection``).
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise InvalidParameterError(f"unknown gateway argument(s) {', '.join(unknown)}; expected {', '.join(BUILD_ARGS)}")
    namespace = str(args.get("namespace", NAMESPACE))
    limits = Limits(**{name: int(args[key]) for key, name in (("max_tokens_limit", "max_tokens"),
                                                               ("max_prompt_tokens", "max_prompt_tokens"),
                                                               ("max_body_bytes", "max_body_bytes")) if key in args})
    for name in ("chat_template", *_SELECTION_ARGS):
        if name in args and "model" not in args:
            raise InvalidParameterError(f"{name} is a setting of the deployment build_app creates: give model too",
                                        param=name)
    if "model" in args:
        cache_mb = parse_cache_mb(args["cache_mb"] if "cache_mb" in args
                                  else os.environ.get("SNIPER_CACHE_MB") or None)  # as `serve`
        from cluster.distributed.deploy import read_chat_template

        slots = args.get("slots", 4)
        if not str(slots).isdigit() or not 1 <= int(slots) <= MAX_SLOTS:
            raise InvalidParameterError(f"slots must be an integer in [1, {MAX_SLOTS}], got {slots!r}", param="slots")
        selection = expert_selection_arg(args)
        _ensure_deployment(str(args["model"]), int(args.get("nodes", 1)),
                           cache_mb,
                           args.get("threads"), str(args.get("policy", "warmth")), namespace,
                           read_chat_template(args.get("chat_template")), int(slots), selection)
    return gateway_app(GatewayConfig(namespace=namespace, api_key=args.get("api_key"), limits=limits))


def _ensure_deployment(model: str, nodes: int, cache_mb: int | str | None, threads: Any, policy: str, namespace: str,
                       chat_template: str | None = None, slots: int = 4,
                       expert_selection: ExpertSelection = EXACT_SELECTION) -> None:
    """Deploys unless the namespace has a router; no ``cache_mb``: a budget that holds the whole model."""
    import ray

    from cluster.distributed import deploy
    from cluster.distributed.connection import connect

    connect(None, namespace)
    try:
        ray.get_actor(ROUTER_NAME, namespace=namespace)
        return
    except ValueError:
        pass
    deploy.deploy(model, nodes, cache_bytes=deploy.cache_budget(model, cache_mb), policy=policy, namespace=namespace,
                  n_threads=int(threads) if threads else None, chat_template=chat_template, n_slots=slots,
                  expert_selection=expert_selection)
