"""`xdna batch`: inputs, outputs mirrored and written once, index.jsonl, resume, bad files, worker deaths, on the
local engine (in-process and worker processes) and on Ray (a local instance: 2 CPUs, no dashboard, loopback).

A tiny random-weight Whisper keeps these fast (its transcripts are noise; what is under test is the batch
machinery); one test runs the real whisper-base on real speech through Ray (XDNA_SKIP_REAL_MODEL=1 skips it).
Worker deaths are real: the test SIGKILLs the worker process (or Ray actor) while it holds a given input
(WorkerConfig.test_hold makes that worker wait, at most 60 s, until it is killed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optimum.onnxruntime", reason="the whisper extra is not installed")

from onnxruntime_ep_xdna.batch import BatchInputError, run_batch  # noqa: E402
from onnxruntime_ep_xdna.batch import jobs as J  # noqa: E402
from onnxruntime_ep_xdna.whisper import TranscriptionOptions  # noqa: E402
from onnxruntime_ep_xdna.whisper.model import make_tiny_random_whisper  # noqa: E402

SR = 16000
FAST = TranscriptionOptions(beam_size=1, temperature=(0.0,), sample_len=8, language="en")
FAST_FLAGS = ("--beam-size", "1", "--temperature-increment-on-fallback", "none", "--provider", "cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_random_whisper(tmp_path_factory.mktemp("tiny-batch"), seed=1, multilingual=False)


def write_wav(path: Path, seconds: float, freq: float = 300.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(SR * seconds)) / SR
    x = (0.3 * np.sin(2 * np.pi * (freq + 200 * t) * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(x.tobytes())
    return path


def make_corpus(root: Path) -> dict[str, Path]:
    files = {
        "a": write_wav(root / "in" / "a.wav", 1.5, 200),
        "b": write_wav(root / "in" / "sub" / "b.wav", 2.0, 300),
        "c": write_wav(root / "in" / "sub" / "deeper" / "c.wav", 1.0, 400),
        "d": write_wav(root / "in" / "d.wav", 1.2, 500),
    }
    corrupt = root / "in" / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage, not audio at all" * 3)
    (root / "in" / "empty.flac").write_bytes(b"")
    (root / "in" / ".hidden.wav").write_bytes(b"ignored")
    (root / "in" / "notes.md").write_text("not audio: not an input")
    files.update(corrupt=corrupt, empty=root / "in" / "empty.flac")
    return files


def read_index(out: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    by_input = {x["input"]: x for x in lines}
    assert len(by_input) == len(lines), "an input appears twice in index.jsonl"
    return by_input


def assert_exactly_one_complete_output(out: Path, inputs: list[Path], root: Path, formats=("txt",)) -> None:
    """Every input: exactly the requested outputs, complete (json parses, sizes match the record), nothing else;
    no temporary file anywhere."""
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and J.STATE_DIR not in p.parts and p.name != J.INDEX)
    expected = sorted(f"{p.relative_to(root).with_suffix('').as_posix()}.{fmt}" for p in inputs for fmt in formats)
    assert outputs == expected
    for p in inputs:
        job = J.Job(0, str(p), p.relative_to(root).with_suffix("").as_posix(), stat=J.local_stat(str(p)))
        rec = J.completed_record(out, job, formats)
        assert rec is not None, p
        if "json" in formats:
            doc = json.loads((out / f"{job.rel}.json").read_text())
            assert doc["duration"] == pytest.approx(rec["duration"], abs=1e-3)


def kill_when_held(hold_dir: Path, timeout: float = 120.0) -> threading.Thread:
    """Kills (SIGKILL) the worker that announces it holds the chosen input; bounded wait."""
    def killer():
        deadline = time.monotonic() + timeout
        held = hold_dir / "held"
        while time.monotonic() < deadline:
            try:
                pid = int(held.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            os.kill(pid, signal.SIGKILL)
            (hold_dir / "killed").write_text(str(pid))
            return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t


# ---- inputs and output names ---------------------------------------------------------------------------------


def test_discover_files_directories_and_list_files(tmp_path):
    f = make_corpus(tmp_path)
    out = tmp_path / "in" / "out"  # inside the input directory: never taken as input
    write_wav(out / "old.wav", 0.5)
    lst = tmp_path / "batch.txt"
    lst.write_text(f"# comment\n\n{f['a']}\nin/sub/b.wav\ns3://bucket/x/y.mp3\n")
    jobs = J.discover([str(tmp_path / "in"), str(f["a"]), str(lst)], out)
    got = [(j.source, j.rel, j.error) for j in jobs]
    root = str(tmp_path / "in")
    assert got[:6] == [
        (f"{root}/a.wav", "a", None), (f"{root}/corrupt.wav", "corrupt", None), (f"{root}/d.wav", "d", None),
        (f"{root}/empty.flac", "empty", None), (f"{root}/sub/b.wav", "sub/b", None),
        (f"{root}/sub/deeper/c.wav", "sub/deeper/c", None)]
    assert got[6:] == [("s3://bucket/x/y.mp3", "bucket/x/y", None)]  # a.wav and b.wav only once
    with pytest.raises(BatchInputError, match="no such file"):
        J.discover([str(tmp_path / "missing.wav")], out)


def test_output_names_that_would_clash_keep_their_suffix_or_are_refused(tmp_path):
    a = write_wav(tmp_path / "x" / "talk.wav", 0.5)
    b = tmp_path / "x" / "talk.mp3"
    b.write_bytes(a.read_bytes())
    c = write_wav(tmp_path / "y" / "talk.wav", 0.5)
    jobs = J.discover([str(tmp_path / "x"), str(c)], tmp_path / "out")
    assert [(j.rel, j.error is None) for j in jobs] == [("talk.mp3", True), ("talk.wav", True), ("talk.wav", False)]
    assert "already used" in jobs[2].error


def test_ray_placement_one_actor_per_npu_machine_or_by_cpus():
    from onnxruntime_ep_xdna.batch.ray_engine import placement

    class FakeRay:
        def __init__(self, res):
            self.res = res

        def cluster_resources(self):
            return self.res

    n, opts, _ = placement(FakeRay({"CPU": 48.0, "xdna_npu": 3.0}), None, 1.0)
    assert n == 3 and opts == {"num_cpus": 1, "resources": {"xdna_npu": 1}}
    n, opts, _ = placement(FakeRay({"CPU": 8.0}), None, 2.0)
    assert n == 4 and opts == {"num_cpus": 2.0}
    assert placement(FakeRay({"CPU": 8.0}), 3, 1.0)[0] == 3


# ---- the local engine ------------------------------------------------------------------------------------------


def test_local_batch_outputs_index_bad_files_and_resume(tiny, tmp_path):
    f = make_corpus(tmp_path)
    out = tmp_path / "out"
    good = [f["a"], f["b"], f["c"], f["d"]]
    s = run_batch([str(tmp_path / "in")], out, model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "json"))
    assert (s.done, s.failed, s.skipped, s.pending, s.exit_code) == (4, 2, 0, 0, 2)
    assert_exactly_one_complete_output(out, good, tmp_path / "in", ("txt", "json"))
    idx = read_index(out)
    assert len(idx) == 6
    for p in good:
        row = idx[str(p)]
        assert row["status"] == "done" and row["error"] is None and row["provider"] == "CPUExecutionProvider"
        assert row["outputs"] == [f"{p.relative_to(tmp_path / 'in').with_suffix('').as_posix()}.{x}" for x in ("txt", "json")]
        assert row["duration"] == pytest.approx({"a": 1.5, "b": 2.0, "c": 1.0, "d": 1.2}[p.stem], abs=1e-3)
        assert row["language"] == "en" and row["time"] > 0
    assert idx[str(f["corrupt"])]["status"] == "failed" and "corrupt.wav" in idx[str(f["corrupt"])]["error"]
    assert idx[str(f["empty"])]["status"] == "failed" and "empty" in idx[str(f["empty"])]["error"]
    assert idx[str(f["corrupt"])]["outputs"] == []

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    s = run_batch([str(tmp_path / "in")], out, model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "json"))
    assert (s.done, s.skipped, s.failed, s.exit_code) == (0, 4, 2, 2)  # the bad ones are tried again, fail again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")} == before  # nothing rewritten
    assert {r["status"] for r in read_index(out).values()} == {"skipped", "failed"}

    (out / "sub" / "b.json").write_text("{")  # damaged (not the size recorded): redone
    (out / "a.txt").unlink()  # missing: redone
    f["corrupt"].unlink()
    f["empty"].unlink()
    s = run_batch([str(tmp_path / "in")], out, model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "json"))
    assert (s.done, s.skipped, s.failed, s.exit_code) == (2, 2, 0, 0)
    assert_exactly_one_complete_output(out, good, tmp_path / "in", ("txt", "json"))

    s = run_batch([str(tmp_path / "in")], out, model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "json"), force=True)
    assert (s.done, s.skipped, s.exit_code) == (4, 0, 0)


def test_resume_redoes_outputs_made_with_another_model_or_other_options(tiny, tmp_path):
    """A complete output is reused only when the model, the decoding options and the input are those of this run;
    otherwise it is transcribed again, and the batch says so."""
    inputs = [write_wav(tmp_path / "in" / f"f{i}.wav", 1.0, 250 + 100 * i) for i in range(2)]
    out = tmp_path / "out"
    log: list[str] = []

    def run(options=FAST, model=tiny):
        log.clear()
        return run_batch([str(tmp_path / "in")], out, model=str(model), provider="cpu", options=options,
                         formats=("txt",), log=log.append)

    s = run()
    assert (s.done, s.skipped) == (2, 0)
    s = run()
    assert (s.done, s.skipped) == (0, 2) and not any("transcribed again" in m for m in log)

    s = run(TranscriptionOptions(beam_size=1, temperature=(0.0,), sample_len=4, language="en"))  # other options
    assert (s.done, s.skipped) == (2, 0)
    assert any("2 inputs complete from an earlier run" in m and "transcribed again" in m for m in log), log
    s = run(TranscriptionOptions(beam_size=1, temperature=(0.0,), sample_len=4, language="en"))
    assert (s.done, s.skipped) == (0, 2)

    s = run()  # back to the first options: the outputs on disk are the second options', so redone again
    assert (s.done, s.skipped) == (2, 0)

    other = tmp_path / "other-model"  # another model directory (here: a copy of the same files)
    other.mkdir()
    for f in tiny.iterdir():
        if f.is_file():
            shutil.copy2(f, other / f.name)
    s = run(model=other)
    assert (s.done, s.skipped) == (2, 0)
    s = run(model=other)
    assert (s.done, s.skipped) == (0, 2)
    st = (other / "decoder_model.onnx").stat()  # its decoder written again (the model converted again in place)
    os.utime(other / "decoder_model.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = run(model=other)
    assert (s.done, s.skipped) == (2, 0)

    record = J.record_path(out, J.Job(0, str(inputs[0]), "f0"))  # a record from before the config was recorded
    rec = json.loads(record.read_text())
    del rec["config"]
    record.write_text(json.dumps(rec))
    s = run(model=other)
    assert (s.done, s.skipped) == (1, 1)
    assert any("1 input complete from an earlier run" in m for m in log), log


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "batch", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, **kw)


def test_cli_interrupted_run_resumes_where_it_stopped(tiny, tmp_path):
    """The driver itself (one process, --engine local) is SIGKILLed while it transcribes the third file; the
    re-run skips the two done, does the rest, and every input ends with exactly one complete output."""
    inputs = [write_wav(tmp_path / "in" / f"f{i}.wav", 1.0, 200 + 50 * i) for i in range(5)]
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()
    env = dict(os.environ, XDNA_BATCH_TEST_HOLD=f"f2.wav:{hold}")
    args = ("--model", tiny, *FAST_FLAGS, "--format", "txt,srt", "-o", out, tmp_path / "in")
    proc = subprocess.Popen([sys.executable, "-m", "onnxruntime_ep_xdna.cli", "batch", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    killer = kill_when_held(hold)
    killer.join(120)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and (hold / "killed").is_file()
    done_first = sorted(p.name for p in out.glob("*.txt"))
    assert done_first == ["f0.txt", "f1.txt"]
    assert not list(out.rglob("*.tmp"))
    idx = read_index(out)  # written while running: what was done, the rest pending
    assert {Path(k).name: v["status"] for k, v in idx.items()} == {
        "f0.wav": "done", "f1.wav": "done", "f2.wav": "pending", "f3.wav": "pending", "f4.wav": "pending"}

    proc = run_cli(*args, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "5 inputs: 3 done, 2 already complete, 0 failed" in proc.stderr
    assert_exactly_one_complete_output(out, inputs, tmp_path / "in", ("txt", "srt"))
    assert {v["status"] for v in read_index(out).values()} == {"done", "skipped"}


def test_one_batch_per_output_directory_and_leftover_temporaries_removed(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".a.txt.x1y2.tmp").write_text("half")  # what a run killed inside atomic_write leaves
    (out / "keep.txt").write_text("a user's file")
    with J.OutputLock(out):
        assert not (out / "sub" / ".a.txt.x1y2.tmp").exists() and (out / "keep.txt").is_file()
        code = ("import sys; from onnxruntime_ep_xdna.batch.jobs import OutputLock, BatchInputError\n"
                "from pathlib import Path\n"
                "try:\n    OutputLock(Path(sys.argv[1])).__enter__()\nexcept BatchInputError as e:\n"
                "    print(e); sys.exit(3)\n")
        p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 3 and f"pid {os.getpid()}" in p.stdout
    with J.OutputLock(out):  # released: taken again
        pass


def test_cli_errors_are_messages(tiny, tmp_path):
    wav = write_wav(tmp_path / "a.wav", 0.5)
    p = run_cli("--model", tiny, "-o", tmp_path / "out", tmp_path / "nope.wav")
    assert p.returncode == 1 and "no such file" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("--model", tiny, "--format", "doc", "-o", tmp_path / "out", wav)
    assert p.returncode == 2 and "unknown format" in p.stderr  # argparse's usage error
    p = run_cli("--model", tiny, *FAST_FLAGS, "--language", "de", "-o", tmp_path / "out", wav)
    assert p.returncode == 1 and "English-only" in p.stderr and "Traceback" not in p.stderr
    assert read_index(tmp_path / "out")[str(wav)]["status"] == "pending"  # nothing lost: a re-run does it


def test_local_workers_a_killed_worker_costs_one_retry(tiny, tmp_path):
    inputs = [write_wav(tmp_path / "in" / f"f{i}.wav", 1.0, 200 + 50 * i) for i in range(5)]
    hold = tmp_path / "hold"
    hold.mkdir()
    killer = kill_when_held(hold)
    s = run_batch([str(tmp_path / "in")], tmp_path / "out", model=str(tiny), provider="cpu", options=FAST,
                  workers=2, formats=("txt",), test_hold=f"f1.wav:{hold}", start_timeout=120)
    killer.join(5)
    assert (hold / "killed").is_file()
    assert (s.done, s.failed, s.retries, s.exit_code) == (5, 0, 1, 0)
    assert_exactly_one_complete_output(tmp_path / "out", inputs, tmp_path / "in")
    idx = read_index(tmp_path / "out")
    assert idx[str(inputs[1])]["attempts"] == 2 and idx[str(inputs[0])]["attempts"] == 1


def test_an_input_that_always_kills_its_worker_is_failed_after_the_retries(tiny, tmp_path, monkeypatch):
    """A 'poison' input: every attempt dies. It is recorded failed after 1 + retries attempts; the rest is done."""
    from onnxruntime_ep_xdna.batch import runner as R
    from onnxruntime_ep_xdna.batch.worker import WorkerConfig

    inputs = [write_wav(tmp_path / "in" / f"f{i}.wav", 1.0) for i in range(3)]
    jobs = J.discover([str(tmp_path / "in")], tmp_path / "out")
    r = R.BatchRunner(jobs, tmp_path / "out", WorkerConfig(model=str(tiny), provider="cpu", options=FAST),
                      retries=1, log=lambda m: None)
    while (job := r.next_job()) is not None:
        if job.source == str(inputs[1]):
            r.worker_died(job, "signal 9")
        else:
            r.finished(job, {"ok": True, "rendered": {"txt": "x\n"}, "duration": 1.0, "language": "en",
                             "time": 0.1, "provider": "cpu"})
    s = r.finish()
    assert (s.done, s.failed, s.retries, s.exit_code) == (2, 1, 1, 2)
    row = read_index(tmp_path / "out")[str(inputs[1])]
    assert row["status"] == "failed" and row["attempts"] == 2 and "died" in row["error"]


# ---- Ray -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from onnxruntime_ep_xdna.batch.ray_engine import loopback_only

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    loopback_only(ray)  # every server of this instance binds 127.0.0.1 (checked below)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="ERROR",
             log_to_driver=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


def test_ray_unreachable_cluster_is_a_message_not_a_wait(tiny, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    wav = write_wav(tmp_path / "a.wav", 0.5)
    p = run_cli("--model", tiny, "--engine", "ray", "--ray-address", "127.0.0.1:1", "-o", tmp_path / "out", wav)
    assert p.returncode == 1 and "nothing answers at 127.0.0.1:1" in p.stderr and "Traceback" not in p.stderr
    assert read_index(tmp_path / "out")[str(wav)]["status"] == "pending"


def test_ray_batch_bad_files_recorded_and_resume(ray_local, tiny, tmp_path):
    f = make_corpus(tmp_path)
    good = [f["a"], f["b"], f["c"], f["d"]]
    s = run_batch([str(tmp_path / "in")], tmp_path / "out", model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "vtt"), engine="ray", workers=2, start_timeout=120)
    assert (s.done, s.failed, s.exit_code) == (4, 2, 2)
    assert_exactly_one_complete_output(tmp_path / "out", good, tmp_path / "in", ("txt", "vtt"))
    idx = read_index(tmp_path / "out")
    assert idx[str(f["corrupt"])]["status"] == "failed" and idx[str(f["corrupt"])]["error"]
    assert {idx[str(p)]["provider"] for p in good} == {"CPUExecutionProvider"}
    s = run_batch([str(tmp_path / "in")], tmp_path / "out", model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "vtt"), engine="ray", workers=2, start_timeout=120)
    assert (s.done, s.skipped, s.failed) == (0, 4, 2)


def test_ray_killed_actor_mid_file_costs_one_retry_and_nothing_is_lost(ray_local, tiny, tmp_path):
    inputs = [write_wav(tmp_path / "in" / f"f{i}.wav", 1.0, 200 + 50 * i) for i in range(6)]
    hold = tmp_path / "hold"
    hold.mkdir()
    killer = kill_when_held(hold)
    s = run_batch([str(tmp_path / "in")], tmp_path / "out", model=str(tiny), provider="cpu", options=FAST,
                  formats=("txt", "json"), engine="ray", workers=2, test_hold=f"f2.wav:{hold}", start_timeout=120)
    killer.join(5)
    assert (hold / "killed").is_file(), "the actor was never killed"
    assert (s.done, s.failed, s.retries, s.exit_code) == (6, 0, 1, 0)
    assert_exactly_one_complete_output(tmp_path / "out", inputs, tmp_path / "in", ("txt", "json"))
    idx = read_index(tmp_path / "out")
    assert [idx[str(p)]["attempts"] for p in inputs] == [1, 1, 2, 1, 1, 1]


def test_ray_configuration_error_stops_at_once_and_loses_nothing(ray_local, tiny, tmp_path):
    wav = write_wav(tmp_path / "in" / "a.wav", 0.5)
    s = run_batch([str(tmp_path / "in")], tmp_path / "out", model=str(tiny), provider="cpu",
                  options=TranscriptionOptions(language="de"), engine="ray", workers=2, start_timeout=120)
    assert s.exit_code == 1 and "English-only" in s.message and s.pending == 1
    assert read_index(tmp_path / "out")[str(wav)]["status"] == "pending"


def test_ray_real_whisper_base_on_real_speech(ray_local, tmp_path):
    if os.environ.get("XDNA_SKIP_REAL_MODEL"):
        pytest.skip("XDNA_SKIP_REAL_MODEL is set")
    from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples, word_error_rate
    from onnxruntime_ep_xdna.whisper.model import ensure_model

    model = ensure_model("base", log=lambda m: print(m, file=sys.stderr))
    samples = fetch_speech_samples()[:3]
    lst = tmp_path / "clips.list"
    lst.write_text("".join(f"{p}\n" for p, _ in samples))
    s = run_batch([str(lst)], tmp_path / "out", model=str(model), provider="xdna",
                  options=TranscriptionOptions(beam_size=1, language="en"), formats=("txt",), engine="ray",
                  workers=2, start_timeout=300)
    assert (s.done, s.failed, s.exit_code) == (3, 0, 0)
    idx = read_index(tmp_path / "out")
    for path, text in samples:
        row = idx[str(path)]
        assert row["provider"] == "XDNAExecutionProvider" and row["status"] == "done"
        got = (tmp_path / "out" / row["outputs"][0]).read_text()
        assert word_error_rate(text, got) <= 0.15, (text, got)
