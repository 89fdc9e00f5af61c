"""Transcript writers: txt, srt, vtt, tsv, json (and `all` of them). Each takes a transcription Result and returns
the file's text."""

from __future__ import annotations

import json
from typing import Callable

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
CHOICES = FORMATS + ("all",)  # all = every format, one file each (needs an output directory)


def format_timestamp(seconds: float, decimal: str = ".", always_hours: bool = False) -> str:
    """`HH:MM:SS.mmm` (SRT uses `,` and always shows hours; VTT may drop them below one hour)."""
    ms = max(0, int(round(seconds * 1000.0)))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    head = f"{hours:02d}:" if always_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cues(result) -> list:
    return [s for s in result.segments if s.text.strip()]


def to_txt(result) -> str:
    return result.text.strip() + "\n" if result.text.strip() else ""


def to_srt(result) -> str:
    blocks = []
    for i, seg in enumerate(_cues(result), 1):
        start = format_timestamp(seg.start, ",", always_hours=True)
        end = format_timestamp(seg.end, ",", always_hours=True)
        blocks.append(f"{i}\n{start} --> {end}\n{seg.text.strip()}\n")
    return "\n".join(blocks)


def to_vtt(result) -> str:
    lines = ["WEBVTT", ""]
    for seg in _cues(result):
        lines.append(f"{format_timestamp(seg.start)} --> {format_timestamp(seg.end)}")
        lines.append(seg.text.strip())
        lines.append("")
    return "\n".join(lines)


def to_tsv(result) -> str:
    """OpenAI's tsv: start and end in integer milliseconds, a header line, tabs in the text made spaces."""
    lines = ["start\tend\ttext"]
    for seg in _cues(result):
        text = seg.text.strip().replace("\t", " ")
        lines.append(f"{round(1000 * seg.start)}\t{round(1000 * seg.end)}\t{text}")
    return "\n".join(lines) + "\n"


def json_document(result, name: str | None = None) -> dict:
    doc = {"file": name} if name is not None else {}
    doc.update({
        "text": result.text,
        "language": result.language,
        "duration": result.duration,
        "segments": [
            {"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
             "temperature": getattr(s, "temperature", None), "avg_logprob": _r(getattr(s, "avg_logprob", None)),
             "compression_ratio": _r(getattr(s, "compression_ratio", None)),
             "no_speech_prob": _r(getattr(s, "no_speech_prob", None))}
            for i, s in enumerate(result.segments)
        ],
    })
    return doc


def _r(x):
    return None if x is None else round(float(x), 4)


def to_json(result) -> str:
    return json.dumps(json_document(result), ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, Callable] = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv, "json": to_json}


def render(result, fmt: str) -> str:
    try:
        return WRITERS[fmt](result)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
