"""Word-level timestamps: cross-attention of the alignment heads + dynamic time warping (OpenAI's method).

For one window: the decoder runs once more over <|startoftranscript|>… <|notimestamps|> + the window's text tokens
+ <|endoftext|> through a variant of decoder_model.onnx that also outputs the cross-attention probabilities of the
layers holding the checkpoint's `alignment_heads` (onnx_model.attention_decoder; the default decoding path never
runs it). The weights of those heads, cut to the window's frames and re-normalised, are standardised per frame
over tokens, smoothed by a median filter (width 7) along time, averaged over heads; DTW over minus that matrix
gives a monotonic token -> time path. A word starts where its first token's path enters a new token row; word
probability = mean of its tokens' probabilities. Then the references' clean-ups: punctuation merged into the
neighbouring word, over-long words at sentence boundaries clipped to twice the median word duration (capped at
0.7 s), and segment bounds adjusted to the words.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

TOKENS_PER_SECOND = 50  # encoder frames per second (two mel frames each)
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
MEDIAN_FILTER_WIDTH = 7
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


@dataclass
class Word:
    start: float
    end: float
    word: str  # with its leading space, as the text has it
    probability: float
    tokens: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "word": self.word,
                "probability": round(float(self.probability), 4)}


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window along the last axis, reflect-padded at both ends (odd width)."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotonic path through cost (tokens x frames) from (0, 0) to the end, moves (1,1), (1,0),
    (0,1). Returns (token indices, frame indices) along the path. Computed by anti-diagonals (vectorised)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((n + 1, m + 1), np.int8)  # 0 diagonal, 1 from above (token advances), 2 from left (time)
    for d in range(2, n + m + 1):  # cells (i, j), i + j = d, 1 <= i <= n, 1 <= j <= m
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        options = np.stack([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]])
        best = np.argmin(options, axis=0)
        acc[i, j] = cost[i - 1, j - 1] + options[best, np.arange(i.size)]
        trace[i, j] = best
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    path = np.array(path[::-1])
    keep = (path[:, 0] >= 0) & (path[:, 1] >= 0)
    return path[keep, 0], path[keep, 1]


def split_words(tokens: list[int], decode, eot: int, language: str | None) -> tuple[list[str], list[list[int]]]:
    """Tokens -> words (text with leading space, tokens). A word begins at a token starting with a space, at a
    punctuation token or at a special token; languages without spaces split at every complete character."""
    subwords, subtokens, current = [], [], []
    for t in tokens:  # complete UTF-8 pieces: a token may end inside a character
        current.append(t)
        text = decode(current) if t < eot else ""
        if t >= eot or "\ufffd" not in text:
            subwords.append(text)
            subtokens.append(current)
            current = []
    if current:
        subwords.append(decode(current))
        subtokens.append(current)
    if language in NO_SPACE_LANGUAGES:
        return subwords, subtokens
    words, word_tokens = [], []
    for text, toks in zip(subwords, subtokens):
        special = toks[0] >= eot
        new = special or text.startswith(" ") or text.strip() in string.punctuation or not words
        if new:
            words.append(text)
            word_tokens.append(list(toks))
        else:
            words[-1] += text
            word_tokens[-1].extend(toks)
    return words, word_tokens


def find_alignment(attention: np.ndarray, first_row: int, token_probs: np.ndarray, text_tokens: list[int],
                   num_frames: int, decode, eot: int, language: str | None) -> list[Word]:
    """attention: (heads, all decoder positions, encoder frames) cross-attention probabilities of the alignment
    heads for sot sequence + <|notimestamps|> + text + <|endoftext|>; rows first_row .. -1 (<|notimestamps|> and
    the text, i.e. the queries that predict each text token and <|endoftext|>) are aligned. token_probs: each
    text token's probability. Times are relative to the window."""
    if not text_tokens:
        return []
    frames = max(1, min(num_frames // 2, attention.shape[-1]))
    w = attention[:, :, :frames].astype(np.float64)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-12)  # softmax over the window's frames only
    std = w.std(axis=-2, keepdims=True)
    w = (w - w.mean(axis=-2, keepdims=True)) / np.maximum(std, 1e-12)
    w = median_filter(w, MEDIAN_FILTER_WIDTH)
    matrix = w.mean(axis=0)[first_row:-1]
    text_idx, time_idx = dtw(-matrix)

    words, word_tokens = split_words(text_tokens + [eot], decode, eot, language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    jump_times = np.append(jump_times, jump_times[-1] if jump_times.size else 0.0)
    starts = jump_times[np.minimum(boundaries[:-1], jump_times.size - 1)]
    ends = jump_times[np.minimum(boundaries[1:], jump_times.size - 1)]
    probs = [float(np.mean(token_probs[a:b])) if b > a else 0.0
             for a, b in zip(boundaries[:-1], boundaries[1:])]
    return [Word(float(s), float(e), wd, p, list(tk))
            for wd, tk, s, e, p in zip(words[:-1], word_tokens[:-1], starts, ends, probs)]


def merge_punctuations(words: list[Word], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> list[Word]:
    """Opening punctuation joins the next word, closing punctuation the previous one (timing of that word)."""
    out = list(words)
    i = len(out) - 2
    while i >= 0:  # prepend, right to left
        if out[i].word.startswith(" ") and out[i].word.strip() in prepended and out[i].word.strip():
            nxt = out[i + 1]
            nxt.word = out[i].word + nxt.word
            nxt.tokens = out[i].tokens + nxt.tokens
            out[i].word, out[i].tokens = "", []
        i -= 1
    i = 1
    while i < len(out):  # append, left to right
        prev = out[i - 1]
        if not prev.word.endswith(" ") and out[i].word in appended and out[i].word:
            prev.word += out[i].word
            prev.tokens += out[i].tokens
            out[i].word, out[i].tokens = "", []
        i += 1
    return [w for w in out if w.word]


def word_durations(words: list[Word]) -> tuple[float, float]:
    """(median word duration capped at 0.7 s, max duration = twice that) over the words with a length."""
    d = np.array([w.end - w.start for w in words], dtype=np.float64)
    d = d[d.nonzero()]
    median = min(0.7, float(np.median(d))) if d.size else 0.0
    return median, median * 2


def clip_long_words(words: list[Word], max_duration: float) -> None:
    """The references' heuristic: a word at a sentence boundary longer than max_duration is cut to it (the pause
    before/after it got attributed to the word)."""
    if not max_duration:
        return
    for i in range(1, len(words)):
        if words[i].end - words[i].start > max_duration:
            if words[i].word.strip()[-1:] in tuple(SENTENCE_END):
                words[i].end = words[i].start + max_duration
            elif words[i - 1].word.strip()[-1:] in tuple(SENTENCE_END):
                words[i].start = words[i].end - max_duration


def fit_segment_words(segment_words: list[list[Word]], segments: list, median: float, max_duration: float,
                      last_speech: float) -> float:
    """Per segment of one window (OpenAI's add_word_timestamps after the alignment): a first word right after a
    long pause that is too long is shortened (the pause is not part of it); a first/last word that reaches more
    than 0.5 s beyond the segment's own timestamp is cut back to it, otherwise the segment's bounds move to its
    words. Returns the end of the last segment with words (the new `last_speech`)."""
    for words, seg in zip(segment_words, segments):
        if not words:
            continue
        first = words[0]
        if max_duration and first.end - last_speech > median * 4 and (
                first.end - first.start > max_duration
                or (len(words) > 1 and words[1].end - first.start > max_duration * 2)):
            if len(words) > 1 and words[1].end - words[1].start > max_duration:
                boundary = max(words[1].end / 2, words[1].end - max_duration)
                first.end = words[1].start = boundary
            first.start = max(0.0, first.end - max_duration)
        if seg.start < first.end and seg.start - 0.5 > first.start:
            first.start = max(0.0, min(first.end - median, seg.start))
        else:
            seg.start = first.start
        last = words[-1]
        if seg.end > last.start and seg.end + 0.5 < last.end:
            last.end = max(last.start + median, seg.end)
        else:
            seg.end = last.end
        last_speech = seg.end
    return last_speech


# Word-time refinement against the audio (stable-ts / WhisperX-style; option word_timing_refine). DTW makes words
# contiguous: a pause before a word is counted in it (its start is early by about the pause) and a window's first
# word starts at the window's first timestamp. The log-mel, already computed, tells where the pauses are: a word
# start lying in a quiet stretch moves forward to the first loud frame of the word's own span, a word end lying in
# a quiet stretch moves back to the last loud frame. Nothing moves in continuous speech (no frame of the span is
# quiet at the boundary) or when the window has no clear quiet/loud contrast.
REFINE_MIN_CONTRAST_DB = 20.0  # loud (95th percentile) minus quiet (5th percentile) frame energy of the window
REFINE_THRESHOLD = 0.35  # a frame is quiet below quiet + this fraction of (loud - quiet), in dB
REFINE_MIN_WORD_S = 0.02  # a refined word keeps at least this length
REFINE_MIN_GAP_S = 0.1  # a pause between two words: at least this many seconds of quiet frames


def frame_energy_db(log_mel: np.ndarray) -> np.ndarray:
    """Per mel frame (100 per second) energy in dB from Whisper's normalised log-mel (n_mels, frames):
    (log10 + 4) / 4 per bin -> 10 log10 of the mean mel power."""
    x = 4.0 * np.asarray(log_mel, np.float64) - 4.0
    top = x.max(axis=0)
    return 10.0 * (top + np.log10(np.mean(10.0 ** (x - top), axis=0)))


def speech_frames(energy_db: np.ndarray) -> np.ndarray | None:
    """Loud (speech) frames of one window: above the window's quiet level + REFINE_THRESHOLD of its contrast;
    None when the contrast is under REFINE_MIN_CONTRAST_DB (no clear pause: refine nothing)."""
    if energy_db.size < 10:
        return None
    quiet, loud = np.percentile(energy_db, [5, 95])
    if loud - quiet < REFINE_MIN_CONTRAST_DB:
        return None
    return energy_db > quiet + REFINE_THRESHOLD * (loud - quiet)


def quiet_runs(loud: np.ndarray, min_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of at least min_frames consecutive quiet frames."""
    edges = np.diff(np.concatenate([[1], loud.astype(np.int8), [1]]))
    starts, ends = np.nonzero(edges == -1)[0], np.nonzero(edges == 1)[0]
    return [(int(a), int(b)) for a, b in zip(starts, ends) if b - a >= min_frames]


def refine_word_times(words: list[Word], loud: np.ndarray | None, offset: float) -> None:
    """Move word bounds (seconds; the window starts at `offset`, `loud` = speech_frames of its frames) to the
    pauses the audio shows. (1) The boundary between two words (DTW: the previous word's end, the next word's
    start) moves to the pause of at least REFINE_MIN_GAP_S nearest to it that overlaps the stretch between the
    two words' middles and lies inside the two words: the
    previous word ends where the pause begins, the next one starts where it ends (DTW tends to put the boundary
    inside the previous word's tail, counting the whole pause in the next word). (2) A start still on a quiet
    frame moves forward to the first loud frame of the word's span, an end on a quiet frame back to the last loud
    one (a window's first word, the last word). Never past the word's other bound, never out of the window;
    continuous speech (no such pause, bounds on loud frames) keeps its times."""
    if loud is None or not words:
        return
    n = loud.size
    runs = quiet_runs(loud, max(1, round(REFINE_MIN_GAP_S * 100)))

    def frame(t: float) -> int:
        return int(min(max(round((t - offset) * 100), 0), n))

    for prev, nxt in zip(words[:-1], words[1:]):
        lo = frame((prev.start + prev.end) / 2)
        hi = frame((nxt.start + nxt.end) / 2)
        t = (frame(prev.end) + frame(nxt.start)) / 2
        first, last = frame(prev.start), frame(nxt.end)
        inside = [(a, b) for a, b in runs if a < hi and b > lo and a > first and b < last]
        if not inside:
            continue
        a, b = min(inside, key=lambda r: max(r[0] - t, t - r[1], 0.0))
        prev.end = round(max(offset + a / 100, prev.start + REFINE_MIN_WORD_S), 3)
        nxt.start = round(min(offset + b / 100, nxt.end - REFINE_MIN_WORD_S), 3)
    for w in words:
        a, b = frame(w.start), frame(w.end)
        if b - a < 2 or not loud[a:b].any():
            continue
        if not loud[a]:
            a = a + int(np.argmax(loud[a:b]))
            w.start = round(min(offset + a / 100, w.end - REFINE_MIN_WORD_S), 3)
        if not loud[b - 1]:
            last = b - 1 - int(np.argmax(loud[a:b][::-1]))
            w.end = round(max(offset + (last + 1) / 100, w.start + REFINE_MIN_WORD_S), 3)
