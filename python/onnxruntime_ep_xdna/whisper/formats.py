"""Transcript writers: txt, srt, vtt, tsv, json (and `all` of them). Each takes a transcription Result and returns
the file's text.

srt and vtt take OpenAI's subtitle options when the segments carry words (word_timestamps): max_line_width
(characters per line), max_line_count (lines per cue), max_words_per_line, highlight_words (one cue per word with
the spoken word underlined). Without them each segment is one cue, as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class WriterOptions:
    max_line_width: int | None = None
    max_line_count: int | None = None
    max_words_per_line: int | None = None
    highlight_words: bool = False

    def __post_init__(self):
        for name in ("max_line_width", "max_line_count", "max_words_per_line"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1")

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


def to_txt(result, options: WriterOptions | None = None) -> str:
    return result.text.strip() + "\n" if result.text.strip() else ""


def _has_words(result) -> bool:
    return any(getattr(s, "words", None) for s in result.segments)


def _subtitle_lines(result, opt: WriterOptions) -> Iterator[list[list]]:
    """Words grouped into cues: [[start, end, text-with-line-breaks], ...] per cue (OpenAI's line filling: a line
    takes words while they fit max_line_width; a cue takes max_line_count lines; without both limits every
    segment starts a new cue; a pause > 3 s starts a new cue when segments are not kept)."""
    width = opt.max_line_width or 1000
    keep_segments = opt.max_line_count is None or opt.max_line_width is None
    cue: list[list] = []
    line_len, line_count = 0, 1
    last = None
    for seg in result.segments:
        words = seg.words or []
        per_line = opt.max_words_per_line or len(words) or 1
        for first in range(0, len(words), per_line):
            for i, w in enumerate(words[first:first + per_line]):
                text = w.word
                pause = not keep_segments and last is not None and w.start - last > 3.0
                fits = line_len + len(text) <= width
                # with segments kept, each segment - and each group of max_words_per_line words - is a cue
                new_segment = keep_segments and i == 0 and bool(cue)
                new_group = opt.max_words_per_line is not None and i == 0 and first > 0 and not keep_segments
                if line_len > 0 and fits and not pause and not new_segment and not new_group:
                    line_len += len(text)
                else:
                    text = text.strip()
                    if cue and (new_segment or (opt.max_line_count is not None and
                                                (pause or line_count >= opt.max_line_count))):
                        yield cue
                        cue, line_count = [], 1
                    elif line_len > 0:
                        line_count += 1
                        text = "\n" + text
                    line_len = len(text.strip())
                cue.append([w.start, w.end, text])
                last = w.start
    if cue:
        yield cue


def _subtitles(result, opt: WriterOptions | None) -> Iterator[tuple[float, float, str]]:
    opt = opt or WriterOptions()
    use_words = _has_words(result) and (opt.max_line_width or opt.max_line_count or opt.max_words_per_line
                                        or opt.highlight_words)
    if not use_words:
        for seg in _cues(result):
            yield seg.start, seg.end, seg.text.strip().replace("-->", "->")
        return
    for cue in _subtitle_lines(result, opt):
        text = "".join(t for _, _, t in cue)
        if not opt.highlight_words:
            yield cue[0][0], cue[-1][1], text
            continue
        last = cue[0][0]
        for i, (start, end, _) in enumerate(cue):
            if start > last:
                yield last, start, text
            yield start, end, "".join(re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", t, flags=re.S) if j == i else t
                                      for j, (_, _, t) in enumerate(cue))
            last = end


def to_srt(result, options: WriterOptions | None = None) -> str:
    blocks = []
    for i, (start, end, text) in enumerate(_subtitles(result, options), 1):
        blocks.append(f"{i}\n{format_timestamp(start, ',', always_hours=True)} --> "
                      f"{format_timestamp(end, ',', always_hours=True)}\n{text}\n")
    return "\n".join(blocks)


def to_vtt(result, options: WriterOptions | None = None) -> str:
    lines = ["WEBVTT", ""]
    for start, end, text in _subtitles(result, options):
        lines.append(f"{format_timestamp(start)} --> {format_timestamp(end)}")
        lines.append(text)
        lines.append("")
    return "\n".join(lines)


def to_tsv(result, options: WriterOptions | None = None) -> str:
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
             "no_speech_prob": _r(getattr(s, "no_speech_prob", None)),
             **({"words": [w.as_dict() for w in s.words]} if getattr(s, "words", None) is not None else {})}
            for i, s in enumerate(result.segments)
        ],
    })
    if getattr(result, "language_probs", None):
        doc["language_probs"] = {k: round(float(v), 6) for k, v in result.language_probs.items()}
    if getattr(result, "speech_chunks", None) is not None:
        doc["speech_chunks"] = [[round(a, 3), round(b, 3)] for a, b in result.speech_chunks]
    return doc


def _r(x):
    return None if x is None else round(float(x), 4)


def to_json(result, options: WriterOptions | None = None) -> str:
    return json.dumps(json_document(result), ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, Callable] = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv, "json": to_json}


def render(result, fmt: str, options: WriterOptions | None = None) -> str:
    if fmt not in WRITERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt](result, options)
