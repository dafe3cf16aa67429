"""parse_form: what a multipart/form-data body yields, and what it refuses (naming the field
the HTTP answer names; the speech routes' answers are tested in the integration suite)."""

from __future__ import annotations

import pytest

from gpuqueue.api.multipart_form import parse_form
from gpuqueue.errors import InvalidInput, UnsupportedMediaType

FORM = "multipart/form-data; boundary=B"
AUDIO = bytes(range(256)) + b"\r\n--B-not-a-boundary\r\n"  # every byte value, CRLFs, dashes


def _part(headers: str, data: bytes) -> bytes:
    return b"--B\r\n" + headers.encode() + b"\r\n\r\n" + data + b"\r\n"


def _body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--B--\r\n"


def test_a_file_part_keeps_its_bytes_name_and_type():
    body = _body(
        _part('Content-Disposition: form-data; name="file"; filename="a.wav"', AUDIO),
        _part('Content-Disposition: form-data; name="language"', b" en "),
    )

    form = parse_form(body, FORM)

    assert form["file"].data == AUDIO
    assert (form["file"].filename, form["file"].content_type) == ("a.wav", None)
    assert form["language"].text == "en"


def test_the_first_part_wins_when_a_name_repeats():
    body = _body(
        _part('Content-Disposition: form-data; name="file"; filename="a.wav"', b"first"),
        _part('Content-Disposition: form-data; name="file"; filename="b.wav"', b"second"),
    )

    assert parse_form(body, FORM)["file"].data == b"first"


def test_a_part_that_is_itself_multipart_reads_as_empty():
    # The old RFC 2388 way to send several files in one field: not audio the API can take.
    nested = b'--C\r\nContent-Disposition: file; filename="a.wav"\r\n\r\nRIFF\r\n--C--'
    body = _body(
        _part(
            'Content-Disposition: form-data; name="file"\r\n'
            "Content-Type: multipart/mixed; boundary=C",
            nested,
        )
    )

    part = parse_form(body, FORM)["file"]

    assert (part.data, part.content_type) == (b"", "multipart/mixed")


@pytest.mark.parametrize("content_type", [None, "", "application/json", "text/plain; boundary=B"])
def test_anything_but_multipart_form_data_is_unsupported_naming_the_header(content_type):
    with pytest.raises(UnsupportedMediaType) as refused:
        parse_form(_body(), content_type)

    assert refused.value.field == "Content-Type"
    assert "file" in refused.value.message  # says where the audio goes


@pytest.mark.parametrize(
    ("content_type", "body", "field"),
    [
        ("multipart/form-data", _body(), "Content-Type"),
        ('multipart/form-data; boundary=""', _body(), "body"),
        ("multipart/form-data; boundary=other", _body(_part("X: y", b"z")), "body"),
        (FORM, b"", "body"),
    ],
    ids=["no-boundary", "empty-boundary", "other-boundary", "empty-body"],
)
def test_a_form_that_cannot_be_read_is_invalid_input_naming_what_is_wrong(
    content_type, body, field
):
    with pytest.raises(InvalidInput) as refused:
        parse_form(body, content_type)

    assert refused.value.field == field
