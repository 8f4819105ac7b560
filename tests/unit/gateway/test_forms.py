"""multipart/form-data: the fields the gateway routes by, and the body with the model renamed."""

from __future__ import annotations

import pytest

from ssw.errors import BadRequest
from ssw.gateway.forms import parse_form

CT = b"multipart/form-data; boundary=XyZ"
AUDIO = b"RIFF\r\n--Xy\r\n\x00\xff"  # binary, with a near-boundary inside
BODY = (
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    + AUDIO
    + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nasr\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n--XyZ--\r\n'
)


def test_fields_are_read_and_files_are_not_fields() -> None:
    form = parse_form(BODY, CT)
    assert (form.value("model"), form.value("stream"), form.value("file"), form.value("nope")) == (
        "asr",
        "true",
        None,
        None,
    )


def test_the_model_is_renamed_and_everything_else_kept_byte_for_byte() -> None:
    again = parse_form(parse_form(BODY, CT).with_value("model", "whisper-large"), CT)
    assert again.value("model") == "whisper-large" and again.value("stream") == "true"
    file_part = next(p for p in again.parts if p.filename)
    assert file_part.data == AUDIO and (b"Content-Type", b"audio/wav") in file_part.headers


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        (None, BODY, "multipart/form-data"),
        (b"application/json", BODY, "multipart/form-data"),
        (b"multipart/form-data", BODY, "boundary"),
        (CT, b"", "no parts"),
        (CT, b"garbage without a boundary", "not well formed"),
    ],
)
def test_what_is_not_a_form_is_a_400(content_type: bytes | None, body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_form(body, content_type)


def test_a_field_that_is_not_text_is_a_400() -> None:
    bad = b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n\xff\xfe\r\n--XyZ--\r\n'
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_form(bad, CT).value("model")


@pytest.mark.parametrize(
    "second",
    [
        b'Content-Disposition: form-data; name="model"\r\n\r\nasr-adapter',
        b'Content-Disposition: form-data; name="model"; filename="m.txt"\r\n\r\nasr-adapter',
    ],
)
def test_a_field_sent_twice_is_a_400_since_vllm_reads_the_last(second: bytes) -> None:
    form = parse_form(BODY.removesuffix(b"--XyZ--\r\n") + b"--XyZ\r\n" + second + b"\r\n--XyZ--\r\n", CT)
    with pytest.raises(BadRequest, match="'model' appears more than once"):
        form.value("model")
    assert form.value("stream") == "true"
