"""`xdna serve`: an OpenAI-compatible transcription server for one Whisper model, with a local web page.

    cli.py      the `xdna serve` flags and runner (uvicorn on 127.0.0.1 unless --host)
    app.py      FastAPI app: /v1/audio/transcriptions, /v1/audio/translations, /v1/models, /health, the page at /
    engine.py   the loaded model, the bounded job queue, worker threads, cancellation
    upload.py   multipart bodies streamed into the server's own temporary files, size limit while streaming
    static/     the page (HTML, JS, CSS; nothing from the network)

Needs the `server` extra: pip install 'onnxruntime-ep-xdna[server]'.
"""
