"""The decode loop written the plain way, row by row, as it was before the step was batched (search.py at
23f4291): every row filtered by the rules on its own (the timestamp rule running its own log-softmax), its
log-probabilities from a second log-softmax pass, its top-k candidates found by a scan of the whole row,
candidates merged in a dict keyed by the whole sequence.
The tests run it against search.py's loop, which must give the same tokens and the same floats, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from onnxruntime_ep_xdna.whisper import search as S
from onnxruntime_ep_xdna.whisper.search import _sample


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    rows, n = logits.shape
    blocks = n // 64
    if blocks < 4 * k:
        return np.argpartition(logits, n - k, axis=-1)[:, -k:]
    block_max = logits[:, :blocks * 64].reshape(rows, 64, blocks).max(axis=1)
    bound = np.partition(block_max, blocks - k, axis=-1)[:, blocks - k]
    top = np.empty((rows, k), np.int64)
    for j, row in enumerate(logits):
        if np.isfinite(bound[j]):
            candidates = np.flatnonzero(row >= bound[j])
        else:
            candidates = np.flatnonzero(row > -np.inf)
        if candidates.size < k:  # (23f4291 raised here on a row with NaN: the whole row instead, as now)
            candidates = np.arange(n)
        top[j] = candidates[np.argpartition(row[candidates], candidates.size - k)[-k:]]
    return top


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    m = logits.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    log_sum = np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    top = _top_k(logits, k)
    lp = (np.take_along_axis(logits, top, axis=-1) - m) - log_sum
    best_first = np.argsort(-lp, axis=-1, kind="stable")
    return np.take_along_axis(top, best_first, axis=-1), np.take_along_axis(lp, best_first, axis=-1)


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    if m == -np.inf:
        return -np.inf
    return m + math.log(float(np.exp(x - m).sum()))


def apply_timestamp_rules(logits, sampled, ts_begin, eot, no_timestamps, max_initial) -> None:
    logits[no_timestamps] = -np.inf
    last_ts = len(sampled) >= 1 and sampled[-1] >= ts_begin
    penultimate_ts = len(sampled) < 2 or sampled[-2] >= ts_begin
    if last_ts:
        if penultimate_ts:
            logits[ts_begin:] = -np.inf
        else:
            logits[:eot] = -np.inf
    stamps = [t for t in sampled if t >= ts_begin]
    if stamps:
        floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
        logits[ts_begin:floor] = -np.inf
    if not sampled:
        logits[:ts_begin] = -np.inf
        if max_initial is not None:
            logits[ts_begin + max_initial + 1:] = -np.inf
    logprobs = logits - _logsumexp(logits)
    text_best = float(logprobs[:ts_begin].max())
    if _logsumexp(logprobs[ts_begin:]) > text_best:
        logits[:ts_begin] = -np.inf


def apply_rules(rules, logits, sampled, n_generated) -> None:
    """LogitRules.apply on one row."""
    if n_generated == 0 and rules.begin_suppress.size:
        logits[rules.begin_suppress] = -np.inf
    if rules.suppress.size:
        logits[rules.suppress] = -np.inf
    if rules.timestamps:
        apply_timestamp_rules(logits, sampled, rules.ts_begin, rules.eot, rules.no_timestamps, rules.max_initial)


def sampling(model, state, logits, prefix, rules, temperature, n, sample_len, prompt_len, rng):
    eot = rules.eot
    seqs = [list(prefix) for _ in range(n)]
    sum_lp = np.zeros(n, np.float64)
    done = np.zeros(n, bool)
    logits = np.repeat(logits[None], n, axis=0) if n > 1 else logits[None].copy()
    order = np.zeros(n, np.int64) if n > 1 else None
    for i in range(sample_len):
        x = np.array(logits, dtype=np.float32)
        nxt = np.empty(n, np.int64)
        for k in range(n):
            if done[k]:
                nxt[k] = eot
                continue
            apply_rules(rules, x[k], seqs[k], i)
            t = int(np.argmax(x[k])) if temperature == 0 else _sample(x[k], temperature, rng)
            row = x[k]
            m = float(row.max())
            sum_lp[k] += float(row[t]) - (m + np.log(np.exp(row - m).sum()))
            nxt[k] = t
            if t == eot:
                done[k] = True
            else:
                seqs[k].append(t)
        if done.all() or i == sample_len - 1:
            break
        logits, state = model.step(state, nxt, order)
        order = None
    return seqs, sum_lp, ["eot" if d else "length" for d in done]


def beam_search(model, state, logits, prefix, rules, options, beam_size, sample_len, prompt_len):
    eot = rules.eot
    max_candidates = max(1, round(beam_size * options.patience))
    beams = [tuple(prefix)] * beam_size
    sum_lp = [0.0] * beam_size
    finished: dict[tuple, float] = {}
    logits = np.repeat(logits[None], beam_size, axis=0)
    grow = True
    for i in range(sample_len):
        x = np.array(logits, dtype=np.float32)
        scores: dict[tuple, float] = {}
        sources: dict[tuple, int] = {}
        for j in range(beam_size):
            apply_rules(rules, x[j], beams[j], i)
        top, top_lp = top_logprobs(x, beam_size + 1)
        for j in range(beam_size):
            for t, lp in zip(top[j].tolist(), top_lp[j].tolist()):
                seq = beams[j] + (t,)
                scores[seq] = sum_lp[j] + lp
                sources[seq] = j
        new_beams, new_lp, origin = [], [], []
        newly: dict[tuple, float] = {}
        for seq in sorted(scores, key=scores.get, reverse=True):
            if seq[-1] == eot:
                newly[seq] = scores[seq]
            else:
                new_beams.append(seq)
                new_lp.append(scores[seq])
                origin.append(sources[seq])
                if len(new_beams) == beam_size:
                    break
        for seq in sorted(newly, key=newly.get, reverse=True):
            if len(finished) >= max_candidates:
                break
            finished[seq] = newly[seq]
        beams, sum_lp = new_beams, new_lp
        if len(finished) >= max_candidates or i == sample_len - 1:
            break
        order = np.array([0] * beam_size if grow else origin, dtype=np.int64)
        if not grow and np.array_equal(order, np.arange(beam_size)):
            order = None
        logits, state = model.step(state, np.array([b[-1] for b in beams], dtype=np.int64), order)
        grow = False
    stopped = {}
    if len(finished) < beam_size:
        for j in np.argsort(sum_lp)[::-1]:
            seq = beams[j] + (eot,)
            finished[seq] = sum_lp[j]
            stopped[seq] = "length"
            if len(finished) >= beam_size:
                break
    seqs = [list(s[:-1]) for s in finished]
    return seqs, [finished[s] for s in finished], [stopped.get(s, "eot") for s in finished]


def use_reference(monkeypatch) -> None:
    """Make search.decode_window run the plain loops."""
    monkeypatch.setattr(S, "_sampling", sampling)
    monkeypatch.setattr(S, "_beam_search", beam_search)


def recorded_decodes(monkeypatch, run) -> list:
    """Every search's candidates (tokens, sum log-probs as exact floats, stop reasons) and every window's
    result while `run()` transcribes."""
    log = []
    for name in ("_beam_search", "_sampling"):
        def recorder(*a, _fn=getattr(S, name), **k):
            seqs, sum_lp, stopped = _fn(*a, **k)
            log.append(([list(map(int, q)) for q in seqs], [float(v).hex() for v in sum_lp], list(stopped)))
            return seqs, sum_lp, stopped

        monkeypatch.setattr(S, name, recorder)
    inner = S.decode_window

    def window(*a, **k):
        r = inner(*a, **k)
        log.append((r.tokens, float(r.sum_logprob).hex(), float(r.no_speech_prob).hex(), r.temperature, r.stopped))
        return r

    monkeypatch.setattr(S, "decode_window", window)
    run()
    monkeypatch.undo()
    return log


def batched_and_plain(monkeypatch, run) -> tuple[list, list]:
    """The decodes of `run()` with search.py's loops, and with the plain ones of this module."""
    batched = recorded_decodes(monkeypatch, run)
    use_reference(monkeypatch)
    plain = recorded_decodes(monkeypatch, run)  # (recorded_decodes undoes the reference again)
    return batched, plain
