"""multipart/form-data bodies (file uploads) parsed with the standard library's email parser,
which keeps binary parts byte-exact."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage

from gpuqueue.errors import InvalidInput, UnsupportedMediaType


@dataclass(frozen=True)
class FormPart:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace").strip()


def parse_form(body: bytes, content_type: str | None) -> dict[str, FormPart]:
    """{field name: part}; the first part wins when a name repeats."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "send multipart/form-data with the audio in the field 'file'", field="Content-Type"
        )
    if "boundary=" not in content_type.lower():
        raise InvalidInput("multipart/form-data needs a boundary parameter", field="Content-Type")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise InvalidInput("malformed multipart body", field="body")
    parts: dict[str, FormPart] = {}
    for part in message.iter_parts():  # EmailMessage parts: the HTTP policy's factory
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or name in parts:
            continue
        payload = part.get_payload(decode=True)
        parts[name] = FormPart(
            name=name,
            data=payload if isinstance(payload, bytes) else b"",
            filename=part.get_filename(),
            content_type=part.get_content_type() if part.get("content-type") else None,
        )
    return parts
