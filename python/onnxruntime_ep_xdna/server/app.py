"""The FastAPI application: OpenAI's audio endpoints, /v1/models, /health and the page at `/`.

Every error is an OpenAI-style object `{"error": {"message", "type", "param", "code"}}`; bad input is a 4xx
(400 bad field or audio, 401 key, 404 model, 413 too large, 415 not multipart / not audio, 429 queue full,
503 shutting down, 504 over --timeout), and a 500 only means a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..whisper import formats
from ..whisper.audio import AudioError
from ..whisper.languages import language_name
from ..whisper.onnx_model import TranscribeError
from ..whisper.options import OPTION_NAMES, OptionsError, TranscriptionOptions
from .engine import Cancelled, Engine, Job, QueueFull, ShuttingDown
from .upload import UploadError, read_form

STATIC = Path(__file__).resolve().parent / "static"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
          "timestamp_granularities", "stream"}
WORDS = "word_timestamps" in OPTION_NAMES  # word-level timestamps, when the transcriber has them
MODEL_ALIASES = ("whisper-1",)  # what clients send by default

# Leading bytes of containers/codecs we (soundfile, or ffmpeg when present) can decode. A file that fails to
# decode is "unsupported" (415) when it starts with none of them, "corrupt" (400) otherwise.
MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b"caff", b"\x1aE\xdf\xa3", b"#!AMR", b".snd",
         b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1", b"\xff\xf9")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


@dataclass
class ServerConfig:
    model_id: str
    provider: str = "XDNAExecutionProvider"
    options: TranscriptionOptions = TranscriptionOptions()
    api_key: str | None = None
    max_upload_mb: float = 25.0  # OpenAI's own limit
    max_audio_seconds: float = 3 * 3600.0
    timeout: float = 600.0  # seconds for an upload, and again for a job (queue wait + transcription)
    workers: int = 1
    max_queue: int = 4
    tmp_dir: str | None = None


def backend_facts(provider: str) -> dict:
    """Where the GEMMs run: the XDNA EP's device metadata (NPU or emulator, and why), or the CPU EP."""
    import onnxruntime as ort

    from .. import EP_NAME

    if provider != EP_NAME:
        return {"backend": "cpu", "backend_reason": f"--provider cpu: every node on {provider}"}
    for dev in ort.get_ep_devices():
        if dev.ep_name == EP_NAME:
            meta = dict(dev.ep_metadata)
            return {"backend": meta.get("backend", "unknown"), "backend_device": meta.get("backend_device", ""),
                    "backend_reason": meta.get("backend_reason", "")}
    return {"backend": "unknown", "backend_reason": "the XDNA EP reports no device"}


def create_app(model, config: ServerConfig) -> FastAPI:
    """`model`: a loaded WhisperModel (the one model of this process)."""
    import tempfile

    engine = Engine(model, workers=config.workers, max_queue=config.max_queue)
    tmp_dir = tempfile.mkdtemp(prefix="xdna-serve-", dir=config.tmp_dir)
    onnx = model.onnx
    facts = backend_facts(onnx.provider)
    max_bytes = int(config.max_upload_mb * 2**20)
    started = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.begin_shutdown()
        engine.cancel_all()
        await asyncio.to_thread(engine.close)
        try:
            for name in os.listdir(tmp_dir):  # nothing should be left; make sure
                os.unlink(os.path.join(tmp_dir, name))
            os.rmdir(tmp_dir)
        except OSError:
            pass

    app = FastAPI(title="xdna serve", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.config, app.state.tmp_dir = engine, config, tmp_dir

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(400, f"invalid request: {e.errors()[:1]}", code="invalid_request")

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        import traceback

        print(f"xdna serve: internal error on {request.method} {request.url.path}:\n"
              + "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
        return error_response(500, f"internal error ({type(e).__name__}); this is a bug, please report it",
                              code="internal_error")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        # The page loads nothing from elsewhere; say so to the browser too.
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; media-src 'self' blob:; img-src 'self' data:")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def check_key(request: Request) -> None:
        if not config.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_ids() -> list[str]:
        return [config.model_id, *[a for a in MODEL_ALIASES if a != config.model_id]]

    # ---- small endpoints ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "shutting_down" if engine.snapshot()["closing"] else "ok", "model": config.model_id,
                "multilingual": onnx.is_multilingual,
                "languages": sorted(onnx.lang_to_id) if onnx.is_multilingual else ["en"], "provider": onnx.provider, **facts,
                "auth_required": bool(config.api_key), "max_upload_mb": config.max_upload_mb,
                "max_audio_seconds": config.max_audio_seconds, "word_timestamps": WORDS,
                "queue": engine.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": started,
                                            "owned_by": "onnxruntime-ep-xdna"} for m in model_ids()]}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str, request: Request):
        check_key(request)
        if model_id not in model_ids():
            raise ApiError(404, f"model {model_id!r} is not served here (this server has {config.model_id!r})",
                           param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": started, "owned_by": "onnxruntime-ep-xdna"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- transcription -----------------------------------------------------------------------------------------
    def request_options(form, task: str) -> tuple[TranscriptionOptions, str, bool, bool]:
        unknown = sorted(set(form.fields) - FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; this endpoint takes "
                           f"{', '.join(sorted(FIELDS))}", param=unknown[0], code="unknown_parameter")
        if form.file_path is None:
            raise ApiError(400, "no audio: send the file in a multipart field named 'file'", param="file",
                           code="missing_file")
        model_name = form.get("model")
        if model_name and model_name not in model_ids():
            raise ApiError(404, f"model {model_name!r} is not served here; use one of {', '.join(model_ids())}",
                           param="model", code="model_not_found")
        fmt = (form.get("response_format") or "json").strip()
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format", code="invalid_value")
        stream = (form.get("stream") or "false").strip().lower()
        if stream not in ("true", "false", "1", "0"):
            raise ApiError(400, f"stream must be true or false, not {stream!r}", param="stream", code="invalid_value")
        stream_on = stream in ("true", "1")
        grains = set(form.fields.get("timestamp_granularities[]", []) + form.fields.get("timestamp_granularities", []))
        bad = sorted(grains - {"segment", "word"})
        if bad:
            raise ApiError(400, f"timestamp_granularities: {bad[0]!r} is not segment or word",
                           param="timestamp_granularities", code="invalid_value")
        if grains and fmt != "verbose_json":
            raise ApiError(400, "timestamp_granularities needs response_format=verbose_json",
                           param="timestamp_granularities", code="invalid_value")
        words = "word" in grains
        if words and not WORDS:
            raise ApiError(400, "word timestamps are not available in this version of the transcriber; "
                           "use timestamp_granularities[]=segment", param="timestamp_granularities",
                           code="unsupported_value")
        kwargs: dict = {"task": task}
        language = (form.get("language") or "").strip().lower() or None
        if language is not None:
            if onnx.is_multilingual and language not in onnx.lang_to_id:
                raise ApiError(400, f"unknown language {language!r}; the model knows "
                               f"{', '.join(sorted(onnx.lang_to_id))}", param="language", code="invalid_value")
            if not onnx.is_multilingual and language != "en":
                raise ApiError(400, f"the model {config.model_id!r} is English-only: language {language!r} is not "
                               "possible", param="language", code="invalid_value")
            kwargs["language"] = language if onnx.is_multilingual else None
        if task == "translate" and not onnx.is_multilingual:
            raise ApiError(400, f"the model {config.model_id!r} is English-only: it cannot translate",
                           param="model", code="invalid_value")
        prompt = form.get("prompt")
        if prompt:
            kwargs["initial_prompt"] = prompt
        temp = form.get("temperature")
        if temp is not None and temp.strip():
            try:
                t = float(temp)
            except ValueError:
                t = float("nan")
            if not (math.isfinite(t) and 0.0 <= t <= 1.0):
                raise ApiError(400, f"temperature must be a number from 0 to 1, not {temp!r}", param="temperature",
                               code="invalid_value")
            if t > 0:  # OpenAI: 0 = raise the temperature automatically (the fallback schedule); t > 0 starts there
                n = int(round((1.0 - t) / 0.2))
                kwargs["temperature"] = tuple(round(min(1.0, t + 0.2 * i), 6) for i in range(max(n, 0) + 1))
        if words:
            kwargs["word_timestamps"] = True
        try:
            options = TranscriptionOptions.from_kwargs(config.options, **kwargs)
        except OptionsError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        return options, fmt, stream_on, words

    def check_audio(form) -> float | None:
        """Runs on a worker thread: the file decodes and is not too long. Returns its duration when known."""
        from ..whisper.audio import probe

        if form.file_size == 0:
            raise ApiError(400, "the uploaded file is empty (0 bytes)", param="file", code="empty_file")
        name = form.file_name or "the upload"
        try:
            info = probe(form.file_path)
        except AudioError as e:
            reason = scrub(str(e), form.file_path, name).split(": ", 1)[-1]
            if not form.head.startswith(MAGIC) and not _looks_like_mp4(form.head):
                raise ApiError(415, f"{name}: not an audio format this server can decode ({reason}); send wav, "
                               "flac, ogg or mp3 (other formats need ffmpeg on the server)", param="file",
                               code="unsupported_file_type") from None
            raise ApiError(400, f"{name}: corrupt or unreadable audio ({reason})", param="file",
                           code="invalid_audio") from None
        if info.duration is not None and info.duration > config.max_audio_seconds:
            raise ApiError(400, f"{name}: {info.duration:.0f} s of audio is longer than this server's limit of "
                           f"{config.max_audio_seconds:.0f} s (--max-audio-seconds)", param="file",
                           code="audio_too_long")
        if info.duration is not None and info.duration == 0:
            raise ApiError(400, f"{name}: contains no audio samples (zero length)", param="file", code="empty_audio")
        return info.duration

    async def transcription(request: Request, task: str):
        check_key(request)
        try:
            place = engine.admit()
        except QueueFull as e:
            return error_response(429, str(e), code="queue_full", headers={"Retry-After": "2"})
        except ShuttingDown as e:
            return error_response(503, str(e), code="shutting_down")
        form = None
        handed_over = False
        try:
            try:
                form = await asyncio.wait_for(read_form(request, max_bytes, tmp_dir), config.timeout)
            except UploadError as e:
                return error_response(e.status, e.message, e.param, e.code,
                                      headers={"Connection": "close"} if e.status == 413 else None)
            except asyncio.TimeoutError:
                return error_response(408, f"the upload took longer than {config.timeout:g} s (--timeout)",
                                      code="upload_timeout", headers={"Connection": "close"})
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening
            options, fmt, stream, words = request_options(form, task)
            await asyncio.to_thread(check_audio, form)
            job = Job(form.file_path, options)
            if stream:
                handed_over = True
                running: list = []  # the job's asyncio task, once the event generator has started it

                def free(*_):
                    form.cleanup()
                    place.release()

                def on_close():  # the response ended: normally, by an error, or the client went away
                    if running and not running[0].done():
                        job.cancel("client disconnected")
                        running[0].add_done_callback(free)  # the upload is freed when the worker lets go of it
                    else:
                        free()

                return _Stream(stream_events(job, words, running), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, on_close=on_close)
            result, seconds = await run_watched(request, job, form.file_name or "the upload")
            return render(result, seconds, fmt, task, words, job)
        except ApiError as e:
            return error_response(e.status, e.message, e.param, e.code, e.headers)
        finally:
            if not handed_over:
                if form is not None:
                    form.cleanup()
                place.release()

    async def run_watched(request: Request, job: Job, name: str):
        """Runs the job; cancels it when the client disconnects or the deadline passes."""
        task = asyncio.ensure_future(engine.run(job))

        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=config.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                job.cancel("client disconnected" if watcher in done else "timeout")
                try:
                    await task
                except Exception:
                    pass
                if watcher in done:
                    raise ApiError(499, "client disconnected", code="client_closed")
                raise ApiError(504, f"transcription took longer than {config.timeout:g} s (--timeout)",
                               code="timeout")
            return map_errors(task, job, name)
        except asyncio.CancelledError:  # the server is stopping this request
            job.cancel("request cancelled")
            raise
        finally:
            watcher.cancel()

    def map_errors(task, job: Job, name: str):
        try:
            return task.result()
        except ShuttingDown as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        except Cancelled as e:
            raise ApiError(503, f"the job was cancelled ({e.reason})", code="cancelled") from None
        except AudioError as e:
            raise ApiError(400, scrub(str(e), job.path, name), param="file", code="invalid_audio") from None
        except (OptionsError, TranscribeError) as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    def verbose(result, seconds, task, words, job) -> dict:
        # OpenAI's verbose_json names the language ("english"); the code stays in x_xdna for clients that want it.
        doc = {"task": task, "language": language_name(result.language), "duration": round(result.duration, 3),
               "text": result.text, "segments": [segment_json(s) for s in result.segments],
               "usage": {"type": "duration", "seconds": math.ceil(result.duration)}}
        if words:
            doc["words"] = [w for s in result.segments for w in words_json(s)]
        doc["x_xdna"] = {**run_facts(result, seconds), "language_code": result.language}
        return doc

    def run_facts(result, seconds) -> dict:
        return {"model": config.model_id, "provider": onnx.provider, "backend": facts["backend"],
                "processing_s": round(seconds, 3),
                "rtf": round(seconds / result.duration, 4) if result.duration else None}

    def render(result, seconds, fmt, task, words, job) -> Response:
        headers = {"X-Audio-Seconds": f"{result.duration:.3f}", "X-Processing-Seconds": f"{seconds:.3f}",
                   "X-Backend": facts["backend"], "X-Provider": onnx.provider}
        if fmt == "json":
            return JSONResponse({"text": result.text, "usage": {"type": "duration",
                                                                 "seconds": math.ceil(result.duration)}},
                                headers=headers)
        if fmt == "verbose_json":
            return JSONResponse(verbose(result, seconds, task, words, job), headers=headers)
        if fmt == "text":
            return PlainTextResponse(result.text + "\n", headers=headers)
        return PlainTextResponse(formats.render(result, fmt), headers=headers)

    async def stream_events(job: Job, words, running: list):
        """Server-sent events: one `transcript.text.delta` per segment (with the segment), then
        `transcript.text.done` with the text, the segments, every download format and where it ran."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.on_segment = lambda s: loop.call_soon_threadsafe(queue.put_nowait, s)
        task = asyncio.ensure_future(engine.run(job))
        running.append(task)
        task.add_done_callback(lambda _: queue.put_nowait(None))
        deadline = loop.time() + config.timeout
        try:
            yield sse({"type": "transcript.progress", "stage": "started"})
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    job.cancel("timeout")
                    yield sse(error_body(504, f"transcription took longer than {config.timeout:g} s (--timeout)",
                                         code="timeout"))
                    return
                if item is None:
                    break
                seg = segment_json(item)
                event = {"type": "transcript.text.delta", "delta": item.text, "segment": seg}
                if job.info is not None and job.info.duration:
                    event["progress"] = round(min(1.0, item.end / job.info.duration), 4)
                if words:
                    event["words"] = words_json(item)
                yield sse(event)
            try:
                result, seconds = map_errors(task, job, "the upload")
            except ApiError as e:
                yield sse(error_body(e.status, e.message, e.param, e.code))
                return
            done = {"type": "transcript.text.done", "text": result.text, "language": result.language,
                    "duration": round(result.duration, 3), "segments": [segment_json(s) for s in result.segments],
                    "usage": {"type": "duration", "seconds": math.ceil(result.duration)},
                    "formats": {"txt": formats.render(result, "txt"), "srt": formats.render(result, "srt"),
                                "vtt": formats.render(result, "vtt"), "json": formats.render(result, "json")},
                    "x_xdna": run_facts(result, seconds)}
            yield sse(done)
        finally:  # normal end, client gone (the generator is cancelled or closed), or an error: see _Stream
            if not task.done():
                job.cancel("client disconnected")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await transcription(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await transcription(request, "translate")

    return app


class _Stream(StreamingResponse):
    """A StreamingResponse that frees its request's upload and queue place however it ends, also when the client
    is gone before the event generator ever ran (then the generator's own `finally` never runs)."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # idempotent: cancel (no-op once done), delete, release


def _looks_like_mp4(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] == b"ftyp"


def scrub(message: str, path: str | None, name: str) -> str:
    """The server's temporary file name never goes back to the client: it is the client's file name there."""
    return message.replace(path, name) if path else message


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def segment_json(s) -> dict:
    return {"id": s.id, "seek": s.seek, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
            "tokens": list(s.tokens), "temperature": s.temperature, "avg_logprob": round(float(s.avg_logprob), 4),
            "compression_ratio": round(float(s.compression_ratio), 4),
            "no_speech_prob": round(float(s.no_speech_prob), 4)}


def words_json(s) -> list[dict]:
    out = []
    for w in getattr(s, "words", None) or []:
        get = (lambda k: w.get(k)) if isinstance(w, dict) else (lambda k: getattr(w, k, None))
        out.append({"word": get("word"), "start": round(float(get("start")), 3), "end": round(float(get("end")), 3)})
    return out
