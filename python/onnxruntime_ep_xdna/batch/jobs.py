"""What a batch is made of: the inputs (files, directories, list files), where each one's outputs go, whether
they are already complete, and how they are written (atomically) and indexed.

Layout of OUT_DIR:
    <rel>.<fmt>                     one file per input and format, mirroring the input's relative path
    index.jsonl                     one line per input of the last run: input, outputs, duration, language, time,
                                    provider, status (done | skipped | failed | pending), error, attempts
    .xdna-batch/<rel>.done.json     the completion record of an input, written after all its outputs

An input is complete when its completion record exists, names every requested format, and every output it names
exists with the size it records (and, for a local input, the input's size and mtime are unchanged); the batch
reuses it only when the record's `config` (worker.config_key: model, provider, precision policy and decoding
options) is also this run's, and transcribes it again otherwise (saying how many). Outputs and
records are written to a temporary file in the same directory, flushed to disk and renamed over the target, so
a reader (or a crashed run) sees either the previous file or the new one, never half of one; and since only the
driver writes, and the first result of an input wins, no input is ever written twice in one run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .m4a .m4b .aac .wma .aif .aiff .aifc .au .snd .caf .mka .webm .mp4 .m4v "
    ".mkv .mov .avi .amr .3gp .w64 .rf64".split())
LIST_EXTENSIONS = frozenset((".txt", ".lst", ".list"))
STATE_DIR = ".xdna-batch"
INDEX = "index.jsonl"


class BatchInputError(Exception):
    """An input argument that cannot be used at all (nothing is started), phrased for the user."""


def is_uri(text: str) -> bool:
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isalnum() and head.lower() != "file"


@dataclass
class Job:
    """One input: where it is (as the workers will open it) and where its outputs go (relative to OUT_DIR)."""

    index: int
    source: str  # path (absolute) or URI, as given to the workers
    rel: str  # output base, relative to OUT_DIR, POSIX separators, no format suffix
    duration: float | None = None  # seconds, when the driver could read the header
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of a local input
    attempts: int = 0  # times a worker started it (a worker death costs one)
    error: str | None = None  # set when the input is refused before any worker sees it
    record: dict = field(default_factory=dict)


def _rel_for_list_entry(entry: str, base: Path) -> tuple[str, str]:
    """(source, relative output path with the input's suffix) of one list-file line."""
    if is_uri(entry):
        scheme, _, rest = entry.partition("://")
        return entry, rest.lstrip("/")
    p = Path(entry.removeprefix("file://")).expanduser()
    p = p if p.is_absolute() else base / p
    p = Path(os.path.abspath(p))
    try:
        return str(p), p.relative_to(base).as_posix()
    except ValueError:
        return str(p), p.as_posix().lstrip("/")


def discover(inputs: Iterable[str], out_dir: str | os.PathLike, lists: Iterable[str] = ()) -> list[Job]:
    """Expands the INPUT arguments into jobs, in order, without duplicates.

    A file is one input (its output: OUT_DIR/<name without suffix>.<fmt>); a directory adds every audio file below
    it, recursively, hidden files and OUT_DIR excluded (outputs mirror the path relative to the directory); a file
    ending .txt/.lst/.list (or given with --list) holds one path or URI per line (# comments, blank lines skipped;
    relative paths are relative to the list file; outputs mirror them). A missing path raises BatchInputError.
    """
    out_abs = Path(os.path.abspath(out_dir))
    pairs: list[tuple[str, str]] = []  # (source, rel with suffix)

    def add_list(path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BatchInputError(f"{path}: cannot read the list file ({getattr(e, 'strerror', None) or e})") from None
        base = Path(os.path.abspath(path.parent))
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                pairs.append(_rel_for_list_entry(line, base))

    for item in lists:
        add_list(Path(item))
    for item in inputs:
        if is_uri(item):
            pairs.append((item, item.partition("://")[2].lstrip("/")))
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            root = Path(os.path.abspath(p))
            found = []
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                d = Path(dirpath)
                dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n) != out_abs)
                for name in sorted(filenames):
                    if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                        found.append(d / name)
            pairs += [(str(f), f.relative_to(root).as_posix()) for f in found]
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            add_list(p)
        elif p.exists() or p.is_symlink():
            a = Path(os.path.abspath(p))
            pairs.append((str(a), a.name))
        else:
            raise BatchInputError(f"{item}: no such file or directory")

    seen: set[str] = set()
    unique = []
    for source, rel in pairs:
        if source not in seen:
            seen.add(source)
            unique.append((source, rel))
    # Output base: the relative path without its suffix; inputs that would share one keep their suffix
    # (talk.mp3 -> talk.mp3.txt next to talk.wav -> talk.wav.txt); a remaining clash is refused for that input.
    stems = [str(PurePosixPath(rel).with_suffix("")) if PurePosixPath(rel).suffix else rel for _, rel in unique]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    jobs, taken = [], {}
    for i, ((source, rel), stem) in enumerate(zip(unique, stems)):
        base = stem if counts[stem] == 1 else rel
        base = "/".join(part for part in base.split("/") if part not in ("", ".", ".."))
        job = Job(i, source, base or f"input-{i}")
        if job.rel in taken:
            job.error = f"its output name {job.rel!r} is already used by {taken[job.rel]}; give it in another batch"
        else:
            taken[job.rel] = source
        jobs.append(job)
    return jobs


def output_paths(out_dir: Path, job: Job, formats: Iterable[str]) -> dict[str, Path]:
    return {fmt: out_dir / f"{job.rel}.{fmt}" for fmt in formats}


def record_path(out_dir: Path, job: Job) -> Path:
    return out_dir / STATE_DIR / f"{job.rel}.done.json"


def local_stat(source: str) -> tuple[int, int] | None:
    if is_uri(source):
        return None
    try:
        st = os.stat(source)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def completed_record(out_dir: Path, job: Job, formats: Iterable[str]) -> dict | None:
    """The completion record of a job whose outputs in `formats` are all present and complete, else None."""
    try:
        rec = json.loads(record_path(out_dir, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("input") != job.source:
        return None
    sizes = rec.get("sizes") or {}
    for fmt, path in output_paths(out_dir, job, formats).items():
        try:
            if fmt not in sizes or path.stat().st_size != sizes[fmt]:
                return None
        except OSError:
            return None
    if job.stat is not None and rec.get("input_stat") is not None and list(job.stat) != list(rec["input_stat"]):
        return None  # the input changed since
    return rec


def atomic_write(path: Path, data: str) -> int:
    """Writes `data` to `path` through a temporary file in the same directory + fsync + rename; returns bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(raw)


def commit(out_dir: Path, job: Job, rendered: dict[str, str], meta: dict) -> dict:
    """Writes a finished job: every output atomically, then its completion record. Returns the record."""
    sizes = {}
    for fmt, path in output_paths(out_dir, job, rendered).items():
        sizes[fmt] = atomic_write(path, rendered[fmt])
    rec = dict(meta, input=job.source, outputs=[f"{job.rel}.{fmt}" for fmt in rendered], sizes=sizes,
               input_stat=list(job.stat) if job.stat else None)
    atomic_write(record_path(out_dir, job), json.dumps(rec, ensure_ascii=False) + "\n")
    return rec


def index_line(job: Job, status: str) -> dict:
    r = job.record
    return {"input": job.source, "outputs": r.get("outputs", []), "duration": r.get("duration", job.duration),
            "language": r.get("language"), "time": r.get("time"), "provider": r.get("provider"), "status": status,
            "error": job.error if status == "failed" else None, "attempts": job.attempts}


def write_index(out_dir: Path, lines: list[dict]) -> None:
    atomic_write(out_dir / INDEX, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


class OutputLock:
    """An exclusive lock on OUT_DIR for one batch at a time (flock on .xdna-batch/lock: released by the kernel
    when the process ends, however it ends). Taking it also removes temporary files a killed run left behind."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / STATE_DIR / "lock"
        self.fd = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise BatchInputError(f"{self.path.parent.parent}: another xdna batch (pid {holder}) is writing there; "
                                  "wait for it or choose another output directory") from None
        except OSError:
            pass  # a file system without flock (some NFS setups): no lock, the writes stay atomic
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        root = self.path.parent.parent
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(".") and name.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except OSError:
                        pass
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

