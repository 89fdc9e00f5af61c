"""The in-process A/B of one decoder_with_past step that the *_ab.py scripts run: two
variants of the optimised decoder copy, timed in turns in one process so that background load hits both alike.

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.
"""

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import machine_line  # noqa: E402
from whisper import build_clips  # noqa: E402
from whisper_profile import step_feed  # noqa: E402

import onnxruntime_ep_xdna as xdna  # noqa: E402
from onnxruntime_ep_xdna._precision import DEFAULT as DEFAULT_PRECISION  # noqa: E402
from onnxruntime_ep_xdna.whisper import ensure_model, features, load_model, onnx_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    """The A/B's options; `extra(parser)` may add a script's own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default=DEFAULT_PRECISION)
    parser.add_argument("--steps", type=int, default=400, help="steps per session and row count")
    parser.add_argument("--past", type=int, default=128, help="cached tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 5], help="rows (beams)")
    if extra:
        extra(parser)
    return parser.parse_args()


def raw_bytes(v: ort.OrtValue) -> bytes:
    """A bfloat16 OrtValue's bytes."""
    return ctypes.string_at(v.data_ptr(), 2 * int(np.prod(v.shape())))


def with_graph_outputs(m: onnx.ModelProto, values: list[str], out: Path, what: str) -> Path:
    """`m` saved at `out` with the float32 `values` also graph outputs: each then has a reader outside the EP, so the
    claim leaves the node that makes it on the CPU EP (an A/B's "before" plan)."""
    m.graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in values)
    onnx.save(m, str(out), save_as_external_data=True, location=out.name + ".data")
    print(f"{out.name}: {len(values)} {what} also graph outputs")
    return out


def placement_line(placed, ops: tuple[str, ...]) -> str:
    """Where a session's nodes went, with how many of each of `ops` the EP's fused nodes hold."""
    on_ep = [op for _, op in placed.on(xdna.EP_NAME)]
    counts = ", ".join(f"{on_ep.count(op)} {op}" for op in ops)
    return (f"{len(placed.on('CPUExecutionProvider'))} nodes on the CPU EP, {len(on_ep)} in the EP's fused nodes "
            f"({counts})")


def run(args: argparse.Namespace, variant, names: tuple[str, str], counted_ops: tuple[str, ...],
        same_outputs: bool = False) -> None:
    """`variant(path, out_dir)` writes the "before" copy of the optimised decoder_with_past at `path` and returns its
    path (with_graph_outputs); names = (before, after) as printed; `counted_ops`: the ops placement_line counts in
    the EP's nodes, printed per session; `same_outputs`: assert that both give the same outputs (a change of
    addressing only)."""
    ort.set_default_logger_severity(3)
    print(machine_line())
    print("no NPU here: the XDNA EP runs the CPU emulator of the NPU kernel contract (CPU figures)")
    w = load_model(ensure_model("base"), provider="xdna", precision=args.precision)
    if not w.optimised_paths:
        sys.exit("the optimised decoder copies are off (XDNA_OPTIMISED_DECODERS=0): nothing to compare")
    clips, _ = build_clips(fetch_speech_samples(), include_long=False)
    audio = next(iter(clips.values()))[0]
    mel = features.from_array(audio, w.n_mels, w.mel_filters)
    window = w.encode(mel.window(0, min(N_FRAMES, mel.content_frames)))
    w.start(window, [w.tokens.sot])
    path = w.optimised_paths[onnx_model.FILES[2]]
    before, after = names
    sessions = {before: variant(path, Path(tempfile.mkdtemp())), after: path}
    sessions = {k: ort.InferenceSession(str(p), xdna.session_options(), providers=w._providers)
                for k, p in sessions.items()}
    for name, s in sessions.items():
        print(f"{name}: {placement_line(xdna.placement(s), counted_ops)}")
    print(f"\ndecoder_with_past step, past {args.past} tokens, precision {args.precision}, {args.steps} steps each "
          f"in turns (ms; {before} -> {after})\n")
    print("| rows | median | 25th percentile | min | median of per-pair differences |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        feed = step_feed(w, window, batch, args.past)
        times = {k: [] for k in sessions}
        outs = {}
        for k, s in sessions.items():
            for _ in range(10):
                outs[k] = s.run_with_ort_values(w._past_outputs, feed)
        if same_outputs:
            for a, b in zip(outs[before], outs[after]):
                assert a.data_type() == b.data_type() and a.shape() == b.shape(), "the two plans differ"
                if a.data_type() == "tensor(float)":
                    assert np.array_equal(a.numpy(), b.numpy(), equal_nan=True), "the two plans differ"
                elif a.data_type() == "tensor(bfloat16)":  # numpy has no bfloat16: the bits
                    assert raw_bytes(a) == raw_bytes(b), "the two plans differ"
        for _ in range(args.steps):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run_with_ort_values(w._past_outputs, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        u, f = np.array(times[before]), np.array(times[after])
        print(f"| {batch} | {np.median(u):.3f} -> {np.median(f):.3f} | {np.percentile(u, 25):.3f} -> "
              f"{np.percentile(f, 25):.3f} | {u.min():.3f} -> {f.min():.3f} | {statistics.median(u - f):.3f} |",
              flush=True)
