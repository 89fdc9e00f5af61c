"""`xdna serve` with real parts: the CLI started as a process (uvicorn on a loopback port), called by the official
`openai` client and by httpx, and its page driven in a real headless Chromium.

Protocol tests use the tiny random-weight Whisper (its text is noise, but deterministic: compared with
transcribe() run here on the same model). Transcript content is checked with the real whisper-base (cached by
`xdna model fetch base`; skipped with XDNA_SKIP_REAL_MODEL). The browser test needs Debian's chromium and
chromium-driver (.ci/run installs them); it skips with the reason where they are absent, except in CI.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")
pytest.importorskip("fastapi", reason="the server extra is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from onnxruntime_ep_xdna.whisper import formats  # noqa: E402
from onnxruntime_ep_xdna.whisper.cli import sample_path  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import word_error_rate  # noqa: E402
from onnxruntime_ep_xdna.whisper.languages import LANGUAGE_NAMES, language_name  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper  # noqa: E402
from onnxruntime_ep_xdna.whisper.options import OPTION_NAMES  # noqa: E402
from onnxruntime_ep_xdna.whisper.transcribe import transcribe_all  # noqa: E402

SR = 16_000
SAMPLE_TEXT = ("and mister john dashwood had then leisure to consider how much there might be prudently in his "
               "power to do for them")
WORDS = "word_timestamps" in OPTION_NAMES


def chirp(seconds: float, seed: int = 0, rate: int = SR) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def wav_bytes(audio: np.ndarray, rate: int = SR) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


class Server:
    """`xdna serve` as a child process on 127.0.0.1 and a free port; stop() always ends it."""

    def __init__(self, model: str | Path, *args: str, tmp: Path):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
        env.pop("XDNA_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxruntime_ep_xdna.cli", "serve", "--model", str(model), "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(180) or self.url is None:
            self.stop()
            raise RuntimeError("xdna serve did not start:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"listening on (http://\S+?)\s", line)
            if m:
                self.url = m.group(1).rstrip("/")
                self._ready.set()
        self._ready.set()

    def client(self, **kw) -> "openai.OpenAI":
        kw.setdefault("api_key", "unused")
        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def uploads_left(self) -> list[str]:
        return [str(p) for p in self.tmp.rglob("upload-*")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until(predicate, seconds: float = 60, what: str = "condition"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the tiny model: protocol ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-ml"), seed=0, multilingual=True)


# Greedy, no temperature fallback: the random model would retry every window at 6 temperatures.
NO_FALLBACK = ("--beam-size", "1", "--temperature-increment-on-fallback", "none")
TINY_ARGS = (*NO_FALLBACK, "--max-upload-mb", "4", "--max-queue", "2", "--max-audio-seconds", "400")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = Server(tiny, *TINY_ARGS, tmp=tmp_path_factory.mktemp("serve-tmp"))
    yield s
    assert s.stop() == 0, "".join(s.log)
    assert not s.uploads_left()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("clip") / "chirp.wav"
    p.write_bytes(wav_bytes(chirp(3.0)))
    return p


@pytest.fixture(scope="module")
def expected(tiny, clip):
    """What transcribe() gives here, in this process, for the clip (the server must give the same): the server runs
    with the CLIs' default --precision."""
    from onnxruntime_ep_xdna._precision import DEFAULT

    return {task: transcribe_all(str(clip), str(tiny), beam_size=1, temperature=0.0, task=task, precision=DEFAULT)
            for task in ("transcribe", "translate")}


def test_health_models_and_where_it_runs(server):
    h = server.health()
    assert h["status"] == "ok" and h["model"] == server.proc.args[server.proc.args.index("--model") + 1].split("/")[-1]
    assert h["provider"] == "XDNAExecutionProvider"
    assert h["backend"] in ("emulator", "xrt", "npu") and h["backend_reason"]
    assert h["queue"]["workers"] == 1 and h["queue"]["max_queue"] == 2
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [h["model"], "whisper-1"]


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_openai_client_every_response_format(server, clip, expected, fmt):
    want = expected["transcribe"]
    with open(clip, "rb") as f:
        out = server.client().audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    if fmt == "json":
        assert out.text == want.text
    elif fmt == "text":
        assert out.strip() == want.text
    elif fmt in ("srt", "vtt"):
        assert out == formats.render(want, fmt)
    else:
        # named as OpenAI's API names it; the code rides along in x_xdna
        assert out.text == want.text and out.language == language_name(want.language)
        assert out.x_xdna["language_code"] == want.language
        assert out.duration == pytest.approx(want.duration, abs=1e-3)
        assert [(s.start, s.end, s.text) for s in out.segments] == [
            (round(s.start, 3), round(s.end, 3), s.text) for s in want.segments]
    assert not server.uploads_left()


def test_language_names_match_whisper_tokenizer():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert LANGUAGE_NAMES == LANGUAGES
    assert language_name("de") == "german" and language_name("xx") == "xx" and language_name(None) is None


def test_openai_client_translation(server, clip, expected):
    with open(clip, "rb") as f:
        out = server.client().audio.translations.create(model="whisper-1", file=f)
    assert out.text == expected["translate"].text
    with open(clip, "rb") as f:  # the language field goes through too
        out = server.client().audio.transcriptions.create(model="whisper-1", file=f, language="de",
                                                          response_format="verbose_json")
    assert out.language == "german"


def test_openai_client_streaming(server, clip, expected):
    want = expected["transcribe"]
    with open(clip, "rb") as f:
        stream = server.client().audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        events = list(stream)
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and events[-1] is done[0]
    assert len(deltas) == len(want.segments) and "".join(d.delta for d in deltas).strip() == want.text
    assert done[0].text == want.text
    extra = done[0].model_extra
    assert extra["formats"]["srt"] == formats.render(want, "srt")
    assert extra["x_xdna"]["provider"] == "XDNAExecutionProvider" and extra["x_xdna"]["processing_s"] > 0


def test_timestamp_granularities(server, clip):
    with open(clip, "rb") as f:
        out = server.client().audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                          timestamp_granularities=["segment"])
    assert out.segments is not None
    with open(clip, "rb") as f:
        if WORDS:
            out = server.client().audio.transcriptions.create(
                model="whisper-1", file=f, response_format="verbose_json", timestamp_granularities=["word"])
            assert out.words is not None
        else:
            with pytest.raises(openai.BadRequestError) as e:
                server.client().audio.transcriptions.create(
                    model="whisper-1", file=f, response_format="verbose_json", timestamp_granularities=["word"])
            assert e.value.status_code == 400 and "word timestamps" in e.value.message
            assert e.value.body["param"] == "timestamp_granularities"


def _post(server, files=None, data=None, **kw):
    r = httpx.post(server.url + "/v1/audio/transcriptions", files=files, data=data, timeout=60, **kw)
    return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text)


def test_bad_uploads_each_get_the_right_4xx_and_leave_no_file(server, clip):
    good = clip.read_bytes()
    cases = {
        "empty": ({"file": ("a.wav", b"", "audio/wav")}, None, 400, "empty_file"),
        "text file": ({"file": ("notes.wav", b"hello, this is not audio at all\n" * 20, "text/plain")}, None, 415,
                      "unsupported_file_type"),
        "truncated header": ({"file": ("t.wav", good[:30], "audio/wav")}, None, 400, "invalid_audio"),
        "header without samples": ({"file": ("t.wav", good[:44], "audio/wav")}, None, 400, None),
        "over the limit": ({"file": ("big.wav", wav_bytes(chirp(140.0)), "audio/wav")}, None, 413, "file_too_large"),
        "wrong field name": ({"audio": ("a.wav", good, "audio/wav")}, None, 400, "unknown_parameter"),
        "no file": (None, {"model": "whisper-1"}, 415, "unsupported_media_type"),
        "unknown field": ({"file": ("a.wav", good, "audio/wav")}, {"beam": "3"}, 400, "unknown_parameter"),
        "bad format": ({"file": ("a.wav", good, "audio/wav")}, {"response_format": "xml"}, 400, "invalid_value"),
        "bad temperature": ({"file": ("a.wav", good, "audio/wav")}, {"temperature": "7"}, 400, "invalid_value"),
        "bad language": ({"file": ("a.wav", good, "audio/wav")}, {"language": "xx"}, 400, "invalid_value"),
        "granularities without verbose_json": ({"file": ("a.wav", good, "audio/wav")},
                                       {"timestamp_granularities[]": "segment"}, 400, "invalid_value"),
        "unknown model": ({"file": ("a.wav", good, "audio/wav")}, {"model": "gpt-9"}, 404, "model_not_found"),
    }
    for name, (files, data, status, code) in cases.items():
        got, body = _post(server, files, data)
        assert got == status, (name, got, body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], name
        assert "/upload-" not in body["error"]["message"] and str(server.tmp) not in body["error"]["message"], body
        if code:
            assert body["error"]["code"] == code, (name, body)
    # not multipart at all; and a multipart body cut off in the middle of the file
    r = httpx.post(server.url + "/v1/audio/transcriptions", json={"file": "x"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    body = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + good[:1000]
    r = httpx.post(server.url + "/v1/audio/transcriptions", content=body, timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert not server.uploads_left()
    h = server.health()
    assert h["status"] == "ok" and h["queue"]["running"] == 0 and h["queue"]["waiting"] == 0


def test_load_every_request_answered_or_refused_explicitly(server, clip, expected):
    """8 clients x 3 requests against 1 worker + 2 queue places: each gets the right text or a 429, none hangs."""
    want = expected["transcribe"].text
    results: list = []
    lock = threading.Lock()

    def client():
        c = server.client(timeout=120)
        for _ in range(3):
            try:
                with open(clip, "rb") as f:
                    out = c.audio.transcriptions.create(model="whisper-1", file=f)
                item = ("ok", out.text)
            except openai.APIStatusError as e:
                item = (e.status_code, e.body.get("code") if isinstance(e.body, dict) else None)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                item = ("error", repr(e))
            with lock:
                results.append(item)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 24
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] in (429, 503)]
    assert len(ok) + len(refused) == 24, results
    assert ok and all(text == want for _, text in ok), results
    assert all(code in ("queue_full", "shutting_down") for _, code in refused)
    h = server.health()
    assert h["queue"]["running"] == 0 and h["queue"]["waiting"] == 0
    assert not server.uploads_left()


def _raw_request(url: str, audio: bytes, fields: dict | None = None) -> socket.socket:
    """Sends a whole multipart request on a raw socket and returns it unread (to close it mid-job)."""
    host, port = url.removeprefix("http://").split(":")
    parts = [b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"long.wav\"\r\n"
             b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n"]
    for k, v in (fields or {}).items():
        parts.append(f"--B\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
    body = b"".join(parts) + b"--B--\r\n"
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B"
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_disconnects_cancels_its_job(server, stream):
    """A 4-minute file: while it runs /health answers (the event loop is free); closing the connection cancels it
    long before its end, and the upload is deleted."""
    long = wav_bytes(chirp(240.0, seed=3, rate=8000), rate=8000)  # 8 kHz keeps it under the 4 MB limit
    assert len(long) < 4 * 2**20
    before = server.health()["queue"]
    s = _raw_request(server.url, long, {"stream": "true"} if stream else None)
    wait_until(lambda: server.health()["queue"]["running"] == 1, what="the job to run")
    s.close()
    after = wait_until(lambda: (q := server.health()["queue"])["running"] == 0 and q, what="the job to stop")
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert not server.uploads_left()


def test_api_key_and_graceful_shutdown(tiny, clip, tmp_path):
    """--api-key: 401 without or with a wrong key (constant-time compare), 200 with it. SIGTERM with one job
    running and one queued: the running one finishes (200), the queued one gets 503, the process exits 0."""
    s = Server(tiny, *NO_FALLBACK, "--api-key", "s3cret", "--max-queue", "1", "--max-upload-mb", "2",
               tmp=tmp_path / "tmp")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = httpx.get(s.url + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.health()["auth_required"] is True  # /health and the page need no key
        with open(clip, "rb") as f:
            assert s.client(api_key="s3cret").audio.transcriptions.create(model="whisper-1", file=f).text is not None

        long = wav_bytes(chirp(120.0, seed=4, rate=8000), rate=8000)
        outcome = {}

        def call(name):
            r = httpx.post(s.url + "/v1/audio/transcriptions", files={"file": ("l.wav", long, "audio/wav")},
                           headers={"Authorization": "Bearer s3cret"}, timeout=180)
            outcome[name] = (r.status_code, r.json())

        a = threading.Thread(target=call, args=("running",), daemon=True)
        a.start()
        wait_until(lambda: s.health()["queue"]["running"] == 1, what="job A to run")
        b = threading.Thread(target=call, args=("queued",), daemon=True)
        b.start()
        wait_until(lambda: s.health()["queue"]["waiting"] == 1, what="job B to queue")
        assert s.stop(timeout=120) == 0, "".join(s.log)
        a.join(60), b.join(60)
        assert outcome["running"][0] == 200 and "text" in outcome["running"][1], outcome
        assert outcome["queued"][0] == 503 and outcome["queued"][1]["error"]["code"] == "shutting_down", outcome
    finally:
        s.stop(signal.SIGKILL)
    assert not s.uploads_left()


def test_static_page_loads_nothing_from_elsewhere():
    static = Path(__import__("onnxruntime_ep_xdna.server", fromlist=["x"]).__file__).parent / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    for p in static.iterdir():
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", p.read_text()), p  # no CDN, works offline


def test_serve_without_the_model_is_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "serve", "--model", str(tmp_path / "none"),
                        "--port", "0"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XDNA_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 1 and "xdna serve: error:" in r.stderr and "Traceback" not in r.stderr


# ---- the real whisper-base: content, and the page in a real browser -------------------------------------------------


@pytest.fixture(scope="module")
def base_server(tmp_path_factory):
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    model = ensure_model("base", log=lambda m: print(m, file=sys.stderr))
    s = Server(model, "--beam-size", "1", tmp=tmp_path_factory.mktemp("serve-base"))
    yield s
    assert s.stop() == 0
    assert not s.uploads_left()


def test_real_whisper_base_through_the_openai_client(base_server):
    c = base_server.client()
    with open(sample_path(), "rb") as f:
        out = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    assert out.language == "english" and word_error_rate(SAMPLE_TEXT, out.text) <= 0.1, out.text
    with open(sample_path(), "rb") as f:
        translated = c.audio.translations.create(model="whisper-1", file=f)
    assert word_error_rate(SAMPLE_TEXT, translated.text) <= 0.15, translated.text
    with open(sample_path(), "rb") as f:
        srt = c.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:0") and word_error_rate(SAMPLE_TEXT, " ".join(
        line for line in srt.splitlines() if line and not line[0].isdigit())) <= 0.1


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(driver)):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromium-driver missing in CI (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    return webdriver, Service(driver), binary


def _driver(downloads: Path, *extra: str):
    webdriver, service, binary = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--no-first-run", "--disable-extensions", *extra):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def _wait_for_transcript(driver, seconds: float = 180) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, seconds).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-done") == "1"
                                         or "Error" in d.find_element(By.ID, "status").text)
    status = driver.find_element(By.ID, "status").text
    assert "Error" not in status, status
    rows = driver.find_elements(By.CSS_SELECTOR, "#transcript .seg")
    assert rows and rows[0].find_element(By.CLASS_NAME, "ts").text.startswith("[00:0")
    return " ".join(r.find_element(By.CLASS_NAME, "text").text for r in rows)


def test_page_in_headless_chromium(base_server, tmp_path):
    """Upload the bundled sample on the page, wait for the transcript, check its text and the downloaded SRT."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _driver(downloads)
    try:
        driver.get(base_server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "runs on" in d.find_element(By.ID, "where").text)
        where = driver.find_element(By.ID, "where").text
        assert "XDNA EP on the emulator" in where or "XDNA EP on the NPU" in where, where
        assert not driver.find_element(By.ID, "key-label").is_displayed()  # no --api-key: no key field
        driver.find_element(By.ID, "file").send_keys(str(sample_path()))
        wait.until(lambda d: d.find_element(By.ID, "go").is_enabled())
        driver.find_element(By.ID, "go").click()
        text = _wait_for_transcript(driver)
        assert word_error_rate(SAMPLE_TEXT, text) <= 0.1, text
        ran = driver.find_element(By.ID, "ran").text
        assert "Ran on XDNA EP" in ran and "RTF" in ran, ran
        shot = Path(os.environ.get("XDNA_SCREENSHOT", tmp_path / "page.png"))
        driver.save_screenshot(str(shot))
        driver.find_element(By.CSS_SELECTOR, '.downloads button[data-fmt="srt"]').click()
        srt_file = downloads / (sample_path().stem + ".srt")
        wait.until(lambda d: srt_file.exists() and srt_file.stat().st_size > 0)
        srt = srt_file.read_text()
        with open(sample_path(), "rb") as f:
            api_srt = base_server.client().audio.transcriptions.create(model="whisper-1", file=f,
                                                                       response_format="srt")
        assert srt == api_srt  # the page's download is the server's own SRT writer's output
        assert srt.startswith("1\n00:00:0")
    finally:
        driver.quit()


def test_page_records_from_the_microphone(base_server, tmp_path):
    """Chromium's fake microphone plays the bundled sample: record, stop, the page makes a 16 kHz WAV of it
    (MediaRecorder + Web Audio), uploads it and shows the transcript."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver(tmp_path, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={sample_path()}%noloop",
                     "--autoplay-policy=no-user-gesture-required")
    try:
        driver.get(base_server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "runs on" in d.find_element(By.ID, "where").text)
        driver.find_element(By.ID, "record").click()
        wait.until(lambda d: d.find_element(By.ID, "rec-status").text == "recording…"
                   or "microphone" in d.find_element(By.ID, "status").text)
        time.sleep(8.5)  # the sample is 7.1 s long: let it play into the recording (not a timing assertion)
        driver.find_element(By.ID, "record").click()
        wait.until(lambda d: "recording.wav" in d.find_element(By.ID, "status").text
                   or "Error" in d.find_element(By.ID, "status").text
                   or "Could not" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "go").click()
        text = _wait_for_transcript(driver)
        assert word_error_rate(SAMPLE_TEXT, text) <= 0.25, text
    finally:
        driver.quit()
