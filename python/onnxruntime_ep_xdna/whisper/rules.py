"""Token rules of Whisper decoding: special token ids, the prompt, suppression and OpenAI's timestamp rules.

Pure functions on numpy logits (one row per sequence), tested without a model. What they implement is OpenAI's
`SuppressBlank`, `SuppressTokens` and `ApplyTimestampRules` logit filters (decoding.py), which transformers'
WhisperTimeStampLogitsProcessor and CTranslate2 also follow.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .features import TIME_PRECISION

# The language token is unknown until detected: `build_prompt` leaves this placeholder.
LANGUAGE_PLACEHOLDER = -1


@dataclass(frozen=True)
class SpecialTokens:
    """Control token ids of one Whisper vocabulary (they differ between English-only and multilingual models)."""

    eot: int
    sot: int
    sot_prev: int
    sot_lm: int | None
    no_speech: int
    no_timestamps: int
    transcribe: int | None
    translate: int | None
    blank: int  # the " " token (OpenAI's SuppressBlank)
    languages: dict  # code -> token id; empty for English-only models
    n_ctx: int  # decoder positions (448)

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @property
    def multilingual(self) -> bool:
        return bool(self.languages)


def build_prompt(tokens: SpecialTokens, language: str | None, task: str, *, without_timestamps: bool,
                 previous: Sequence[int] = (), hotwords: Sequence[int] = (), prefix: Sequence[int] = ()
                 ) -> tuple[list[int], int]:
    """faster-whisper's get_prompt: ([<|startofprev|> hotwords previous] <|startoftranscript|> [<|lang|> <|task|>]
    [<|notimestamps|>] [<|0.00|> prefix], index where sampling begins). `previous` is cut to its last
    n_ctx//2 - 1 tokens as OpenAI does; hotwords are left out when there is a prefix (faster-whisper)."""
    half = tokens.n_ctx // 2 - 1
    out: list[int] = []
    hot = list(hotwords)[:half] if hotwords and not prefix else []
    if previous or hot:
        out.append(tokens.sot_prev)
        out += hot
        if previous:
            out += list(previous)[-half:]
    out.append(tokens.sot)
    if tokens.multilingual:
        out.append(tokens.languages[language] if language else LANGUAGE_PLACEHOLDER)
        out.append(tokens.translate if task == "translate" else tokens.transcribe)
    if without_timestamps:
        out.append(tokens.no_timestamps)
    sample_begin = len(out)
    if prefix:
        if not without_timestamps:
            out.append(tokens.timestamp_begin)  # the prefix is the start of a first segment at 0.00
        out += list(prefix)[:half]
    return out, sample_begin


def suppress_list(tokens: SpecialTokens, suppress: Sequence[int], model_suppress: Sequence[int]) -> np.ndarray:
    """OpenAI's _get_suppress_tokens: the given ids, -1 meaning the model's non-speech set, plus the control
    tokens that must never be generated."""
    ids = [t for t in suppress if t >= 0]
    if -1 in suppress:
        ids += list(model_suppress)
    ids += [t for t in (tokens.transcribe, tokens.translate, tokens.sot, tokens.sot_prev, tokens.sot_lm,
                        tokens.no_speech) if t is not None]
    return np.array(sorted(set(ids)), dtype=np.int64)


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if m == -np.inf:
        return -np.inf
    return m + math.log(float(np.exp(x - m).sum()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (rows of -inf stay -inf)."""
    m = logits.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = logits - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_TOP_K_BLOCK = 64


def group_max(logits: np.ndarray) -> np.ndarray | None:
    """Per row, the maxima of the groups _top_k searches by (entry i in group i mod G, G = n // 64; the n % 64
    entries past the last whole group are in none): (rows, G), one strided max over the batch; None if G = 0."""
    rows, n = logits.shape
    groups = n // _TOP_K_BLOCK
    if not groups:
        return None
    return logits[:, :groups * _TOP_K_BLOCK].reshape(rows, _TOP_K_BLOCK, groups).max(axis=1)


def _row_max(logits: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """logits.max(axis=-1, keepdims=True), from the group maxima and the ragged tail when they are known."""
    if groups is None:
        return logits.max(axis=-1, keepdims=True)
    top = groups.max(axis=-1, keepdims=True)
    tail = logits[:, groups.shape[1] * _TOP_K_BLOCK:]
    return np.maximum(top, tail.max(axis=-1, keepdims=True)) if tail.shape[1] else top


def _top_k(logits: np.ndarray, k: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Per row, the indices of the k largest entries (any order). argpartition of a whole 51865-wide row costs
    ~0.1 ms (and ~16x that on a row that is mostly -inf, as a forced timestamp makes it). Instead: the entries are
    split into groups (group_max; `groups` when the caller has them); the k-th largest group maximum is a lower
    bound on the k-th largest entry (k groups each hold an entry at least that large), so the entries >= it
    (typically a few dozen) hold the k largest, which argpartition then picks among them. Only the groups whose
    maximum reaches the bound (or is NaN) and the ragged tail can hold such entries: they are looked at, in index
    order, not the whole row. Ties at the k-th value may pick other indices than a whole-row argpartition (whose
    choice is arbitrary as well); values, and so log-probabilities, are the same."""
    rows, n = logits.shape
    blocks = n // _TOP_K_BLOCK
    if blocks < 4 * k:
        return np.argpartition(logits, n - k, axis=-1)[:, -k:]
    block_max = group_max(logits) if groups is None else groups
    bound = np.partition(block_max, blocks - k, axis=-1)[:, blocks - k]
    # member r of group g is entry g + r * blocks: for ascending g, rows of this table list entries in index order
    offsets = (np.arange(_TOP_K_BLOCK) * blocks)[:, None]
    tail = np.arange(blocks * _TOP_K_BLOCK, n)
    hits = ~(block_max < bound[:, None])  # (the whole batch at once; NaN maxima included)
    finite = np.isfinite(bound).tolist()
    top = np.empty((rows, k), np.int64)
    for j, row in enumerate(logits):
        if finite[j]:
            entries = (offsets + np.flatnonzero(hits[j])).ravel()
            if tail.size:
                entries = np.concatenate((entries, tail))
            candidates = entries[row[entries] >= bound[j]]  # = np.flatnonzero(row >= bound[j])
        else:  # fewer than k blocks with a finite entry (or NaN): the finite entries, if there are k
            candidates = np.flatnonzero(row > -np.inf)
        if candidates.size < k:  # (NaN entries: never >= the bound)
            candidates = np.arange(n)
        top[j] = candidates[np.argpartition(row[candidates], candidates.size - k)[-k:]]
    return top


# A step's (row max (rows, 1), sum(exp(row - shift)) (rows, 1), group_max or None): exp_sums, top_logprobs.
StepSums = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def exp_sums(logits: np.ndarray, scratch: np.ndarray, groups: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `logits` (rows, vocab): its max (rows, 1) and sum(exp(row - shift)) (rows, 1), shift = the max,
    or 0 for a row without a finite max (as log_softmax). The one full-row exp pass of a decoding step, written
    into `scratch` (same shape; no allocation per step); the timestamp rule and the log-probabilities share it.
    `groups`: group_max(logits), which gives the max without another pass."""
    top = _row_max(logits, groups)
    np.subtract(logits, np.where(np.isfinite(top), top, 0.0), out=scratch)
    np.exp(scratch, out=scratch)
    return top, scratch.sum(axis=-1, keepdims=True)


def top_logprobs(logits: np.ndarray, k: int, sums: StepSums | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `logits` (rows, vocab), the k most probable tokens, best first, and their log-probabilities:
    exactly log_softmax(logits) at those tokens (same float32 steps), without building the whole log-softmax.
    `sums`: (max, exp sum, group maxima) of the rows when the step already has them (LogitRules.apply_rows)."""
    m, total, groups = sums if sums is not None else (logits.max(axis=-1, keepdims=True), None, None)
    m = np.where(np.isfinite(m), m, 0.0)
    if total is None:
        total = np.exp(logits - m).sum(axis=-1, keepdims=True)
    log_sum = np.log(total)
    top = _top_k(logits, k, groups)
    rows = np.arange(len(logits))[:, None]  # (plain gathers: take_along_axis costs more Python per call)
    lp = (logits[rows, top] - m) - log_sum
    best_first = np.argsort(-lp, axis=-1, kind="stable")
    return top[rows, best_first], lp[rows, best_first]


def apply_timestamp_rules(logits: np.ndarray, sampled: Sequence[int], ts_begin: int, eot: int, no_timestamps: int,
                          max_initial: int | None) -> None:
    """In place, one row: OpenAI's ApplyTimestampRules for the tokens sampled so far in this window.

    Timestamps come in pairs (end of one segment, start of the next) except right before <|endoftext|>; they never
    decrease and a segment has non-zero length; the window starts with a timestamp <= `max_initial` (index); and
    when the timestamps together are more probable than the best text token, a timestamp is forced.
    """
    _timestamp_masks(logits, sampled, ts_begin, eot, no_timestamps, max_initial)
    _force_timestamp(logits, ts_begin)


def _timestamp_masks(logits: np.ndarray, sampled: Sequence[int], ts_begin: int, eot: int, no_timestamps: int,
                     max_initial: int | None) -> None:
    """The rules of apply_timestamp_rules that depend on the tokens only (in place, one row)."""
    logits[no_timestamps] = -np.inf
    _sequence_masks(logits, sampled, ts_begin, eot, max_initial)


def _sequence_masks(logits: np.ndarray, sampled: Sequence[int], ts_begin: int, eot: int, max_initial: int | None
                    ) -> None:
    """_timestamp_masks but <|notimestamps|> (apply_rows masks that column of the whole batch in one go)."""
    last_ts = len(sampled) >= 1 and sampled[-1] >= ts_begin
    penultimate_ts = len(sampled) < 2 or sampled[-2] >= ts_begin
    if last_ts:
        if penultimate_ts:
            logits[ts_begin:] = -np.inf
        else:
            logits[:eot] = -np.inf
    last_stamp = sampled[-1] if last_ts else next((t for t in reversed(sampled) if t >= ts_begin), None)
    if last_stamp is not None and not (last_ts and penultimate_ts):  # (else every timestamp is masked already)
        floor = last_stamp if last_ts and not penultimate_ts else last_stamp + 1
        logits[ts_begin:floor] = -np.inf
    if not sampled:
        logits[:ts_begin] = -np.inf
        if max_initial is not None:
            logits[ts_begin + max_initial + 1:] = -np.inf


def _force_timestamp(logits: np.ndarray, ts_begin: int) -> None:
    """In place, one row: text suppressed when the timestamps together outweigh the best text token."""
    logprobs = logits - _logsumexp(logits)
    text_best = float(logprobs[:ts_begin].max())
    if _logsumexp(logprobs[ts_begin:]) > text_best:
        logits[:ts_begin] = -np.inf


# log(sum of n exp terms, each <= 1), bounded by log(n) + this: room for the float32 rounding of the sum
_LOG_SUM_SLACK = 0.01


def _regroup_timestamps_only(row: np.ndarray, groups: np.ndarray, ts_begin: int) -> None:
    """group_max of a row whose entries before ts_begin are all -inf, into `groups` (G,): only the members from
    the first one at or past ts_begin on are looked at (group g holds entries g + r * G, r = 0..63; the members
    of rows r < ts_begin // G are -inf and change no maximum)."""
    blocks = groups.shape[0]
    first = ts_begin // blocks
    if first >= _TOP_K_BLOCK:
        groups[:] = -np.inf
    else:
        np.max(row[first * blocks:_TOP_K_BLOCK * blocks].reshape(_TOP_K_BLOCK - first, blocks), axis=0, out=groups)


def _force_timestamps(logits: np.ndarray, top: np.ndarray, total: np.ndarray, groups: np.ndarray | None,
                      scratch: np.ndarray, ts_begin: int) -> None:
    """_force_timestamp on every row of `logits`, bit for bit, from the step's exp_sums (top, total; updated in
    place for the rows it changes) instead of a log-softmax of each whole row:
    logsumexp(row) = max + log(total) (as _logsumexp: the same float32 sum, then float64); the best text
    log-prob is float32(max(text) - lse) (rounding is monotonic: the max of the differences is the difference of
    the max); only the 1501 timestamp log-probs are formed, and only for the rows that can be forced: their
    logsumexp is at most their max + log(1501) (each exp term is at most 1), so a row whose best text log-prob
    is above that keeps its text without it. A row without a finite max takes the one-row path.
    The group maxima of a changed row are recomputed (from its timestamps: the text is -inf)."""
    # (the decision needs a few floats per row: Python lists, not numpy calls per row)
    row_ids = [j for j, m in enumerate(top[:, 0].tolist()) if math.isfinite(m)]
    if len(row_ids) < len(logits):
        for j in sorted(set(range(len(logits))) - set(row_ids)):
            _force_timestamp(logits[j], ts_begin)
            if groups is not None:
                groups[j] = group_max(logits[j:j + 1])[0]
            top[j:j + 1], total[j:j + 1] = exp_sums(logits[j:j + 1], scratch[j:j + 1])
        if not row_ids:
            return
    rows = slice(None) if len(row_ids) == len(logits) else row_ids  # (a slice: views, no copies)
    top_f = top[rows, 0]
    lse = [m + math.log(t) for m, t in zip(top_f.tolist(), total[rows, 0].tolist())]
    lse32 = np.array(lse, np.float32)  # numpy subtracts a Python float from float32 as float32
    stamps = logits[rows, ts_begin:]
    stamps_max = stamps.max(axis=-1)
    # the row max is in the text part unless a timestamp reaches it; only then is the text part searched
    text_max = top_f
    for q, (reach, m) in enumerate(zip(stamps_max.tolist(), top_f.tolist())):
        if reach >= m:
            text_max = text_max.copy() if text_max is top_f else text_max
            text_max[q] = logits[row_ids[q], :ts_begin].max()
    text_best = (text_max - lse32).tolist()
    # = the max of each row's timestamp log-probs (monotonic rounding); -inf: no timestamp left
    stamp_top = (stamps_max - lse32).tolist()
    bound = math.log(stamps.shape[1]) + _LOG_SUM_SLACK
    close = [q for q, (m, best) in enumerate(zip(stamp_top, text_best)) if m != -np.inf and m + bound > best]
    if not close:
        return
    # _logsumexp of those rows' timestamp log-probs (finite max: checked above)
    stamp_lp = logits[[row_ids[q] for q in close], ts_begin:] - lse32[close, None]
    shift = stamp_lp.max(axis=-1, keepdims=True)
    np.subtract(stamp_lp, shift, out=stamp_lp)
    stamp_sum = np.exp(stamp_lp, out=stamp_lp).sum(axis=-1).tolist()
    for q, m, s in zip(close, shift[:, 0].tolist(), stamp_sum):
        if m + math.log(s) > text_best[q]:
            j = row_ids[q]
            logits[j, :ts_begin] = -np.inf
            if groups is not None:
                _regroup_timestamps_only(logits[j], groups[j], ts_begin)
            # the row's new sums: exp(-inf) = 0 over the text, so only the timestamps are exponentiated
            top[j, 0] = stamps_max[q]
            scratch[j, :ts_begin] = 0.0
            np.exp(logits[j, ts_begin:] - top[j, 0], out=scratch[j, ts_begin:])
            total[j, 0] = scratch[j].sum()


@dataclass(frozen=True)
class LogitRules:
    """The filters of one decoding run, applied row by row to the next-token logits."""

    suppress: np.ndarray  # ids never generated
    begin_suppress: np.ndarray  # ids not generated as the first token (blank, <|endoftext|>)
    timestamps: bool
    ts_begin: int
    eot: int
    no_timestamps: int
    max_initial: int | None  # index of the latest first timestamp

    @staticmethod
    def make(tokens: SpecialTokens, suppress: np.ndarray, *, suppress_blank: bool, without_timestamps: bool,
             max_initial_timestamp: float | None) -> "LogitRules":
        begin = np.array([tokens.blank, tokens.eot], dtype=np.int64) if suppress_blank else np.zeros(0, np.int64)
        max_initial = None if max_initial_timestamp is None else int(round(max_initial_timestamp / TIME_PRECISION))
        return LogitRules(suppress, begin, not without_timestamps, tokens.timestamp_begin, tokens.eot,
                          tokens.no_timestamps, max_initial)

    def apply(self, logits: np.ndarray, sampled: Sequence[int], n_generated: int) -> None:
        """In place on one row. `sampled`: this window's tokens so far (prefix included, as the timestamp rules
        must see it); `n_generated`: how many of them were generated (0 = the first generated token)."""
        self.apply_rows(logits[None], [sampled], n_generated, np.empty((1, logits.shape[-1]), np.float32))

    def apply_rows(self, logits: np.ndarray, seqs: Sequence[Sequence[int]], n_generated: int,
                   scratch: np.ndarray, groups: bool = True) -> StepSums:
        """The rules on every row of `logits` (rows, vocab; float32, row j after the tokens seqs[j]), in place:
        the same floats as applied row by row (apply_timestamp_rules), and the step's sums of the rows they
        leave, for top_logprobs: (max, exp sum, group maxima) from one group max and one exp pass over the
        batch (`scratch`: same shape). `groups=False` (no top-k to follow: greedy, sampling): the row max
        alone, a cheaper pass than the group maxima, and None for them."""
        if n_generated == 0 and self.begin_suppress.size:
            logits[:, self.begin_suppress] = -np.inf
        if self.suppress.size:
            logits[:, self.suppress] = -np.inf
        if self.timestamps:
            logits[:, self.no_timestamps] = -np.inf
            for row, sampled in zip(logits, seqs):
                _sequence_masks(row, sampled, self.ts_begin, self.eot, self.max_initial)
        maxima = group_max(logits) if groups else None
        top, total = exp_sums(logits, scratch, maxima)
        if self.timestamps:
            _force_timestamps(logits, top, total, maxima, scratch, self.ts_begin)
        return top, total, maxima


def compression_ratio(text: str) -> float:
    """len(utf-8) / len(zlib-compressed): the references' repetition measure (2.4 and above = a loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
