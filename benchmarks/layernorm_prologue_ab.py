"""LayerNormalization run as the A prologue of the projections that read it (kernels/gemm_contract.h, "A prologue";
ops/matmul.cc) against the same graph with each LN on the CPU EP, in turns in one process so that background load
hits both alike (issues 7 and 13).

Part 1: one decoder_with_past step of whisper-base (the optimised copy `xdna transcribe` runs, uncompiled) at each
batch of --batch with --past cached tokens (benchmarks/step_ab.py). Part 2: the encoder on one 30 s window
(encoder_model.onnx, uncompiled), --encoder-runs runs each in turns. In both, "LN on CPU" is the graph where each
LayerNormalization output is also a graph output (a value another reader takes: the claim leaves the LN to the CPU
EP, the previous plan). The prologue computes ORT's LN bit for bit, so both give the same outputs (asserted).

Without an NPU the XDNA EP computes on the CPU emulator of the NPU kernel contract: every figure is a CPU figure.

    python3 benchmarks/layernorm_prologue_ab.py [--precision auto] [--steps 400] [--past 128] [--batch 1 5]
        [--encoder-runs 7]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_ab  # noqa: E402

from onnxruntime_ep_xdna.whisper import features, onnx_model  # noqa: E402
from onnxruntime_ep_xdna.whisper.features import N_FRAMES  # noqa: E402


def exposed_copy(path: Path, out_dir: Path) -> Path:
    """The graph with each LayerNormalization output also a graph output."""
    m = onnx.load(str(path))
    extra = [n.output[0] for n in m.graph.node if n.op_type == "LayerNormalization"]
    return step_ab.with_graph_outputs(m, extra, out_dir / ("ln_on_cpu_" + path.name), "LayerNormalization outputs")


def encoder_ab(args) -> None:
    import onnxruntime as ort

    from onnxruntime_ep_xdna.whisper import ensure_model, load_model
    from onnxruntime_ep_xdna.whisper.evaluation import fetch_speech_samples
    from whisper import build_clips

    w = load_model(ensure_model("base"), provider="xdna", precision=args.precision)
    clips, _ = build_clips(fetch_speech_samples(), include_long=False)
    audio = next(iter(clips.values()))[0]
    mel = features.from_array(audio, w.n_mels, w.mel_filters)
    x = np.asarray(mel.window(0, min(N_FRAMES, mel.content_frames)), np.float32)
    x = x[None] if x.ndim == 2 else x
    path = w.model_dir / onnx_model.FILES[0]
    names = ("LN on CPU", "prologue")
    paths = {names[0]: exposed_copy(path, Path(tempfile.mkdtemp())), names[1]: path}
    sessions = {k: ort.InferenceSession(str(p), step_ab.xdna.session_options(), providers=w._providers)
                for k, p in paths.items()}
    for k, s in sessions.items():
        print(f"{k}: {step_ab.placement_line(step_ab.xdna.placement(s), ('LayerNormalization',))}")
    feed = {sessions[names[1]].get_inputs()[0].name: x}
    outs = {k: s.run(None, feed) for k, s in sessions.items()}
    assert np.array_equal(outs[names[0]][0], outs[names[1]][0]), "the two plans differ"
    times = {k: [] for k in sessions}
    for _ in range(args.encoder_runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    u, f = np.array(times[names[0]]), np.array(times[names[1]])
    print(f"\nencoder, one 30 s window, precision {args.precision}, {args.encoder_runs} runs each in turns (ms; "
          f"{names[0]} -> {names[1]})\n")
    print("| median | min | median of per-pair differences |")
    print("|---|---|---|")
    print(f"| {np.median(u):.1f} -> {np.median(f):.1f} | {u.min():.1f} -> {f.min():.1f} | "
          f"{statistics.median(u - f):.1f} |")


def main() -> None:
    args = step_ab.parse_args(__doc__, lambda p: p.add_argument("--encoder-runs", type=int, default=7,
                                                                 help="encoder runs each (0: no encoder part)"))
    step_ab.run(args, exposed_copy, ("LN on CPU", "prologue"), ("LayerNormalization",), same_outputs=True)
    if args.encoder_runs:
        encoder_ab(args)


if __name__ == "__main__":
    main()
