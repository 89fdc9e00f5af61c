"""`xdna serve`: the parser (standard library only) and the runner (imports the `server` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys


class _DecodingOnly:
    """Takes `xdna transcribe`'s decoding flags (its 'decoding' argument group) and nothing else, so that the
    server's decoding defaults are set with exactly the same flags."""

    def __init__(self, parser: argparse.ArgumentParser):
        self._parser = parser

    def add_argument(self, *args, **kwargs):  # files, --format, -o, ...: not for a server
        return None

    def add_argument_group(self, title=None, *args, **kwargs):
        if title and title.startswith("decoding"):
            return self._parser.add_argument_group(title, *args, **kwargs)
        return self


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="base", help="base | tiny.en | DIR with an optimum ONNX export (default base)")
    parser.add_argument("--provider", choices=("xdna", "cpu"), default="xdna",
                        help="run the model's MatMuls on the XDNA EP (default) or everything on the CPU EP")
    try:
        from ..whisper.cli import add_precision_argument

        add_precision_argument(parser)
    except ImportError:
        pass
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("XDNA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $XDNA_API_KEY, else none)")
    parser.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload in MB (default 25)")
    parser.add_argument("--max-audio-seconds", type=float, default=3 * 3600.0,
                        help="longest audio accepted (default 10800 = 3 h)")
    parser.add_argument("--max-queue", type=int, default=4,
                        help="jobs waiting behind the running ones; beyond that requests get 429 (default 4)")
    parser.add_argument("--workers", type=int, default=1,
                        help="transcriptions running at once on the one model (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds an upload may take, and again a job (waiting + transcribing) (default 600)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM/Ctrl-C: seconds running jobs get to finish (queued ones get 503)")
    parser.add_argument("--language", help="default language code; detected per request if absent")
    try:
        from ..whisper.cli import add_transcribe_arguments

        add_transcribe_arguments(_DecodingOnly(parser))
    except ImportError:
        pass


def _transcribe_namespace(args) -> argparse.Namespace:
    """`xdna transcribe`'s defaults overlaid with the decoding flags given to `xdna serve`."""
    from ..whisper.cli import add_transcribe_arguments

    full = argparse.ArgumentParser()
    add_transcribe_arguments(full)
    ns = full.parse_args([])
    for key, value in vars(args).items():
        if hasattr(ns, key) and key not in ("files", "model", "provider", "precision"):
            setattr(ns, key, value)
    ns.task = "transcribe"
    return ns


def _model_id(model: str) -> str:
    p = os.path.basename(os.path.normpath(model))
    return p or model


def run_serve(args) -> int:
    def err(msg: str) -> int:
        print(f"xdna serve: error: {msg}", file=sys.stderr)
        return 1

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        return err(f"needs the server extra: pip install 'onnxruntime-ep-xdna[server]' ({e})")
    from ..whisper.cli import options_from_args
    from ..whisper.onnx_model import TranscribeError
    from ..whisper.options import OptionsError
    from ..whisper.transcribe import WhisperModel
    from .app import ServerConfig, backend_facts, create_app

    try:
        options = options_from_args(_transcribe_namespace(args))
    except OptionsError as e:
        return err(str(e))
    for name in ("max_upload_mb", "max_audio_seconds", "timeout"):
        if not getattr(args, name) > 0:
            return err(f"--{name.replace('_', '-')} must be > 0")
    if args.max_queue < 0 or args.workers < 1:
        return err("--max-queue must be >= 0 and --workers >= 1")
    try:
        model = WhisperModel(args.model, provider=args.provider, log=lambda m: print(m, file=sys.stderr),
                             precision=getattr(args, "precision", None))
    except TranscribeError as e:
        return err(str(e))
    if options.language is not None and model.onnx.is_multilingual and options.language not in model.onnx.lang_to_id:
        return err(f"unknown language {options.language!r}")
    config = ServerConfig(model_id=_model_id(args.model), provider=model.onnx.provider, options=options,
                          api_key=args.api_key or None, max_upload_mb=args.max_upload_mb,
                          max_audio_seconds=args.max_audio_seconds, timeout=args.timeout, workers=args.workers,
                          max_queue=args.max_queue)
    app = create_app(model, config)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        # Listen before announcing the URL: a client that reads "listening on" and connects before uvicorn starts
        # would otherwise be refused (seen in CI). uvicorn's own listen() later only resets the backlog.
        sock.listen(2048)
    except OSError as e:
        return err(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    host, port = sock.getsockname()[:2]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not config.api_key:
        print(f"xdna serve: warning: listening on {host} without --api-key: anyone who can reach this machine "
              "can use it", file=sys.stderr)
    engine = app.state.engine
    uv_config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout,
                               timeout_keep_alive=5, limit_concurrency=max(64, 4 * (args.workers + args.max_queue)))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # first signal: stop taking work, queued jobs get 503
            engine.begin_shutdown()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown (the process would die of it); a finished
            # graceful shutdown is a normal end here: exit status 0.
            if hasattr(self, "_captured_signals") and sig == signal.SIGTERM:
                self._captured_signals.clear()

    server = Server(uv_config)
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    facts = backend_facts(model.onnx.provider)
    print(f"xdna serve: model {config.model_id} on {model.onnx.provider} (backend {facts['backend']}: "
          f"{facts.get('backend_reason', '')})", file=sys.stderr)
    print(f"xdna serve: listening on http://{url_host}:{port}  (page: http://{url_host}:{port}/, API: "
          f"http://{url_host}:{port}/v1)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print("xdna serve: stopped", file=sys.stderr)
    return 0
