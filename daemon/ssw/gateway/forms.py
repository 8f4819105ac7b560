"""multipart/form-data bodies (the audio routes, where ``model`` is a form field):
read the text fields the gateway routes by, and write the body back with the
model's name put in place of an alias. Parsing is python-multipart's (the
parser Starlette uses); a body that is not well formed is a 400."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from ssw.errors import BadRequest

MAX_FIELD_BYTES = 4096  # a text field ssw reads (model, stream); files are never read
# It logs a warning per malformed body before raising: a client could fill the
# journal with those. The client gets the 400 with the reason instead.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass
class Part:
    headers: list[tuple[bytes, bytes]]
    data: bytes
    name: str | None = None
    filename: bool = False


@dataclass
class Form:
    boundary: bytes
    parts: list[Part] = field(default_factory=list)

    def value(self, name: str) -> str | None:
        """A text field's value; None when absent. A field sent twice is a 400: ssw would
        route by one and vLLM serve the other (it reads the last), so a key scoped to a
        base model could reach an adapter on the same worker."""
        if sum(1 for part in self.parts if part.name == name) > 1:
            raise BadRequest(f"the form field '{name}' appears more than once")
        for part in self.parts:
            if part.name == name and not part.filename:
                if len(part.data) > MAX_FIELD_BYTES:
                    raise BadRequest(f"the form field '{name}' is too long")
                try:
                    return part.data.decode()
                except UnicodeDecodeError:
                    raise BadRequest(f"the form field '{name}' is not UTF-8 text") from None
        return None

    def with_value(self, name: str, value: str) -> bytes:
        """The body again, with the text field ``name`` set to ``value``."""
        out = []
        for part in self.parts:
            data = value.encode() if part.name == name and not part.filename else part.data
            head = b"".join(k + b": " + v + b"\r\n" for k, v in part.headers)
            out.append(b"--" + self.boundary + b"\r\n" + head + b"\r\n" + data + b"\r\n")
        return b"".join(out) + b"--" + self.boundary + b"--\r\n"


def boundary_of(content_type: bytes | None) -> bytes:
    if content_type is None:
        raise BadRequest("this route takes multipart/form-data (the model is a form field)")
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
        raise BadRequest("this route takes multipart/form-data with a boundary (the model is a form field)")
    return boundary


def parse_form(raw: bytes, content_type: bytes | None) -> Form:
    form = Form(boundary_of(content_type))
    headers: list[tuple[bytes, bytes]] = []
    data: list[bytes] = []
    name, value = bytearray(), bytearray()

    def begin() -> None:
        headers.clear()
        data.clear()

    def header_field(buf: bytes, start: int, end: int) -> None:
        name.extend(buf[start:end])

    def header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def header_end() -> None:
        headers.append((bytes(name), bytes(value)))
        name.clear()
        value.clear()

    def part_data(buf: bytes, start: int, end: int) -> None:
        data.append(bytes(buf[start:end]))

    def end() -> None:
        part = Part(list(headers), b"".join(data))
        for key, val in part.headers:
            if key.lower() == b"content-disposition":
                _, params = parse_options_header(val)
                part.name = params[b"name"].decode("utf-8", "replace") if b"name" in params else None
                part.filename = b"filename" in params
        form.parts.append(part)

    parser = MultipartParser(
        form.boundary,
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": part_data,
            "on_part_end": end,
        },
    )
    try:
        parser.write(raw)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own errors and ValueError alike
        raise BadRequest(f"the multipart body is not well formed: {exc}") from None
    if not form.parts:
        raise BadRequest("the multipart body has no parts")
    return form
