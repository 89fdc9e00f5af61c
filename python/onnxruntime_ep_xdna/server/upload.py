"""multipart/form-data read as it arrives: text fields into memory (small), the `file` part into a temporary file
of the server's own (its name never comes from the request), with the size limit enforced while streaming."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

MAX_FIELD_BYTES = 64 * 1024  # a prompt is at most a few hundred tokens
MAX_FIELDS = 32


class UploadError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    file_path: str | None = None  # the temporary file (delete with cleanup())
    file_size: int = 0
    file_name: str | None = None  # as the client sent it: for messages only, never used as a path
    file_type: str | None = None
    head: bytes = b""  # first bytes of the file (format sniffing)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def cleanup(self) -> None:
        if self.file_path:
            try:
                os.unlink(self.file_path)
            except FileNotFoundError:
                pass
            self.file_path = None


def _disposition(value: bytes) -> dict[str, str]:
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(value)
    return {k.decode("latin-1").lower(): v.decode("utf-8", "replace") for k, v in params.items()}


async def read_form(request, max_bytes: int, tmp_dir: str) -> Form:
    """Parses the request body; raises UploadError (400/413/415). The caller must call form.cleanup()."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UploadError(415, f"the request must be multipart/form-data (not {ctype.decode('latin-1') or 'empty'}) "
                          "with the audio in a field named 'file'", code="unsupported_media_type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary", code="invalid_multipart")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + 64 * 1024:
        raise UploadError(413, f"the upload is {int(length) / 2**20:.1f} MB; this server takes at most "
                          f"{max_bytes / 2**20:g} MB (--max-upload-mb)", param="file", code="file_too_large")

    form = Form()
    state = {"headers": {}, "hname": b"", "hvalue": b"", "name": None, "buf": None, "out": None, "error": None}

    def on_part_begin():
        state["headers"], state["name"], state["buf"], state["out"] = {}, None, None, None

    def on_header_field(data, start, end):
        state["hname"] += data[start:end]

    def on_header_value(data, start, end):
        state["hvalue"] += data[start:end]

    def on_header_end():
        state["headers"][state["hname"].lower()] = state["hvalue"]
        state["hname"], state["hvalue"] = b"", b""

    def on_headers_finished():
        disp = _disposition(state["headers"].get(b"content-disposition", b""))
        name = disp.get("name")
        if name is None:
            raise UploadError(400, "a multipart part without a field name", code="invalid_multipart")
        state["name"] = name
        if "filename" in disp or name == "file":
            if name != "file":
                raise UploadError(400, f"unexpected file field {name!r}: send the audio as 'file'", param=name,
                                  code="unknown_parameter")
            if form.file_path is not None:
                raise UploadError(400, "more than one 'file' part", param="file", code="invalid_multipart")
            fd, path = tempfile.mkstemp(prefix="upload-", dir=tmp_dir)
            form.file_path = path
            form.file_name = disp.get("filename")
            form.file_type = state["headers"].get(b"content-type", b"").decode("latin-1") or None
            state["out"] = os.fdopen(fd, "wb")
        else:
            if sum(len(v) for v in form.fields.values()) >= MAX_FIELDS:
                raise UploadError(400, f"more than {MAX_FIELDS} form fields", code="invalid_multipart")
            state["buf"] = bytearray()

    def on_part_data(data, start, end):
        chunk = data[start:end]
        if state["out"] is not None:
            form.file_size += len(chunk)
            if form.file_size > max_bytes:
                raise UploadError(413, f"the file is larger than this server's limit of {max_bytes / 2**20:g} MB "
                                  "(--max-upload-mb)", param="file", code="file_too_large")
            if len(form.head) < 64:
                form.head += chunk[: 64 - len(form.head)]
            state["out"].write(chunk)
        elif state["buf"] is not None:
            state["buf"] += chunk
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise UploadError(400, f"field {state['name']!r} is longer than {MAX_FIELD_BYTES} bytes",
                                  param=state["name"], code="invalid_value")

    def on_part_end():
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
        elif state["buf"] is not None:
            try:
                value = bytes(state["buf"]).decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(400, f"field {state['name']!r} is not UTF-8 text", param=state["name"],
                                  code="invalid_value") from None
            form.fields.setdefault(state["name"], []).append(value)
            state["buf"] = None

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
                 "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished}
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        _close(state)
        form.cleanup()
        raise
    except Exception as e:  # python-multipart's parse errors, a client that went away mid-upload
        _close(state)
        form.cleanup()
        from starlette.requests import ClientDisconnect

        if isinstance(e, ClientDisconnect):
            raise
        raise UploadError(400, f"malformed multipart/form-data body ({e})", code="invalid_multipart") from None
    except BaseException:  # cancelled (timeout, shutdown): still no file left behind
        _close(state)
        form.cleanup()
        raise
    if state["out"] is not None:  # the body ended inside the file part
        _close(state)
        form.cleanup()
        raise UploadError(400, "the multipart body ended before the file did (truncated upload)", param="file",
                          code="invalid_multipart")
    return form


def _close(state) -> None:
    if state["out"] is not None:
        try:
            state["out"].close()
        except OSError:
            pass
        state["out"] = None
