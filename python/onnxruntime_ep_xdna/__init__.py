"""ONNX Runtime plugin execution provider for the AMD Phoenix NPU (XDNA / npu1).

    import onnxruntime as ort, onnxruntime_ep_xdna as xdna
    xdna.register()
    sess = ort.InferenceSession("model.onnx", providers=["XDNAExecutionProvider", "CPUExecutionProvider"])

Importing this package registers nothing; `register()` does (idempotent).
"""

from __future__ import annotations

from importlib import metadata as _metadata
from pathlib import Path

from ._compile import compile_model
from ._placement import PartitionReport, Placement, partition, placement, session_options

__version__ = _metadata.version("onnxruntime-ep-xdna")  # pyproject.toml: the one version
EP_NAME = "XDNAExecutionProvider"
_LIBRARY = "libonnxruntime_ep_xdna.so"

__all__ = [
    "EP_NAME",
    "PartitionReport",
    "Placement",
    "compile_model",
    "get_ep_name",
    "get_ep_names",
    "get_library_path",
    "partition",
    "placement",
    "register",
    "session_options",
]


def get_library_path() -> str:
    """Path of the plugin library to hand to `onnxruntime.register_execution_provider_library`."""
    path = Path(__file__).with_name(_LIBRARY)
    if not path.is_file():
        raise FileNotFoundError(f"{_LIBRARY} is missing from {path.parent}: the package was not built/installed fully")
    return str(path)


def get_ep_name() -> str:
    return EP_NAME


def get_ep_names() -> list[str]:
    return [EP_NAME]


def register() -> str:
    """Registers the plugin with ONNX Runtime once per process; returns the EP name.

    Afterwards `EP_NAME` is in `onnxruntime.get_available_providers()` and can be used in `providers=[...]`
    (also by optimum's `provider=` argument).
    """
    import onnxruntime as ort

    if EP_NAME not in ort.get_available_providers():
        ort.register_execution_provider_library(EP_NAME, get_library_path())
    return EP_NAME
