"""The OpenAI-compatible chat API: POST /v1/chat/completions and GET /v1/models.

Stateless: a request's `messages` are the whole conversation. The sampler starts from a preset
(the server's, or the request's `preset`) and takes the request's settings on top: `max_tokens`
is the answer canvas, `temperature`, `top_p`, `stop` and `seed` mean what they mean to OpenAI, and
the diffusion settings come as extra body fields (steps, block_length, threshold, cache,
cfg_scale, remasking). With `stream`, the answer arrives as server-sent events: one chunk per
newly settled stretch of text, then a chunk with `finish_reason` and `usage`, then `[DONE]`.
Errors are OpenAI's error bodies: 400 for a bad setting or a prompt that does not fit, 401 for a
wrong key, 404 for another model's name.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ldm.errors import ConfigError, LdmError
from ldm.sampling.prompts import check_prompt_text
from ldm.sampling.sampler import ModelFn, check_model_cache
from ldm.sampling.settings import SamplerSettings
from ldm.serve.batcher import Batcher, Job
from ldm.serve.settings import API_FIELDS, page_sampler
from ldm.tokenizer import encode_chat

ROLES = ("system", "user", "assistant")
# request field -> sampler setting; max_completion_tokens is the newer name of max_tokens
SETTING_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                 **{k: k for k in API_FIELDS if k != "max_new_tokens"}}
WHOLE = ("max_tokens", "max_completion_tokens", "steps", "block_length")
REAL = ("temperature", "top_p", "threshold", "cfg_scale")


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def body(self) -> Dict[str, Any]:
        """Return OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class ChatRequest:
    """A checked request: prompt ids, sampler settings, and how to answer it."""

    prompt: List[int]
    settings: SamplerSettings
    seed: int
    stops: List[str]
    stream: bool


class ChatApi:
    """What the API needs to answer: the tokenizer, presets, model limits and the batcher."""

    def __init__(self, batcher: Batcher, tok, presets: Dict[str, Any], default_preset: str, *,
                 model_id: str, max_positions: Optional[int], model_fn: ModelFn,
                 system: Optional[str] = None, seed: int = 0, api_key: Optional[str] = None):
        self.batcher, self.tok, self.presets, self.default = batcher, tok, presets, default_preset
        self.model_id, self.max_positions, self.model_fn = model_id, max_positions, model_fn
        self.system, self.seed, self.api_key = system, seed, api_key or None
        self.created = int(time.time())

    # --- checks ------------------------------------------------------------------------------

    def check_key(self, authorization: Optional[str]) -> None:
        """Raise ApiError(401) unless the request carries the server's key (when it has one)."""
        if self.api_key is None:
            return
        given = (authorization or "").strip()
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                "with the server's serve.api_key (or LDM_API_KEY)",
                           code="invalid_api_key")

    def messages(self, body: Dict[str, Any]) -> List[Dict[str, str]]:
        """Return the conversation of the request as {role, content} text messages."""
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "messages must be a non-empty list of {role, content}",
                           "messages")
        out = []
        for i, message in enumerate(raw):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                raise ApiError(400, f"messages[{i}].role={role!r}; accepted: "
                                    f"{', '.join(ROLES)}", f"messages[{i}].role")
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text parts are understood
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content has a part that is not text; "
                                        f"this model reads text only", f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string",
                               f"messages[{i}].content")
            try:
                check_prompt_text(content, f"messages[{i}].content")
            except ConfigError as err:
                raise ApiError(400, str(err), f"messages[{i}].content") from None
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "user":
            raise ApiError(400, f"the last message is from the {out[-1]['role']}; the model "
                                f"answers a user message, so end with one", "messages")
        if self.system and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.system})
        return out

    def settings(self, body: Dict[str, Any]) -> SamplerSettings:
        """Return the request's sampler settings: its preset with its own values on top."""
        preset = body.get("preset", self.default)
        if preset is None:
            preset = self.default
        if not isinstance(preset, str) or preset not in self.presets:
            raise ApiError(400, f"preset={preset!r} is unknown; accepted: "
                                f"{', '.join(self.presets)}", "preset")
        values: Dict[str, Any] = {}
        for field, setting in SETTING_NAMES.items():
            value = body.get(field)
            if value is None:
                continue
            if field in WHOLE and (isinstance(value, bool) or not isinstance(value, int)):
                raise ApiError(400, f"{field}={value!r} must be a whole number", field)
            if field in REAL and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ApiError(400, f"{field}={value!r} must be a number", field)
            if field in ("remasking", "cache") and not isinstance(value, str):
                raise ApiError(400, f"{field}={value!r} must be a string", field)
            values[setting] = value
        if values.get("threshold") == 0:
            values["threshold"] = None  # 0 = off, as on the page
        if "top_p" in values and not 0 < values["top_p"] <= 1:
            raise ApiError(400, f"top_p={values['top_p']} must be in (0, 1]", "top_p")
        try:
            settings = page_sampler(self.presets, preset, values,
                                    max_new_tokens=values.get("max_new_tokens"),
                                    max_positions=self.max_positions, accepted=API_FIELDS)
            check_model_cache(self.model_fn, settings)
        except LdmError as err:
            message = str(err).replace("sampler.max_new_tokens", "max_tokens").replace(
                "sampler.", "")
            param = next((f for f in SETTING_NAMES if message.startswith(f + "=")), None)
            raise ApiError(400, message, param) from None
        return settings

    def parse(self, body: Any) -> ChatRequest:
        """Return the checked request, or raise ApiError naming the first bad value."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model={model!r} is not served here; accepted: "
                                f"{self.model_id!r}", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, f"n={body.get('n')!r}; accepted: 1 (one answer per request)",
                           "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream={stream!r} must be true or false", "stream")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, f"stop={stop!r} must be a string or a list of strings", "stop")
        seed = body.get("seed", self.seed)
        seed = self.seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ApiError(400, f"seed={seed!r} must be a whole number", "seed")
        messages = self.messages(body)
        settings = self.settings(body)
        ids = encode_chat(self.tok, messages, add_generation_prompt=True)[0]
        budget = settings.prompt_budget
        if budget is not None and len(ids) > budget:
            raise ApiError(400, f"the messages are {len(ids)} tokens with the chat layout; + "
                                f"max_tokens={settings.max_new_tokens} = "
                                f"{len(ids) + settings.max_new_tokens} exceeds the model's "
                                f"{self.max_positions} positions: send fewer or shorter "
                                f"messages, or lower max_tokens", "messages",
                           "context_length_exceeded")
        return ChatRequest(ids, settings, seed, [s for s in stops if s], stream)

    # --- answers -----------------------------------------------------------------------------

    def submit(self, request: ChatRequest) -> tuple:
        """Queue the request; return (job, asyncio queue of (kind, payload) events)."""
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue" = asyncio.Queue()

        def emit(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(request.prompt, request.settings, emit, seed=request.seed,
                  stops=request.stops)
        self.batcher.submit(job)
        return job, events

    def usage(self, request: ChatRequest, done: Dict[str, Any]) -> Dict[str, int]:
        """Return the usage block: prompt and completion tokens, and the model calls run."""
        prompt = len(request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": done["completion_tokens"],
                "total_tokens": prompt + done["completion_tokens"],
                "model_calls": done["model_calls"]}

    def head(self, kind: str) -> Dict[str, Any]:
        """Return the fields every response or chunk starts with."""
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_id}

    async def complete(self, request: ChatRequest) -> Dict[str, Any]:
        """Return the chat.completion body of a request answered whole."""
        job, events = self.submit(request)
        try:
            while True:
                kind, payload = await events.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    break
        finally:
            job.cancelled.set()  # a no-op once answered; a dropped request leaves its batch
        return {**self.head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": payload["text"]},
                             "finish_reason": payload["finish_reason"], "logprobs": None}],
                "usage": self.usage(request, payload)}

    async def chunks(self, request: ChatRequest):
        """Yield the server-sent events of a streamed answer."""
        job, events = self.submit(request)
        head = self.head("chat.completion.chunk")

        def event(delta: Dict[str, Any], finish: Optional[str] = None, **extra) -> str:
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                          "logprobs": None}], **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        try:
            yield event({"role": "assistant", "content": ""})
            while True:
                kind, payload = await events.get()
                if kind == "text":
                    yield event({"content": payload})
                elif kind == "done":
                    yield event({}, payload["finish_reason"],
                                usage=self.usage(request, payload))
                    break
                else:
                    error = ApiError(500, f"the model run failed: {type(payload).__name__}: "
                                          f"{payload}", kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    def models(self) -> Dict[str, Any]:
        """Return the /v1/models body: the one model served."""
        return {"object": "list", "data": [{"id": self.model_id, "object": "model",
                                            "created": self.created, "owned_by": "ldm"}]}


def build_api(api: ChatApi):
    """Return a FastAPI app with the API's routes (the page, if any, is mounted beside them)."""
    app = FastAPI(title="ldm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def refused(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_key(request.headers.get("authorization"))
        return api.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        api.check_key(request.headers.get("authorization"))
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        checked = api.parse(body)
        if checked.stream:
            return StreamingResponse(api.chunks(checked), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await api.complete(checked)
        except ApiError:
            raise
        except BaseException as err:  # noqa: BLE001 - a failed run is an error body
            if isinstance(err, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            raise ApiError(500, f"the model run failed: {type(err).__name__}: {err}",
                           kind="server_error") from None

    return app


class Running:
    """A uvicorn server on a background thread: its url, and close() to stop it."""

    def __init__(self, app, host: str, port: int):
        import threading

        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.url = f"http://{host}:{port}/"
        self.thread = threading.Thread(target=self.server.run, name="ldm-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LdmError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)

    def wait(self) -> None:
        """Block until the server stops (Ctrl+C)."""
        while self.thread.is_alive():
            self.thread.join(timeout=0.5)

    def close(self) -> None:
        """Stop the server and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
