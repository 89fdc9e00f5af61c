"""Transcript writers: txt, srt, vtt, json. Each takes a transcription Result and returns the file's text."""

from __future__ import annotations

import json
from typing import Callable

FORMATS = ("txt", "srt", "vtt", "json")


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


def to_json(result) -> str:
    doc = {
        "text": result.text,
        "language": result.language,
        "duration": result.duration,
        "segments": [
            {"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text} for i, s in enumerate(result.segments)
        ],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, Callable] = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


def render(result, fmt: str) -> str:
    try:
        return WRITERS[fmt](result)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
