"""`xdna` command: info, partition, compile, transcribe, batch, model, serve."""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys


def _versions() -> list[tuple[str, str]]:
    from importlib import metadata

    rows = [("python", platform.python_version()), ("linux kernel", platform.release())]
    for dist in ("onnxruntime-ep-xdna", "onnxruntime", "onnx", "numpy"):
        try:
            rows.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            rows.append((dist, "not installed"))
    return rows


def _npu_facts() -> list[tuple[str, str]]:
    """What the machine shows of an NPU, independent of XRT (so the reason for 'no NPU' is visible)."""
    accel = sorted(glob.glob("/dev/accel/accel*"))
    rows = [("/dev/accel", ", ".join(accel) if accel else "none (no NPU driver loaded: amdxdna needs Linux >= 6.14)")]
    for dev in sorted(glob.glob("/sys/class/accel/accel*")):
        def read(name: str) -> str:
            try:
                with open(os.path.join(dev, "device", name)) as f:
                    return f.read().strip()
            except OSError:
                return "?"

        driver = os.path.basename(os.path.realpath(os.path.join(dev, "device", "driver")))
        rows.append((os.path.basename(dev), f"vendor {read('vendor')} device {read('device')} driver {driver}"))
    return rows


def cmd_info(args) -> int:
    import onnxruntime as ort

    from . import EP_NAME, _native, get_library_path, register

    for k, v in _versions():
        print(f"{k:18} {v}")
    print(f"{'EP library':18} {get_library_path()}")
    register()
    print(f"{'registered':18} {EP_NAME in ort.get_available_providers()}")
    for dev in ort.get_ep_devices():
        if dev.ep_name != EP_NAME:
            continue
        meta = dict(dev.ep_metadata)
        print(f"{'ORT device':18} {dev.device.type} vendor_id=0x{dev.device.vendor_id:04x}")
        print(f"{'backend (auto)':18} {meta.get('backend', '?')}: {meta.get('backend_device', '')}")
        print(f"{'why':18} {meta.get('backend_reason', '')}")
    for k, v in _npu_facts():
        print(f"{k:18} {v}")
    print("NPU path, piece by piece:")
    probe = _native.xrt_probe(args.kernel_dir or "", os.path.dirname(get_library_path()))
    for line in probe["summary"].splitlines():
        print(f"  {line}")
    if not probe["ready"]:
        print("NPU: not used. Every GEMM runs on the emulator (the NPU kernel contract computed on the CPU).")
    return 0


def cmd_partition(args) -> int:
    import onnxruntime as ort

    from . import partition

    opts = {}
    for kv in args.option or []:
        key, _, value = kv.partition("=")
        opts[key] = value
    dims = {}
    for kv in args.dim or []:
        key, _, value = kv.partition("=")
        dims[key] = int(value)
    if args.precision:
        from ._precision import provider_options

        try:
            opts.update(provider_options(args.precision))
        except ValueError as e:
            print(f"xdna partition: error: --precision: {e}", file=sys.stderr)
            return 1
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if args.no_optimize else None
    report = partition(args.model, opts, level, run=args.run or bool(dims) or args.npu_model, dims=dims)
    print(report.table())
    if args.npu_model:
        from ._npu_model import table

        params = {}
        for kv in args.npu_param or []:
            key, _, value = kv.partition("=")
            params[key] = float(value)
        print()
        print(table(report, params, precision=args.npu_precision))
    return 0


def cmd_model_fetch(args) -> int:
    from .whisper.model import ensure_model

    path = ensure_model(args.name, cache_dir=args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def _needs_whisper_extra(command: str, error: ImportError):
    """Stand-ins for a subcommand whose extra is not installed (a broken install): every flag is still taken, the
    run says what is missing and exits as the main path does."""
    missing = str(error)

    def add_arguments(parser) -> None:
        parser.set_defaults(accepts_anything=True)  # main() lets every flag through to the message

    def run(args) -> int:
        print(f"xdna {command}: error: needs the whisper extra: pip install 'onnxruntime-ep-xdna[whisper]' "
              f"({missing})", file=sys.stderr)
        return 1

    return add_arguments, run

def cmd_compile(args) -> int:
    from ._compile import clear_cache, compile_model, compiled_cache_root

    if args.clear_cache:
        entries, size = clear_cache(args.cache_dir)
        root = compiled_cache_root(args.cache_dir)
        print(f"removed {entries} cache entr{'y' if entries == 1 else 'ies'} (compiled models, optimised decoder "
              f"copies, word-timing decoders), {size / 1e6:.1f} MB, from {root}, {root.parent / 'optimised'} and "
              f"{root.parent / 'attention'}")
        if not args.model:
            return 0
    if not args.model or not args.output:
        print("xdna compile: MODEL and -o OUT are needed (or --clear-cache alone)", file=sys.stderr)
        return 2
    options = {}
    for kv in args.option or []:
        key, _, value = kv.partition("=")
        options[key] = value
    if args.precision:
        from ._precision import provider_options

        try:
            options.update(provider_options(args.precision))
        except ValueError as e:
            print(f"xdna compile: error: --precision: {e}", file=sys.stderr)
            return 2
    import time

    t0 = time.perf_counter()
    out = compile_model(args.model, args.output, embed=args.embed, options=options)
    files = [out] + sorted(out.parent.glob(out.stem + "_*.xdnactx"))
    size = sum(f.stat().st_size for f in files)
    print(f"{out}: compiled for the XDNA EP in {time.perf_counter() - t0:.1f} s "
          f"({len(files)} file(s), {size / 1e6:.1f} MB{', payload embedded' if args.embed else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdna", description="XDNA (AMD Phoenix NPU) execution provider for ONNX Runtime")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, backend, device, and why there is no NPU if there is none")
    info.add_argument("--kernel-dir", help="NPU kernel manifest directory (default: $XDNA_KERNEL_DIR or the cache)")
    info.set_defaults(func=cmd_info)

    part = sub.add_parser("partition", help="which MatMul/Gemm/Conv nodes of a model go to the EP, FLOP share, and why not")
    part.add_argument("model")
    part.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="provider option (repeatable)")
    part.add_argument("--precision", metavar="POLICY",
                      help="precision policy as in xdna transcribe: bf16, int8, bf16x3, mixed, mixed-conv or rules "
                           "(same as -o precision=... / -o precision_policy=...); the table shows each node's")
    part.add_argument("--no-optimize", action="store_true", help="disable ORT graph optimizations (ORT_DISABLE_ALL)")
    part.add_argument("--run", action="store_true", help="run once on dummy inputs: FLOPs of EP nodes as executed")
    part.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a symbolic input dim (implies --run)")
    part.add_argument("--npu-model", action="store_true",
                      help="modelled Phoenix NPU time per claimed node (dispatch, host, DMA, compute) vs the CPU, with "
                           "the model's assumptions (a model, not a measurement; implies --run)")
    part.add_argument("--npu-param", action="append", metavar="NAME=VALUE",
                      help="override a model parameter, e.g. aie_ghz=1.6, submit_us=50, ddr_gbps=32 (repeatable)")
    part.add_argument("--npu-precision", choices=("bf16", "int8"), default="bf16",
                      help="with --npu-model: model constant-weight GEMMs on the int8 kernels (attention stays bf16)")
    part.set_defaults(func=cmd_partition)

    comp = sub.add_parser("compile", help="compile a model for the EP (EPContext model: sessions start from the packed "
                                          "weights); --clear-cache empties the Whisper layer's compiled-model cache")
    comp.add_argument("model", nargs="?", help="ONNX model")
    comp.add_argument("-o", "--output", help="the compiled model (side files *.xdnactx are written next to it)")
    comp.add_argument("--embed", action="store_true", help="put the payload inside the model (one file)")
    comp.add_argument("--option", action="append", metavar="KEY=VALUE",
                      help="provider option, e.g. backend=emulator (repeatable)")
    comp.add_argument("--precision", metavar="POLICY",
                      help="precision policy as in xdna transcribe (bf16, int8, bf16x3, mixed, mixed-conv or rules); "
                           "the compiled model loads only in sessions with the same policy")
    comp.add_argument("--clear-cache", action="store_true",
                      help="remove the compiled models, optimised decoder copies and word-timing decoders the "
                           "Whisper layer cached (under $XDNA_CACHE_DIR/compiled, /optimised and /attention)")
    comp.add_argument("--cache-dir", help="the cache to clear (default: $XDNA_CACHE_DIR or ~/.cache/onnxruntime-ep-xdna)")
    comp.set_defaults(func=cmd_compile)

    model = sub.add_parser("model", help="Whisper model management")
    msub = model.add_subparsers(dest="model_command", required=True)
    fetch = msub.add_parser("fetch", help="download, convert and export a Whisper model into the cache")
    fetch.add_argument("name", nargs="?", default="base", help="base | tiny.en")
    fetch.add_argument("--cache-dir")
    fetch.set_defaults(func=cmd_model_fetch)

    try:
        from .whisper.cli import add_transcribe_arguments, run_transcribe
    except ImportError as e:
        add_transcribe_arguments, run_transcribe = _needs_whisper_extra("transcribe", e)

    tr = sub.add_parser("transcribe", help="transcribe audio files with Whisper on the EP")
    add_transcribe_arguments(tr)
    tr.set_defaults(func=run_transcribe)

    from .server.cli import add_serve_arguments, run_serve

    serve = sub.add_parser("serve", help="OpenAI-compatible transcription server with a local web page "
                                         "(needs the server extra)")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)

    try:
        from .batch.cli import add_batch_arguments, run_batch_command
    except ImportError as e:
        add_batch_arguments, run_batch_command = _needs_whisper_extra("batch", e)

    ba = sub.add_parser("batch", help="transcribe many files (directories, list files) into a directory, resumable; "
                                      "on this machine or a Ray cluster")
    add_batch_arguments(ba)
    ba.set_defaults(func=run_batch_command)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_anything", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a one-line message, not a traceback, for anything we did not foresee
        if os.environ.get("XDNA_DEBUG"):
            raise
        print(f"xdna {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
