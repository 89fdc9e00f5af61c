"""`xdna batch INPUT... -o OUT_DIR`: the command line over run_batch.

Decoding options are those of `xdna transcribe`, taken from its own parser (so the two never drift apart).
Exit status: 0 = every input done (now or in an earlier run), 1 = the batch could not run (model, provider,
options, no worker; nothing not done is lost: re-run), 2 = at least one input failed (see index.jsonl; the others
were done), 130 = interrupted (re-run to resume).
XDNA_BATCH_TEST_HOLD (tests only) is WorkerConfig.test_hold: a worker waits on a given input so a test can kill it.
"""

from __future__ import annotations

import argparse
import sys

from ..whisper.cli import add_transcribe_arguments, options_from_args
from ..whisper.formats import FORMATS

_DECODING_GROUP = "decoding"


def _transcribe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_transcribe_arguments(p)
    return p


def _formats(text: str) -> tuple[str, ...]:
    out = []
    for f in text.split(","):
        f = f.strip().lower()
        if f == "all":
            out += FORMATS
        elif f in FORMATS:
            out.append(f)
        elif f:
            raise argparse.ArgumentTypeError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}, all")
    if not out:
        raise argparse.ArgumentTypeError("no format given")
    return tuple(out)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="audio files, directories (searched recursively for audio files) or list files "
                             "(.txt/.lst/.list: one path per line, relative to the list file)")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR",
                        help="outputs mirror the inputs' relative paths here, with index.jsonl")
    parser.add_argument("--list", action="append", default=[], metavar="FILE", help="a list file of inputs (repeatable)")
    parser.add_argument("--format", type=_formats, default=("txt",), metavar="FMT[,FMT...]",
                        help=f"output formats, comma-separated: {', '.join(FORMATS)} or all (default txt)")
    parser.add_argument("--model", default="base", help="base | tiny.en | DIR with an optimum ONNX export (default base)")
    parser.add_argument("--provider", choices=("xdna", "cpu"), default="xdna", help="XDNA EP (default) or CPU EP only")
    try:
        from ..whisper.cli import add_precision_argument

        add_precision_argument(parser)
    except ImportError:
        pass
    parser.add_argument("--language", help="language code; detected per file if absent")
    parser.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    parser.add_argument("--force", action="store_true", help="redo inputs whose outputs are already complete")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this machine (default); ray: a Ray cluster (pip install 'onnxruntime-ep-xdna[ray]')")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="local: N worker processes (default 1 = in this process); ray: N actors (default: one "
                             "per machine with the NPU resource, else cluster CPUs / --cpus-per-worker)")
    parser.add_argument("--threads-per-worker", type=int, metavar="T",
                        help="ORT + EP threads per worker (default: all cores with one worker, cores / N with N "
                             "local workers, --cpus-per-worker on Ray CPU actors)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="Ray cluster to join (e.g. head:6379 or ray://head:10001; default $RAY_ADDRESS, else a "
                             "Ray instance started on this machine for the batch)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                        help="ray without NPU machines: CPUs each actor reserves (default 1)")
    parser.add_argument("--npu-resource", default="xdna_npu", metavar="NAME",
                        help="Ray custom resource that marks an NPU machine (default xdna_npu)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times an input is retried after its worker died (default 2); then it is failed")
    parser.add_argument("--worker-start-timeout", type=float, default=600.0, metavar="S",
                        help="give up a worker that has not loaded the model after S seconds (default 600)")
    parser.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    decoding = parser.add_argument_group("decoding (as xdna transcribe)")
    for group in _transcribe_parser()._action_groups:
        if group.title and group.title.startswith(_DECODING_GROUP):
            for action in group._group_actions:
                decoding._add_action(action)


def run_batch_command(args) -> int:
    from . import BatchInputError, run_batch
    from ..whisper.options import OptionsError

    def err(msg: str) -> None:
        print(f"xdna batch: error: {msg}", file=sys.stderr)

    if not args.inputs and not args.list:
        err("no INPUT given (files, directories or list files)")
        return 1
    if args.workers is not None and args.workers < 1:
        err("--workers must be >= 1")
        return 1
    if args.threads_per_worker is not None and args.threads_per_worker < 0:
        err("--threads-per-worker must be >= 0")
        return 1
    if args.cpus_per_worker <= 0 or args.retries < 0 or args.worker_start_timeout <= 0:
        err("--cpus-per-worker and --worker-start-timeout must be > 0, --retries >= 0")
        return 1
    # Defaults of every transcribe flag (including ones added to it later), then ours on top.
    merged = _transcribe_parser().parse_args([])
    for k, v in vars(args).items():
        setattr(merged, k, v)
    try:
        options = options_from_args(merged)
    except OptionsError as e:
        err(str(e))
        return 1
    import os

    try:
        summary = run_batch(args.inputs, args.output_dir, model=args.model, provider=args.provider, options=options,
                            formats=args.format, engine=args.engine, workers=args.workers,
                            threads=args.threads_per_worker, force=args.force, retries=args.retries, lists=args.list,
                            ray_address=args.ray_address, cpus_per_worker=args.cpus_per_worker,
                            npu_resource=args.npu_resource, start_timeout=args.worker_start_timeout,
                            progress=args.progress or sys.stderr.isatty(),
                            test_hold=os.environ.get("XDNA_BATCH_TEST_HOLD"), precision=getattr(args, "precision", None))
    except BatchInputError as e:
        err(str(e))
        return 1
    except OSError as e:
        err(f"{e.filename or args.output_dir}: {e.strerror or e}")
        return 1
    s = summary
    rate = f", {s.audio_s / s.wall_s:.1f}x real time" if s.wall_s > 0 and s.audio_s > 0 else ""
    print(f"xdna batch: {s.total} inputs: {s.done} done, {s.skipped} already complete, {s.failed} failed, "
          f"{s.pending} pending; {s.audio_s / 3600:.3f} h of audio in {s.wall_s:.1f} s{rate}"
          f"{f'; {s.retries} retried after a worker died' if s.retries else ''}; index: "
          f"{os.path.join(args.output_dir, 'index.jsonl')}", file=sys.stderr)
    if s.message:
        err(s.message + ("; re-run the same command to resume" if s.pending else ""))
    return s.exit_code
