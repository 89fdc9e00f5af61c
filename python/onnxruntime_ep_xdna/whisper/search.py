"""Searching one 30 s window: greedy, best-of-N sampling and beam search, and the temperature fallback.

The algorithms are OpenAI's (`whisper/decoding.py`: GreedyDecoder, BeamSearchDecoder with patience,
MaximumLikelihoodRanker with length_penalty; `whisper/transcribe.py`: decode_with_fallback). All sequences of a
window are one batch: each step is ONE call of the model's decoder-with-past with batch = beams (or samples), and
the self-attention cache is reordered by beam between steps. The model is anything with the `DecoderModel`
methods below (the ONNX sessions in onnx_model.py; the tests also use a scripted fake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .options import TranscriptionOptions
from .rules import LANGUAGE_PLACEHOLDER, LogitRules, compression_ratio, log_softmax, top_logprobs


class DecoderModel(Protocol):
    """What the search needs from a Whisper model (see onnx_model.WhisperOnnx)."""

    tokens: object  # rules.SpecialTokens

    def start(self, window, prompt: Sequence[int], rows: Sequence[int] | None = None) -> tuple[np.ndarray, object]:
        """Run the prompt (batch 1): (logits of the prompt positions `rows` (len(rows), vocab; None: every
        position), decoder state)."""

    def step(self, state, tokens: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, object]:
        """Reorder the state's batch by `order` (None = keep; a longer order grows the batch), then feed one token
        per sequence: (next-token logits (batch, vocab), new state). The search filters the logits in place
        (start's too): return an array no one else reads (a read-only one is copied first, see _rows_to_filter)."""

    def text(self, tokens: Sequence[int]) -> str: ...


@dataclass
class DecodingResult:
    tokens: list[int]  # the window's tokens after the prompt (prefix included), without <|endoftext|>
    text: str
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    language: str | None = None
    attempts: int = 1  # temperatures tried (fallback)
    stopped: str = "eot"  # "eot" or "length" (the token limit was hit first)


def length_score(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """OpenAI's MaximumLikelihoodRanker: log-prob / length, or / ((5 + length) / 6) ** alpha."""
    penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
    return sum_logprob / penalty if penalty else sum_logprob


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One draw from softmax(logits / temperature) (Gumbel-max: exact, and -inf stays impossible)."""
    gumbel = -np.log(-np.log(rng.random(logits.shape[0]) + 1e-300) + 1e-300)
    return int(np.argmax(logits / temperature + gumbel))


def decode_window(model: DecoderModel, window, prompt: Sequence[int], sample_begin: int, rules: LogitRules,
                  options: TranscriptionOptions, temperature: float, rng: np.random.Generator,
                  language_ids: Sequence[int] = (), timings: dict | None = None) -> DecodingResult:
    """One decoding of one window at one temperature (OpenAI's DecodingTask.run for one audio).

    `prompt` may hold LANGUAGE_PLACEHOLDER: the language is then detected from the logits at
    <|startoftranscript|> over `language_ids` and the placeholder replaced before the rest of the prompt is fed.
    Prompt tokens from `sample_begin` on (a prefix) count as sampled for the timestamp rules.
    """
    toks = model.tokens
    prompt = list(prompt)
    sot_index = prompt.index(toks.sot)
    head = prompt.index(LANGUAGE_PLACEHOLDER) if LANGUAGE_PLACEHOLDER in prompt else len(prompt)
    # Only two rows of the prompt's logits are read: <|startoftranscript|> (no-speech, language) and the last.
    logits, state = model.start(window, prompt[:head], rows=[sot_index, head - 1])
    sot_logits = logits[0]
    no_speech_prob = float(np.exp(log_softmax(sot_logits[None])[0, toks.no_speech]))
    language = None
    if head < len(prompt):
        ids = np.asarray(language_ids)
        prompt[head] = int(ids[np.argmax(sot_logits[ids])])
        language = prompt[head]
        for t in prompt[head:]:
            logits, state = model.step(state, np.array([t]), None)
    last = logits[-1]

    n_ctx = toks.n_ctx
    # OpenAI stops once the sequence is longer than n_ctx: the last token sampled is never fed back.
    sample_len = max(1, min(options.sample_len or n_ctx // 2, n_ctx + 1 - len(prompt)))
    prefix = prompt[sample_begin:]
    beam = temperature == 0 and options.beam_size > 1
    n = options.beam_size if beam else (options.best_of if temperature > 0 else 1)
    if beam:
        seqs, sum_lp, stopped = _beam_search(model, state, last, prefix, rules, options, n, sample_len, len(prompt))
    else:
        seqs, sum_lp, stopped = _sampling(model, state, last, prefix, rules, temperature, n, sample_len, len(prompt), rng)
    # Rank the candidates (OpenAI: MaximumLikelihoodRanker; a single greedy sequence is its own best).
    lengths = [len(s) - len(prefix) for s in seqs]  # generated tokens, <|endoftext|> excluded
    scores = [length_score(lp, ln, options.length_penalty) for lp, ln in zip(sum_lp, lengths)]
    best = int(np.argmax(scores))
    tokens = list(seqs[best])
    text = model.text(tokens).strip()
    return DecodingResult(tokens=tokens, text=text, sum_logprob=float(sum_lp[best]),
                          avg_logprob=float(sum_lp[best]) / (lengths[best] + 1), no_speech_prob=no_speech_prob,
                          temperature=temperature, compression_ratio=compression_ratio(text), language=language,
                          stopped=stopped[best])


def _rows_to_filter(logits: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """The step's logits as the array the rules filter in place: the model's own when it is already (rows, vocab)
    float32, C-contiguous and writable (WhisperOnnx: the run's output, read by no one else), which saves a copy
    of every row per step; otherwise (the prompt's one row standing for every sequence, a read-only array) a
    copy in `buffer`."""
    if (logits.shape == buffer.shape and logits.dtype == np.float32 and logits.flags.c_contiguous
            and logits.flags.writeable):
        return logits
    np.copyto(buffer, logits)
    return buffer


def _sampling(model, state, logits, prefix, rules, temperature, n, sample_len, prompt_len, rng):
    """GreedyDecoder for n sequences in one batch: argmax at temperature 0, else sampling; a finished sequence
    keeps emitting <|endoftext|> at no cost until all have finished."""
    eot = rules.eot
    seqs = [list(prefix) for _ in range(n)]
    sum_lp = np.zeros(n, np.float64)
    done = np.zeros(n, bool)
    # the step's exp pass (and logits that cannot be filtered in place) live in buffers for the whole window
    buffer = np.empty((n, logits.shape[-1]), np.float32)
    scratch = np.empty_like(buffer)
    logits = logits[None]  # the first step: the prompt's one row stands for every sequence
    order = np.zeros(n, np.int64) if n > 1 else None  # first step grows the batch from 1 to n
    for i in range(sample_len):
        x = _rows_to_filter(logits, buffer)
        # (finished rows are filtered too: cheaper than picking out the others; no top-k follows: no group maxima)
        top, total, _ = rules.apply_rows(x, seqs, i, scratch, groups=False)
        nxt = np.empty(n, np.int64)
        for k in range(n):
            if done[k]:
                nxt[k] = eot
                continue
            row = x[k]
            if temperature == 0:
                t = int(np.argmax(row))
            else:
                t = _sample(row, temperature, rng)
            if np.isfinite(top[k, 0]):  # log_softmax(row)[t] from the step's exp pass (same float32 steps)
                lp = float(row[t]) - (float(top[k, 0]) + np.log(total[k, 0]))
            else:
                m = float(row.max())
                lp = float(row[t]) - (m + np.log(np.exp(row - m).sum()))
            sum_lp[k] += lp
            nxt[k] = t
            if t == eot:
                done[k] = True
            else:
                seqs[k].append(t)
        if done.all() or i == sample_len - 1:
            break
        logits, state = model.step(state, nxt, order)
        order = None
    stopped = ["eot" if d else "length" for d in done]
    return seqs, sum_lp, stopped


def _beam_search(model, state, logits, prefix, rules, options, beam_size, sample_len, prompt_len):
    """OpenAI's BeamSearchDecoder for one audio: beam_size live sequences in one batch; at each step every beam
    proposes its beam_size + 1 best tokens, the best beam_size unfinished candidates live on (the cache is
    reordered to follow them) and finished ones are collected until round(beam_size * patience) have finished.
    Sequences are compared with their prompt, as OpenAI does (identical candidates merge): on the first step
    every beam is the prompt, so one row stands for all; afterwards the live beams are distinct sequences (each
    is a distinct (beam, token) candidate of distinct beams), so their candidates are too."""
    eot = rules.eot
    k = beam_size + 1
    max_candidates = max(1, round(beam_size * options.patience))
    beams = [tuple(prefix)] * beam_size
    sum_lp = [0.0] * beam_size
    finished: dict[tuple, float] = {}
    x_all = np.empty((beam_size, logits.shape[-1]), np.float32)  # buffers for the whole window
    scratch_all = np.empty_like(x_all)
    logits = logits[None]
    grow = True  # the state still holds batch 1: the first reorder repeats it
    for i in range(sample_len):
        rows = 1 if grow else beam_size
        x, scratch = _rows_to_filter(logits, x_all[:rows]), scratch_all[:rows]
        sums = rules.apply_rows(x, beams[:rows], i, scratch)
        top, top_lp = top_logprobs(x, k, sums)
        # candidate (row j, rank r) at j * k + r: the order the references insert them in (beam, then rank)
        scores = (np.array(sum_lp[:rows])[:, None] + top_lp).ravel().tolist()
        tokens = top.ravel().tolist()
        new_beams, new_lp, origin = [], [], []
        newly = []
        for c in sorted(range(len(scores)), key=scores.__getitem__, reverse=True):
            j, t = c // k, tokens[c]
            if t == eot:
                newly.append((beams[j] + (t,), scores[c]))
            else:
                new_beams.append(beams[j] + (t,))
                new_lp.append(scores[c])
                origin.append(j)
                if len(new_beams) == beam_size:
                    break
        for seq, lp in sorted(newly, key=lambda item: item[1], reverse=True):
            if len(finished) >= max_candidates:
                break
            finished[seq] = lp
        beams, sum_lp = new_beams, new_lp
        if len(finished) >= max_candidates or i == sample_len - 1:
            break
        # On the first step every beam comes from the one prompt row; afterwards an unchanged order is no copy.
        order = np.array([0] * beam_size if grow else origin, dtype=np.int64)
        if not grow and np.array_equal(order, np.arange(beam_size)):
            order = None
        logits, state = model.step(state, np.array([b[-1] for b in beams], dtype=np.int64), order)
        grow = False
    stopped = {}
    if len(finished) < beam_size:  # OpenAI's finalize: top up with the live beams, best first
        for j in np.argsort(sum_lp)[::-1]:
            seq = beams[j] + (eot,)
            finished[seq] = sum_lp[j]
            stopped[seq] = "length"
            if len(finished) >= beam_size:
                break
    seqs = [list(s[:-1]) for s in finished]
    return seqs, [finished[s] for s in finished], [stopped.get(s, "eot") for s in finished]


def decode_with_fallback(model: DecoderModel, window, prompt: Sequence[int], sample_begin: int, rules: LogitRules,
                         options: TranscriptionOptions, rng: np.random.Generator, language_ids: Sequence[int] = (),
                         ) -> DecodingResult:
    """OpenAI's decode_with_fallback: decode at each temperature in turn until the result is neither too
    repetitive (compression ratio) nor too unlikely (average log-prob), unless it looks like silence."""
    result = None
    for attempt, temperature in enumerate(options.temperature, 1):
        result = decode_window(model, window, prompt, sample_begin, rules, options, temperature, rng, language_ids)
        result.attempts = attempt
        needs_fallback = False
        if options.compression_ratio_threshold is not None and \
                result.compression_ratio > options.compression_ratio_threshold:
            needs_fallback = True  # too repetitive
        if options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold:
            needs_fallback = True  # too unlikely
        if options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold and \
                options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold:
            needs_fallback = False  # silence: the caller skips the window
        if not needs_fallback:
            break
    return result
