"""Whisper decoding logic without a neural network: token rules, the temperature fallback, the no-speech rule and the
long-form seek loop, driven by a scripted fake model whose next-token logits are chosen by the test.

The ONNX-backed tests (beam search against a brute-force reference on a tiny exported Whisper, features against
OpenAI's own code) are in test_whisper.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxruntime_ep_xdna.whisper import features as F
from onnxruntime_ep_xdna.whisper import rules as R
from onnxruntime_ep_xdna.whisper import search as S
from onnxruntime_ep_xdna.whisper.options import OptionsError, TranscriptionOptions
from onnxruntime_ep_xdna.whisper.transcribe import split_segments, transcribe, transcribe_all

SR = F.SAMPLE_RATE
N_TEXT = 400  # text tokens 0..399 of the fake vocabulary
TOKENS = R.SpecialTokens(eot=400, sot=401, sot_prev=402, sot_lm=403, no_speech=404, no_timestamps=405,
                         transcribe=None, translate=None, blank=399, languages={}, n_ctx=448)
TS = TOKENS.timestamp_begin
VOCAB = TS + F.N_TIMESTAMPS


class FakeWindow:
    def __init__(self, seek):
        self.seek = seek


class FakeModel:
    """The DecoderModel interface over a Python function `script(window, generated tokens) -> logits row`.

    The state is the list of token sequences per batch row, reordered like the real cache; every `step` call is
    recorded with its batch size so tests can check that beams run as one batch."""

    n_mels = 80

    def __init__(self, script, full_mel=None):
        self.script, self.full_mel = script, full_mel
        self.tokens = TOKENS
        self.mel_filters = F.mel_filter_bank(80)
        self.is_multilingual = False
        self.lang_to_id = {}
        self.model_suppress = []
        self.windows = []  # seeks of the windows decoded
        self.step_batches = []
        self.no_speech_logit = -10.0

    def encode(self, mel, timings=None):
        seek = 0
        if self.full_mel is not None:  # which part of the file is this window? (noise audio: every frame unique)
            k = min(50, self.full_mel.shape[1])
            block = mel[0, :, :k]
            seek = next(s for s in range(self.full_mel.shape[1])
                        if np.allclose(self.full_mel[:, s:s + k], block[:, :self.full_mel[:, s:s + k].shape[1]],
                                       atol=1e-6))
        self.windows.append(seek)
        return FakeWindow(seek)

    def _row(self, window, seq):
        return np.asarray(self.script(window, seq), np.float32)

    def start(self, window, prompt, rows=None):
        logits = np.zeros((len(prompt), VOCAB), np.float32)
        logits[:, TOKENS.no_speech] = self.no_speech_logit
        logits[-1] = self._row(window, [])
        return (logits if rows is None else logits[rows]), (window, [[]])

    def step(self, state, tokens, order):
        window, seqs = state
        if order is not None:
            seqs = [list(seqs[i]) for i in order]
        seqs = [s + [int(t)] for s, t in zip(seqs, tokens)]
        self.step_batches.append(len(seqs))
        return np.stack([self._row(window, s) for s in seqs]), (window, seqs)

    def text(self, tokens):
        return "".join(f" w{t}" for t in tokens if t < N_TEXT)

    def encode_text(self, text):
        return [int(w[1:]) for w in text.split()]


def no_timestamps_rules(**kw):
    return R.LogitRules.make(TOKENS, np.zeros(0, np.int64), suppress_blank=False, without_timestamps=True,
                             max_initial_timestamp=1.0, **kw)


# ---- token rules ------------------------------------------------------------------------------------------------


def test_timestamp_rules_pair_and_never_go_back():
    logits = np.zeros(VOCAB, np.float32)
    R.apply_timestamp_rules(logits, [], TS, TOKENS.eot, TOKENS.no_timestamps, 50)
    assert np.isneginf(logits[:TS]).all() and np.isneginf(logits[TS + 51:]).all() and np.isfinite(logits[TS:TS + 51]).all()
    logits = np.zeros(VOCAB, np.float32)
    R.apply_timestamp_rules(logits, [TS + 10, 5], TS, TOKENS.eot, TOKENS.no_timestamps, 50)
    # After text, a timestamp must be later than the last one (segments have non-zero length).
    assert np.isneginf(logits[TS:TS + 11]).all() and np.isfinite(logits[TS + 11:]).all()
    logits = np.zeros(VOCAB, np.float32)
    logits[TOKENS.eot] = 10.0  # (with flat logits the 1501 timestamps together would outweigh it and be forced)
    R.apply_timestamp_rules(logits, [TS + 10, 5, TS + 20], TS, TOKENS.eot, TOKENS.no_timestamps, 50)
    # A lone closing timestamp: the next token is its pair (>= it) or <|endoftext|>, never text.
    assert np.isneginf(logits[:TOKENS.eot]).all() and np.isfinite(logits[TOKENS.eot])
    assert np.isneginf(logits[TS:TS + 20]).all() and np.isfinite(logits[TS + 20])


def test_prompt_layout_matches_faster_whisper():
    ml = R.SpecialTokens(eot=400, sot=401, sot_prev=402, sot_lm=403, no_speech=404, no_timestamps=405,
                         transcribe=406, translate=407, blank=399, languages={"en": 410, "de": 411}, n_ctx=448)
    prompt, begin = R.build_prompt(ml, "de", "translate", without_timestamps=False, previous=list(range(300)),
                                   hotwords=[7, 8], prefix=[])
    assert prompt[:3] == [402, 7, 8] and prompt[3:3 + 223] == list(range(300))[-223:]
    assert prompt[-3:] == [401, 411, 407] and begin == len(prompt)
    prompt, begin = R.build_prompt(ml, None, "transcribe", without_timestamps=False, hotwords=[7], prefix=[5, 6])
    # hotwords are dropped with a prefix; the prefix opens a segment at 0.00 and is part of the sampled tokens
    assert prompt == [401, R.LANGUAGE_PLACEHOLDER, 406, ml.timestamp_begin, 5, 6] and begin == 3


def test_split_segments_follows_timestamp_pairs():
    tokens = [TS + 0, 1, 2, TS + 50, TS + 50, 3, TS + 100]  # <0.00> a b <1.00><1.00> c <2.00>
    spans, advance = split_segments(tokens, TS)
    assert [(s, e, [t for t in span if t < TS]) for s, e, span in spans] == [(0, 50, [1, 2]), (50, 100, [3])]
    assert advance is None  # single ending timestamp: the whole window is done
    # Speech runs past the last timestamp (or decoding stopped): the unfinished segment is dropped and the next
    # window starts where the last complete one ended (OpenAI's seek): <2.00> = 200 mel frames.
    spans, advance = split_segments(tokens + [TS + 100, 4, 5], TS)
    assert [s for s, _, _ in spans] == [0, 50] and advance == 200


@pytest.mark.parametrize("vocab", [VOCAB, 51865])  # whisper's vocabulary: the grouped search (rules._top_k)
def test_top_logprobs_equal_the_full_log_softmax(vocab):
    """The beam step's top-k: the same tokens, order and float32 values as log_softmax over the whole row, also
    with suppressed (-inf) tokens, a row where one token is left, a row that is mostly -inf, the best entries in
    the ragged tail past the last whole group, and a row of one repeated value."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, vocab)) * 4).astype(np.float32)
    x[:, rng.integers(0, vocab, 300)] = -np.inf
    x[3] = -np.inf
    x[3, 7] = 2.0
    x[4, :vocab - 300] = -np.inf  # mostly -inf, as after a forced timestamp: the finite-only partition
    x[5, vocab - 3:] = 40.0 + np.arange(3)  # the three best at the very end
    x[6] = 1.5
    top, lp = R.top_logprobs(x, 6)
    full = R.log_softmax(x)
    for j in range(7):
        expected = np.sort(full[j])[::-1][:6]
        assert np.array_equal(lp[j], expected) and np.array_equal(full[j][top[j]], lp[j])
        assert len(set(top[j].tolist())) == 6
    assert top[3, 0] == 7 and lp[3, 0] == 0.0 and np.isneginf(lp[3, 1:]).all()
    assert (top[4] >= vocab - 300).all()
    assert top[5, :3].tolist() == [vocab - 1, vocab - 2, vocab - 3]


WHISPER_RULES = dict(eot=50257, no_timestamps=50363, ts_begin=50364)  # whisper-base's ids; vocabulary 51865


def random_rows(rng, rows: int, vocab: int, ts: int, ties: bool = False) -> np.ndarray:
    """Logits whose timestamps sometimes outweigh the best text token and sometimes not; `ties`: few values."""
    x = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4.0)).astype(np.float32)
    x[:, ts:] += rng.uniform(-6.0, 6.0, (rows, 1)).astype(np.float32)
    x[np.arange(rows), rng.integers(0, ts, rows)] += rng.uniform(0.0, 12.0, rows).astype(np.float32)
    if ties:
        x = np.round(x)
    return x


def random_sampled(rng, ts: int, vocab: int) -> list[int]:
    """Tokens so far in every state the timestamp rules tell apart (none; text; an open or a closed pair)."""
    seq = []
    for _ in range(rng.integers(0, 8)):
        seq.append(int(rng.integers(ts, vocab)) if rng.random() < 0.4 else int(rng.integers(0, ts - 10)))
    return seq


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the rows of -inf / +inf / NaN warn in numpy, on purpose
@pytest.mark.parametrize("vocab", [VOCAB, 51865])
def test_rules_on_the_batch_equal_the_rules_row_by_row(vocab):
    """LogitRules.apply_rows (the batched step) leaves every row bit for bit as the plain one-row rules of
    tests/search_reference.py, and its sums give top_logprobs the same tokens, order (ties included) and floats
    as the plain top_logprobs there (log-softmax of each row, top-k by a scan of the whole row), over random
    logits, every timestamp state, suppression, ties and rows without a finite maximum (all -inf, +inf, NaN)."""
    from search_reference import apply_rules, top_logprobs

    if vocab == VOCAB:
        ids = dict(eot=TOKENS.eot, no_timestamps=TOKENS.no_timestamps, ts_begin=TS)
    else:
        ids = WHISPER_RULES
    ts = ids["ts_begin"]
    rng = np.random.default_rng(11)
    forced = kept = 0
    for case in range(60):
        rows = int(rng.integers(1, 7))
        suppress = np.unique(rng.integers(0, vocab, int(rng.integers(0, 90))))
        rules = R.LogitRules(suppress, np.array([ts - 20, ids["eot"]]), bool(case % 5), ids["ts_begin"], ids["eot"],
                             ids["no_timestamps"], None if case % 7 == 0 else 50)
        x = random_rows(rng, rows, vocab, ts, ties=case % 3 == 0)
        if case % 11 == 0:
            x[0] = -np.inf
            x[-1, 5] = np.inf if case % 2 else np.nan
        seqs = [random_sampled(rng, ts, vocab) for _ in range(rows)]
        n_generated = int(rng.integers(0, 2))
        ref = x.copy()
        for j in range(rows):
            apply_rules(rules, ref[j], seqs[j], n_generated)
        got = x.copy()
        sums = rules.apply_rows(got, seqs, n_generated, np.empty_like(got))
        assert np.array_equal(got, ref, equal_nan=True), case
        for j in range(rows):
            if rules.timestamps and seqs[j] and np.isfinite(x[j]).all():
                forced += bool(np.isneginf(ref[j, :ts]).all())
                kept += bool(np.isfinite(ref[j, :ts]).any())
        for k in (1, 6):
            (t_ref, lp_ref), (t_got, lp_got) = top_logprobs(ref, k), R.top_logprobs(got, k, sums)
            assert np.array_equal(R.top_logprobs(ref, k)[0], t_ref)  # (the same without the step's sums)
            assert np.array_equal(t_got, t_ref) and np.array_equal(lp_got, lp_ref, equal_nan=True), case
    assert forced >= 5 and kept >= 5, (forced, kept)  # both outcomes of the forced-timestamp rule were checked


def test_kv_reorder_follows_the_beams_in_place():
    """Beam reorder of the self-attention cache: the rows `order` picks, written into the last run's outputs
    (same OrtValues, no new buffers) when the batch keeps its size; new values when it grows (first step)."""
    import onnxruntime as ort

    from onnxruntime_ep_xdna.whisper.onnx_model import reorder_rows

    rng = np.random.default_rng(4)
    data = {f"kv{i}": rng.standard_normal((5, 2, 3, 4)).astype(np.float32) for i in range(2)}
    values = {k: ort.OrtValue.ortvalue_from_numpy(v.copy()) for k, v in data.items()}
    order = np.array([1, 1, 0, 3, 2])
    out = reorder_rows(values, order)
    for k, v in data.items():
        assert out[k] is values[k]
        assert np.array_equal(out[k].numpy(), v[order])
    grown = reorder_rows({k: ort.OrtValue.ortvalue_from_numpy(v[:1].copy()) for k, v in data.items()},
                         np.zeros(5, np.int64))
    for k, v in data.items():
        assert np.array_equal(grown[k].numpy(), np.repeat(v[:1], 5, axis=0))


def test_kv_reorder_moves_bfloat16_rows_as_bits():
    """The bf16 self-attention cache (decoder_graph pass 7): numpy has no bfloat16, so the rows move as uint16 bits
    (onnx_model.host_view), in place, or into new bfloat16 values when the batch grows."""
    from onnxruntime_ep_xdna.whisper.onnx_model import host_view, ortvalue_like, reorder_rows

    bits = np.random.default_rng(5).integers(0, 2**16, (5, 2, 3, 4)).astype(np.uint16)
    value = ortvalue_like(bits.copy(), "tensor(bfloat16)")
    assert value.data_type() == "tensor(bfloat16)" and np.array_equal(host_view(value), bits)
    order = np.array([4, 4, 0, 1, 2])
    out = reorder_rows({"kv": value}, order)
    assert out["kv"] is value and np.array_equal(host_view(value), bits[order])
    grown = reorder_rows({"kv": ortvalue_like(bits[:1].copy(), "tensor(bfloat16)")}, np.zeros(3, np.int64))["kv"]
    assert grown.data_type() == "tensor(bfloat16)" and np.array_equal(host_view(grown), np.repeat(bits[:1], 3, 0))
    empty = ortvalue_like(np.zeros((1, 2, 0, 4), np.uint16), "tensor(bfloat16)")
    assert empty.shape() == [1, 2, 0, 4] and host_view(empty).size == 0


def test_run_ort_values_matches_the_public_call_and_falls_back():
    """onnx_model.run_ort_values (the Whisper sessions' run, without ORT's Python wrapper): the outputs of
    run_with_ort_values, in the order asked; a bfloat16 output stays bfloat16; a session without ORT's private
    binding (a wrapper, another ORT) and a bad feed go through the public call, which says what is wrong."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onnxruntime_ep_xdna.whisper.onnx_model import host_view, ortvalue_like, run_ort_values

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["sum"]),
         helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16)],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("x16", TensorProto.BFLOAT16, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    x, y = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    feed = {"x": ort.OrtValue.ortvalue_from_numpy(x), "y": ort.OrtValue.ortvalue_from_numpy(y)}
    public = session.run_with_ort_values(["x16", "sum"], feed)
    for names in (["x16", "sum"], None):
        got = run_ort_values(session, names, feed)
        if names is None:
            got = got[::-1]  # the graph's order: sum, x16
        assert got[0].data_type() == "tensor(bfloat16)" and np.array_equal(host_view(got[0]), host_view(public[0]))
        assert np.array_equal(got[1].numpy(), x + y)

    class Wrapped:  # no _sess: the public call
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def run_with_ort_values(self, names, feed):
            self.calls += 1
            return self.inner.run_with_ort_values(names, feed)

    wrapped = Wrapped(session)
    assert np.array_equal(run_ort_values(wrapped, ["sum"], feed)[0].numpy(), x + y) and wrapped.calls == 1
    with pytest.raises(ValueError, match=r"Required inputs \(\[.x.\]\) are missing"):
        run_ort_values(session, ["sum"], {"y": feed["y"], "z": ortvalue_like(x, "tensor(float)")})


def test_compression_ratio_flags_loops():
    assert R.compression_ratio(" the" * 60) > 2.4
    assert R.compression_ratio("And Mr. John Dashwood had then leisure to consider how much there might be") < 2.4


def test_options_are_validated():
    assert TranscriptionOptions().beam_size == 5 and TranscriptionOptions().temperature[-1] == 1.0
    assert TranscriptionOptions(temperature=0).temperature == (0.0,)
    for bad in ({"beam_size": 0}, {"temperature": (-1,)}, {"task": "summarise"}, {"patience": 0},
                {"length_penalty": 3.0}, {"no_speech_threshold": float("nan")}):
        with pytest.raises(OptionsError):
            TranscriptionOptions(**bad)
    with pytest.raises(OptionsError, match="unknown option"):
        TranscriptionOptions.from_kwargs(beams=3)


# ---- search -----------------------------------------------------------------------------------------------------


def test_beams_run_as_one_batch_and_follow_the_reorder():
    """A script whose best path needs a beam that was not first: beam search finds it, greedy does not, and each
    step is one call with batch = beam_size."""
    def script(window, seq):
        row = np.full(VOCAB, -30.0, np.float32)
        if not seq:
            row[[1, 2]] = [0.0, -0.1]  # greedy takes 1 ...
        elif seq == [1]:
            row[[3, 4]] = [-3.0, -3.0]  # ... and is then stuck with two bad options
        elif seq == [2]:
            row[5] = 0.0  # ... while 2 leads on with certainty
        else:
            row[TOKENS.eot] = 0.0
        return row

    opt = TranscriptionOptions(beam_size=3, temperature=0)
    model = FakeModel(script)
    rules = no_timestamps_rules()
    best = S.decode_window(model, FakeWindow(0), [TOKENS.sot], 1, rules, opt, 0.0, np.random.default_rng(0))
    assert best.tokens == [2, 5]
    assert set(model.step_batches) == {3}
    greedy = S.decode_window(FakeModel(script), FakeWindow(0), [TOKENS.sot], 1, rules,
                             TranscriptionOptions(beam_size=1), 0.0, np.random.default_rng(0))
    assert greedy.tokens[0] == 1


@pytest.mark.parametrize("ties", [False, True])
def test_search_equals_the_plain_search(monkeypatch, ties):
    """The batched step (rules over the batch, one exp pass, candidates by index) gives the same candidates, sum
    log-probs (bit for bit), stop reasons and results as the row-by-row loops, greedy, beams 2 and 5 with
    patience, best-of sampling (the same draws), with and without timestamps, on random logits; `ties`: logits
    of few distinct values, so that equal scores are frequent (equal candidates keep the order beam, then rank
    in the beam's top-k as top_logprobs returns it)."""
    import search_reference

    def script(window, seq):
        rng = np.random.default_rng(hash(tuple(seq)) % 2**32)
        row = random_rows(rng, 1, VOCAB, TS, ties)[0]
        row[TOKENS.eot] += len(seq) / 3  # sequences end at different lengths
        return row

    audio = np.random.default_rng(0).standard_normal(SR * 4).astype(np.float32)
    configs = [dict(beam_size=1), dict(beam_size=5), dict(beam_size=2, patience=2.0, length_penalty=0.5),
               dict(beam_size=5, without_timestamps=True), dict(beam_size=1, without_timestamps=True),
               dict(beam_size=1, best_of=3, log_prob_threshold=0.0, temperature=(0.0, 0.5, 1.0), seed=3)]
    for c in configs:
        def run():
            transcribe_all(audio, FakeModel(script), sample_len=24, no_speech_threshold=None, **c)

        batched, plain = search_reference.batched_and_plain(monkeypatch, run)
        assert len(batched) >= 2 and batched == plain, c


def test_fallback_triggers_on_a_repetitive_window():
    """Greedy decoding of this window loops on one word (compression ratio far above 2.4); the fallback must
    decode it again at the next temperature, where sampling breaks the loop, and return that result."""
    def script(window, seq):
        row = np.full(VOCAB, -30.0, np.float32)
        row[:50] = 1.9
        row[7] = 2.0  # argmax: "w7 w7 w7 ..."
        if len(seq) >= 60:
            row[TOKENS.eot] = 40.0
        return row

    opt = TranscriptionOptions(beam_size=1, best_of=3, without_timestamps=True, log_prob_threshold=None)
    model = FakeModel(script)
    at_zero = S.decode_window(model, FakeWindow(0), [TOKENS.sot], 1, no_timestamps_rules(), opt, 0.0,
                              np.random.default_rng(0))
    assert at_zero.tokens == [7] * 60 and at_zero.compression_ratio > 2.4
    result = S.decode_with_fallback(FakeModel(script), FakeWindow(0), [TOKENS.sot], 1, no_timestamps_rules(), opt,
                                    np.random.default_rng(0))
    assert result.attempts >= 2 and result.temperature == pytest.approx(opt.temperature[result.attempts - 1])
    assert result.temperature > 0 and result.compression_ratio <= 2.4
    assert len(set(result.tokens)) > 10  # sampled text, not the loop
    # Without a schedule there is nothing to fall back to: the loop is returned as decoded.
    single = S.decode_with_fallback(FakeModel(script), FakeWindow(0), [TOKENS.sot], 1, no_timestamps_rules(),
                                    TranscriptionOptions(beam_size=1, temperature=0), np.random.default_rng(0))
    assert single.attempts == 1 and single.tokens == [7] * 60


def test_no_speech_window_is_skipped_without_fallback():
    def script(window, seq):
        row = np.full(VOCAB, -3.0, np.float32)  # every token unlikely: avg log-prob far below -1
        if len(seq) >= 3:
            row[TOKENS.eot] = -2.9
        return row

    model = FakeModel(script)
    model.no_speech_logit = 30.0  # P(no speech) ~ 1
    audio = np.random.default_rng(0).standard_normal(SR * 5).astype(np.float32) * 0.1
    segments, info = transcribe(audio, model, beam_size=1, without_timestamps=True)
    assert list(segments) == [] and info.timings["fallbacks"] == 0 and model.windows == [0]


# ---- long form ---------------------------------------------------------------------------------------------------


def scripted_speech(duration, seed=0):
    """Words (token id, start, end) every ~0.5 s in groups of three (a "sentence"), on the 20 ms timestamp grid."""
    words, t, tok = [], 0.4, 0
    rng = np.random.default_rng(seed)
    while t + 1.6 < duration:
        for _ in range(3):
            words.append((tok, round(t, 2), round(t + 0.4, 2)))
            tok, t = tok + 1, t + 0.5
        t += 0.2 + 0.02 * int(rng.integers(0, 10))
    return [(w, round(s / 0.02) * 0.02, round(e / 0.02) * 0.02) for w, s, e in words]


def window_script(words, content_s):
    """What a perfect Whisper would emit for the window at `seek`: <start> w w w <end> per sentence that starts in
    the window; a sentence running past the window's end is emitted unfinished (no closing timestamp)."""
    def tokens_for(window):
        t0 = window.seek / F.FRAMES_PER_SECOND
        t1 = min(t0 + 30.0, content_s)
        out = []
        sentences = [words[i:i + 3] for i in range(0, len(words), 3)]
        for sent in sentences:
            start, end = sent[0][1], sent[-1][2]
            if start < t0 - 1e-9 or start >= t1:
                continue
            out.append(TS + round((start - t0) / 0.02))
            out += [w for w, s, e in sent if e <= t1 + 1e-9]
            if end > t1 + 1e-9:
                return out  # unfinished: speech runs on past the window
            out.append(TS + round((end - t0) / 0.02))
        return out

    def script(window, seq):
        row = np.zeros(VOCAB, np.float32)
        target = tokens_for(window)
        nxt = target[len(seq)] if len(seq) < len(target) else TOKENS.eot
        row[nxt] = 20.0
        return row

    return script


def test_long_clip_cut_by_the_token_limit_loses_no_words():
    """70 s of "speech" whose windows are cut by a 16-token limit mid-sentence: every word must come out exactly
    once, in order, and every window must start where the previous one's last complete segment ended (OpenAI's
    seek), never 30 s later."""
    duration = 70.0
    audio = np.random.default_rng(1).standard_normal(int(SR * duration)).astype(np.float32) * 0.1
    words = scripted_speech(duration)
    full = F.log_mel_spectrogram(audio)
    model = FakeModel(window_script(words, duration), full_mel=full)
    result = transcribe_all(audio, model, beam_size=5, sample_len=16, condition_on_previous_text=True)
    got = [int(w[1:]) for w in result.text.split()]
    assert got == [w for w, _, _ in words]
    assert len(model.windows) > 6  # the limit cut many windows (70 s would be 3 windows otherwise)
    # Each window starts at the end of the previous window's last complete segment.
    ends = {round(s.end * F.FRAMES_PER_SECOND) for s in result.segments}
    assert all(seek in ends for seek in model.windows[1:]), (model.windows, sorted(ends))
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and all(0 <= s.start < s.end <= duration for s in result.segments)


def test_long_clip_without_cuts_takes_whole_windows_when_sentences_end():
    duration = 65.0
    audio = np.random.default_rng(2).standard_normal(int(SR * duration)).astype(np.float32) * 0.1
    words = scripted_speech(duration, seed=3)
    model = FakeModel(window_script(words, duration), full_mel=F.log_mel_spectrogram(audio))
    result = transcribe_all(audio, model, beam_size=1)
    assert [int(w[1:]) for w in result.text.split()] == [w for w, _, _ in words]
    assert len(model.windows) <= 4


def test_prompt_holds_only_committed_text():
    """The unfinished segment of a window is not in the next window's prompt (it is decoded again there)."""
    duration = 40.0
    audio = np.random.default_rng(4).standard_normal(int(SR * duration)).astype(np.float32) * 0.1
    words = scripted_speech(duration, seed=5)
    base = window_script(words, duration)
    prompts = []

    class Recording(FakeModel):
        def start(self, window, prompt, rows=None):
            prompts.append((window.seek, list(prompt)))
            return super().start(window, prompt, rows)

    model = Recording(base, full_mel=F.log_mel_spectrogram(audio))
    result = transcribe_all(audio, model, beam_size=1, sample_len=12)
    committed = [t for s in result.segments for t in s.tokens]
    for seek, prompt in prompts[1:]:
        assert prompt[0] == TOKENS.sot_prev
        previous = prompt[1:prompt.index(TOKENS.sot)]
        assert previous == committed[:len(previous)]  # a prefix of what was committed, nothing decoded later
        text_in_prompt = [t for t in previous if t < N_TEXT]
        seek_s = seek / F.FRAMES_PER_SECOND
        assert all(next(s for w, s, e in words if w == t) < seek_s for t in text_in_prompt)


def test_digital_silence_is_skipped_but_quiet_audio_is_decoded():
    calls = []

    def script(window, seq):
        calls.append(window.seek)
        row = np.zeros(VOCAB, np.float32)
        row[TOKENS.eot if seq else 3] = 20.0
        return row

    quiet = np.random.default_rng(0).standard_normal(SR * 40).astype(np.float32) * 1e-3  # about -60 dBFS
    quiet[: SR * 30 + 400] = 0.0  # the first window (and the STFT frames at its edge) is digital silence
    model = FakeModel(script, full_mel=F.log_mel_spectrogram(quiet))
    result = transcribe_all(quiet, model, beam_size=1, without_timestamps=True)
    assert model.windows == [3000] and result.text == "w3"


def test_initial_prompt_prefix_and_hotwords_reach_the_prompt():
    prompts = []

    def script(window, seq):
        row = np.zeros(VOCAB, np.float32)
        row[TOKENS.eot if len(seq) >= 4 else 9] = 20.0
        return row

    class Recording(FakeModel):
        def start(self, window, prompt, rows=None):
            prompts.append(list(prompt))
            return super().start(window, prompt, rows)

    audio = np.random.default_rng(6).standard_normal(SR * 3).astype(np.float32) * 0.1
    result = transcribe_all(audio, Recording(script), beam_size=2, without_timestamps=True,
                            initial_prompt="w11 w12", prefix="w5 w6")
    # prefix: the window's transcript starts with it; hotwords are dropped when a prefix is given (faster-whisper)
    assert prompts[0] == [TOKENS.sot_prev, 11, 12, TOKENS.sot, TOKENS.no_timestamps, 5, 6]
    assert result.text.split()[:2] == ["w5", "w6"]
    prompts.clear()
    transcribe_all(audio, Recording(script), beam_size=1, without_timestamps=True, hotwords="w20")
    assert prompts[0] == [TOKENS.sot_prev, 20, TOKENS.sot, TOKENS.no_timestamps]
