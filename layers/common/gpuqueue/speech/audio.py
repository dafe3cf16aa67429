"""Audio uploads: which formats we accept, raw PCM checks and wrapping, size limits.

Pure logic (no AWS, no HTTP), shared by the speech routes and the dispatcher.

Size limits
-----------
A synchronous speech request travels client -> API Gateway HTTP API -> Lambda (synchronous
invoke) -> speech endpoint. The tightest hop sets the limit:

* API Gateway HTTP API accepts a request payload of at most 10 MB.
* A synchronous Lambda invoke accepts an event of at most 6 MB (6,291,456 bytes).
* API Gateway hands a binary body (audio, multipart) to Lambda base64-encoded, inside a
  JSON event: 4 output bytes per 3 input bytes. The raw body can therefore be at most
  6,291,456 * 3/4 = 4,718,592 bytes, and the rest of the event (headers, query string,
  the authorizer's JWT claims, request context: a few KB, more with large tokens) must fit
  in the same 6 MB.

``SYNC_AUDIO_MAX_BYTES`` = 4,000,000 raw bytes -> 5,333,336 base64 bytes, leaving about
958 KB of the 6 MB for the rest of the event. It bounds the whole request body (a
multipart body's boundaries and text fields included). That is ~125 s of 16 kHz mono
16-bit PCM or WAV, ~4 min of 128 kbit/s MP3.

Longer audio goes the asynchronous way: the client PUTs it straight to S3 with a presigned
URL, which skips API Gateway and Lambda payloads altogether. ``ASYNC_AUDIO_MAX_BYTES``
(100 MB: ~50 min of 16 kHz PCM, ~1.7 h of 128 kbit/s MP3) caps that upload; the URL
signs the Content-Length so S3 refuses anything larger. The cap also keeps the dispatcher
(512 MB) safe: it holds the audio and the multipart body it sends, ~2x the file.
"""

from __future__ import annotations

import io
import struct
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from gpuqueue.errors import InvalidInput, UnsupportedMediaType

__all__ = [
    "ASYNC_AUDIO_MAX_BYTES",
    "CHANNELS_ALLOWED",
    "HEAD_BYTES",
    "PCM_SAMPLE_WIDTH",
    "SAMPLE_RATE_MAX",
    "SAMPLE_RATE_MIN",
    "SUPPORTED_AUDIO",
    "SYNC_AUDIO_MAX_BYTES",
    "AudioFormat",
    "AudioType",
    "audio_format",
    "pcm_to_wav",
    "validate_pcm",
    "wav_duration_seconds",
]

SYNC_AUDIO_MAX_BYTES: Final = 4_000_000  # derivation in the module docstring
ASYNC_AUDIO_MAX_BYTES: Final = 100_000_000

# Raw PCM as an ESP32 sends it: 16-bit signed little-endian samples, channels interleaved.
PCM_SAMPLE_WIDTH: Final = 2
SAMPLE_RATE_MIN: Final = 8_000  # telephone quality; below that speech is not intelligible
SAMPLE_RATE_MAX: Final = 48_000  # the highest rate common audio hardware records at
CHANNELS_ALLOWED: Final = (1, 2)

# audio_format() needs the first 12 bytes (RIFF....WAVE, ....ftypM4A ); pass at least this.
HEAD_BYTES: Final = 16


class AudioFormat(StrEnum):
    WAV = "wav"
    MP3 = "mp3"
    FLAC = "flac"
    OGG = "ogg"
    WEBM = "webm"
    M4A = "m4a"

    @property
    def extension(self) -> str:
        """Canonical file extension, with the dot (for the filename sent to an endpoint)."""
        return SUPPORTED_AUDIO[self].extensions[0]

    @property
    def content_type(self) -> str:
        """Canonical MIME type."""
        return SUPPORTED_AUDIO[self].content_types[0]


@dataclass(frozen=True)
class AudioType:
    extensions: tuple[str, ...]  # lower case, with the dot; the first is canonical
    content_types: tuple[str, ...]  # lower case, no parameters; the first is canonical


SUPPORTED_AUDIO: Final[Mapping[AudioFormat, AudioType]] = MappingProxyType(
    {
        AudioFormat.WAV: AudioType(
            (".wav", ".wave"), ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
        ),
        AudioFormat.MP3: AudioType(
            (".mp3",), ("audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mpeg-3")
        ),
        AudioFormat.FLAC: AudioType((".flac",), ("audio/flac", "audio/x-flac")),
        AudioFormat.OGG: AudioType(
            (".ogg", ".oga", ".opus"), ("audio/ogg", "application/ogg", "audio/opus")
        ),
        AudioFormat.WEBM: AudioType((".webm", ".weba"), ("audio/webm", "video/webm")),
        # m4a is audio in an MP4 container; browsers and phones often label it .mp4.
        AudioFormat.M4A: AudioType(
            (".m4a", ".mp4"), ("audio/mp4", "audio/m4a", "audio/x-m4a", "video/mp4")
        ),
    }
)

_BY_EXTENSION: Final = {ext: fmt for fmt, t in SUPPORTED_AUDIO.items() for ext in t.extensions}
_BY_CONTENT_TYPE: Final = {
    ctype: fmt for fmt, t in SUPPORTED_AUDIO.items() for ctype in t.content_types
}

# ISO BMFF brands that are still images, not audio (HEIF/HEIC photos, AVIF).
_IMAGE_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
)
# Common uploads by mistake: name them in the error instead of trusting a ".wav" filename.
_NOT_AUDIO: Final = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


def audio_format(
    filename: str | None, content_type: str | None, head: bytes, *, field: str = "file"
) -> AudioFormat:
    """Identify an upload's format: magic bytes first, then the extension, then the type.

    ``head`` is the start of the file (``HEAD_BYTES`` is enough). Magic bytes win over the
    name because clients mislabel files; the name and type only decide when the bytes are
    not recognised (e.g. an MP3 starting with junk before its first frame).
    Raises UnsupportedMediaType (naming ``field``) for anything else.
    """
    by_magic = _format_from_magic(head)
    if by_magic is not None:
        return by_magic
    for signature, what in _NOT_AUDIO:
        if head.startswith(signature):
            raise UnsupportedMediaType(f"{field} is {what}, not audio", field=field)
    if _is_image_ftyp(head):
        raise UnsupportedMediaType(f"{field} is an HEIF/AVIF image, not audio", field=field)
    if filename and "." in filename:
        ext = "." + filename.rsplit(".", 1)[1].strip().lower()
        if ext in _BY_EXTENSION:
            return _BY_EXTENSION[ext]
    if content_type:
        ctype = content_type.split(";", 1)[0].strip().lower()
        if ctype in _BY_CONTENT_TYPE:
            return _BY_CONTENT_TYPE[ctype]
    accepted = ", ".join(f.value for f in AudioFormat)
    raise UnsupportedMediaType(
        f"{field}: unsupported audio format (accepted: {accepted})", field=field
    )


def _format_from_magic(head: bytes) -> AudioFormat | None:
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return AudioFormat.WAV
    if head.startswith(b"fLaC"):
        return AudioFormat.FLAC
    if head.startswith(b"OggS"):
        return AudioFormat.OGG
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM (a Matroska profile)
        return AudioFormat.WEBM
    if head[4:8] == b"ftyp" and not _is_image_ftyp(head):
        return AudioFormat.M4A
    if head.startswith(b"ID3") or _is_mpeg_audio_frame(head):
        return AudioFormat.MP3
    return None


def _is_image_ftyp(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _IMAGE_BRANDS


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then no reserved version/layer/rate values.

    The extra checks keep AAC ADTS (layer bits 00) and random 0xFF bytes from passing.
    """
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version = (head[1] >> 3) & 0b11
    layer = (head[1] >> 1) & 0b11
    bitrate = head[2] >> 4
    sample_rate = (head[2] >> 2) & 0b11
    return version != 0b01 and layer != 0b00 and bitrate != 0b1111 and sample_rate != 0b11


# --------------------------------------------------------------------------- raw PCM


def validate_pcm(pcm: bytes, sample_rate: int, channels: int) -> None:
    """Reject raw PCM that cannot be 16-bit little-endian audio at this rate and layout."""
    if not pcm:
        raise InvalidInput("empty body: send raw 16-bit little-endian PCM", field="body")
    if channels not in CHANNELS_ALLOWED:
        raise InvalidInput(f"channels must be 1 or 2, got {channels}", field="channels")
    if not SAMPLE_RATE_MIN <= sample_rate <= SAMPLE_RATE_MAX:
        raise InvalidInput(
            f"sample_rate must be between {SAMPLE_RATE_MIN} and {SAMPLE_RATE_MAX} Hz, "
            f"got {sample_rate}",
            field="sample_rate",
        )
    if len(pcm) % PCM_SAMPLE_WIDTH:
        raise InvalidInput(
            f"odd byte count: 16-bit PCM needs an even number of bytes, got {len(pcm)}",
            field="body",
        )
    frame_bytes = PCM_SAMPLE_WIDTH * channels
    if len(pcm) % frame_bytes:
        raise InvalidInput(
            f"byte count {len(pcm)} is not a multiple of {frame_bytes}: "
            f"{channels}-channel 16-bit PCM needs whole frames",
            field="body",
        )


def pcm_to_wav(pcm: bytes, *, sample_rate: int, channels: int) -> bytes:
    """Wrap raw 16-bit little-endian PCM in a WAV header (validated first)."""
    validate_pcm(pcm, sample_rate, channels)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(PCM_SAMPLE_WIDTH)
        out.setframerate(sample_rate)
        # WAV stores samples little-endian, as the input already is: no byte swapping.
        out.writeframes(pcm)
    return buf.getvalue()


def wav_duration_seconds(wav: bytes) -> float | None:
    """Length of a WAV file in seconds, or None when it is not a readable WAV.

    Reads the RIFF chunks directly rather than through ``wave`` so that float, mu-law and
    WAVE_FORMAT_EXTENSIBLE files work too, and so that streamed WAVs (data size left at 0
    or 0xFFFFFFFF by the writer) are measured by the bytes actually present.
    """
    if len(wav) < 12 or wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        return None
    byte_rate: int | None = None
    pos = 12
    while pos + 8 <= len(wav):
        chunk_id = wav[pos : pos + 4]
        (size,) = struct.unpack_from("<I", wav, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(wav):
                return None
            (byte_rate,) = struct.unpack_from("<I", wav, body + 8)
        elif chunk_id == b"data":
            if not byte_rate:
                return None  # no (or a broken) fmt chunk before the samples
            present = len(wav) - body
            data_size = present if size in (0, 0xFFFFFFFF) else min(size, present)
            return data_size / byte_rate
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None
