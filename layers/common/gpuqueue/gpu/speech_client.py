"""Speech-to-text adapter: the OpenAI-compatible ``POST /v1/audio/transcriptions``.

faster-whisper-server/speaches, whisper.cpp's server, vLLM and others speak it. Their
``verbose_json`` answers differ in detail (language as a code or an English name, language
probability present, absent or named ``detected_language_probability``, segments with or
without extra fields), so the answer is read leniently into one :class:`Transcript`.

Errors follow gpu_client: connect errors, 5xx and 408/425/429 are retryable (another
endpoint may do), and so is a 401/403 (the endpoint refused our credentials:
:class:`~gpuqueue.errors.EndpointAuthRefused`); other 4xx and unreadable answers are
permanent, and a call the endpoint accepted but did not answer in time raises
:class:`~gpuqueue.errors.GpuTimeout` (a retryable error the synchronous route turns into 504).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Final, Protocol

import requests
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from urllib3.fields import RequestField

from gpuqueue.errors import GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.http_deadline import AnswerOverLimit, post_within
from gpuqueue.gpu.image_client import CONNECT_TIMEOUT_SECONDS, IDENTITY, RETRYABLE_STATUSES
from gpuqueue.gpu.memory_budget import MIB, AnswerTooLarge, MemoryHold
from gpuqueue.models import Endpoint

__all__ = [
    "DEFAULT_MODEL",
    "TRANSCRIPTIONS_PATH",
    "AudioStream",
    "MultipartBody",
    "OpenAITranscriptionClient",
    "SpeechTranscriber",
    "Transcript",
    "TranscriptResponse",
    "TranscriptSegment",
    "parse_transcription",
]

TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
# The name OpenAI's API uses; self-hosted servers map it to their default model.
DEFAULT_MODEL: Final = "whisper-1"
# A transcription answer: verbose_json's segments run ~150 bytes per ~5 s of speech, so a
# few hundred KB for hours of audio. More than this is a broken server.
TRANSCRIPT_ANSWER_LIMIT: Final = 8 * MIB
# Its body and the parsed transcript in memory while it is read.
TRANSCRIPT_ANSWER_IN_MEMORY: Final = 3.0


class Readable(Protocol):
    def read(self, amt: int | None = ..., /) -> bytes: ...


@dataclass(frozen=True)
class AudioStream:
    """Audio read as it is sent (S3's body, say), never held whole: its size, known
    beforehand so the request has a Content-Length, and where to read it from."""

    size: int
    reader: Readable

    def close(self) -> None:
        """Let the source go (S3's body has a connection to give back)."""
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


class MultipartBody:
    """A multipart/form-data body read piece by piece as it is sent: the fields, then the
    file from its reader. `requests` sends a body with `read` and `__len__` in blocks with
    its Content-Length, so a 100 MB audio costs 64 KB of memory at a time, not two copies."""

    def __init__(
        self,
        fields: dict[str, str],
        *,
        name: str,
        filename: str,
        content_type: str,
        data: bytes | AudioStream,
    ) -> None:
        self.boundary = uuid.uuid4().hex
        dash = f"--{self.boundary}\r\n".encode()
        head = b""
        for key, value in fields.items():
            field = RequestField(name=key, data=value)
            field.make_multipart()
            head += dash + field.render_headers().encode() + value.encode() + b"\r\n"
        file = RequestField(name=name, data=b"", filename=filename)
        file.make_multipart(content_type=content_type)
        head += dash + file.render_headers().encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._size = len(data) if isinstance(data, bytes) else data.size
        self._parts: list[bytes | AudioStream] = [head, data, tail]
        self._length = len(head) + self._size + len(tail)
        self._part = 0
        self._offset = 0  # into the current part

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, amt: int | None = -1) -> bytes:
        want = self._length if amt is None or amt < 0 else amt
        out = b""
        while len(out) < want and self._part < len(self._parts):
            part = self._parts[self._part]
            if isinstance(part, bytes):
                piece = part[self._offset : self._offset + want - len(out)]
            else:
                piece = part.reader.read(min(want - len(out), self._size - self._offset))
                if not piece and self._offset < self._size:
                    # The promised length cannot be sent: fail the request, not pad it.
                    raise OSError(f"the audio ended after {self._offset} of {self._size} bytes")
            out += piece
            self._offset += len(piece)
            if self._offset >= (len(part) if isinstance(part, bytes) else self._size):
                self._part += 1
                self._offset = 0
        return out


class TranscriptSegment(BaseModel):
    start: float
    end: float
    text: str


class Transcript(BaseModel):
    """What a speech endpoint heard, in the seed's response shape (minus ``code``)."""

    language: str | None = None  # ISO 639-1 code where the server gave a known name
    language_probability: float | None = None
    duration: float | None = None  # seconds of audio
    text: str
    segments: list[TranscriptSegment] = Field(default_factory=list)


class TranscriptResponse(Transcript):
    """The seed's answer: the transcript with `code` 0."""

    code: int = 0


class SpeechTranscriber(Protocol):
    def transcribe(
        self,
        endpoint: Endpoint,
        audio: bytes | AudioStream,
        *,
        filename: str,
        content_type: str,
        language: str | None,
        prompt: str | None,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
    ) -> Transcript:
        """Return the transcript, or raise GpuTimeout / RetryableGpuError / PermanentGpuError.
        With `hold`, the answer's memory is reserved from it as the answer arrives (and
        given back once parsed)."""
        ...


class _WireSegment(BaseModel):
    model_config = ConfigDict(extra="ignore")

    start: float
    end: float
    text: str


class _WireTranscription(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    language: str | None = None
    language_probability: float | None = Field(
        default=None,
        validation_alias=AliasChoices("language_probability", "detected_language_probability"),
    )
    duration: float | None = None
    segments: list[_WireSegment] | None = None


class OpenAITranscriptionClient:
    """OpenAI-compatible transcription with ``response_format=verbose_json``."""

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        model: str = DEFAULT_MODEL,
        credentials: GpuCredentials | None = None,
    ):
        self._session = session or requests.Session()
        self._model = model
        self._credentials = credentials or GpuCredentials()

    def transcribe(
        self,
        endpoint: Endpoint,
        audio: bytes | AudioStream,
        *,
        filename: str,
        content_type: str,
        language: str | None,
        prompt: str | None,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
    ) -> Transcript:
        fields: dict[str, str] = {"model": self._model, "response_format": "verbose_json"}
        if language:
            fields["language"] = language
        if prompt:
            fields["prompt"] = prompt
        url = f"{endpoint.url.rstrip('/')}{TRANSCRIPTIONS_PATH}"
        body = MultipartBody(
            fields, name="file", filename=filename, content_type=content_type, data=audio
        )
        reserve = (
            hold.reserver(limit=TRANSCRIPT_ANSWER_LIMIT, factor=TRANSCRIPT_ANSWER_IN_MEMORY)
            if hold
            else None
        )

        try:
            response = self._credentials.send(
                endpoint,
                lambda headers: post_within(
                    self._session,
                    url,
                    seconds=timeout_seconds,
                    connect_seconds=CONNECT_TIMEOUT_SECONDS,
                    max_bytes=TRANSCRIPT_ANSWER_LIMIT,
                    on_answer=reserve,
                    data=body,
                    headers=dict(headers) | IDENTITY | {"Content-Type": body.content_type},
                ),
            )
        except AnswerTooLarge as error:
            raise PermanentGpuError(f"speech endpoint {endpoint.endpoint_id}: {error}") from error
        except AnswerOverLimit as error:
            raise RetryableGpuError(
                f"speech endpoint {endpoint.endpoint_id} sent {error}"
            ) from error
        # ConnectTimeout is both a ConnectionError and a Timeout: catch it as "unreachable"
        # first, so only a read timeout (the server has the audio but is slow) is a timeout.
        except requests.ConnectionError as error:
            raise RetryableGpuError(
                f"speech endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
            ) from error
        except requests.Timeout as error:
            raise GpuTimeout(
                f"speech endpoint {endpoint.endpoint_id} timed out after {timeout_seconds:g}s"
            ) from error
        except requests.RequestException as error:
            raise RetryableGpuError(
                f"speech endpoint {endpoint.endpoint_id} failed: {type(error).__name__}"
            ) from error
        try:
            return parse_transcription(endpoint, response)
        finally:
            if hold is not None:
                hold.release()  # the transcript is small next to its answer


def parse_transcription(endpoint: Endpoint, response: requests.Response) -> Transcript:
    """An OpenAI ``verbose_json`` (or plain ``json``) answer -> Transcript, or its error."""
    status = response.status_code
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise RetryableGpuError(
            f"speech endpoint {endpoint.endpoint_id} answered HTTP {status}"
            f"{_error_detail(response)}"
        )
    if status >= 400:
        raise PermanentGpuError(
            f"speech endpoint {endpoint.endpoint_id} rejected the audio: HTTP {status}"
            f"{_error_detail(response)}"
        )
    try:
        wire = _WireTranscription.model_validate_json(response.content)
    except ValidationError:
        raise PermanentGpuError(
            f"speech endpoint {endpoint.endpoint_id} returned an unreadable transcription"
        ) from None
    return Transcript(
        language=_language_code(wire.language),
        language_probability=wire.language_probability,
        duration=wire.duration,
        text=wire.text.strip(),
        # Whisper-family servers start each segment with a space; keep only the words.
        segments=[
            TranscriptSegment(start=s.start, end=s.end, text=s.text.strip())
            for s in wire.segments or []
        ],
    )


def _error_detail(response: requests.Response) -> str:
    """`: message` from an OpenAI-style error body, else the start of the body, else ''."""
    try:
        body = response.json()
    except ValueError:  # requests' JSONDecodeError included
        text = response.text.strip()[:200]
        return f": {text}" if text else ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f": {error['message'][:200]}"
        if isinstance(body.get("detail"), str):  # FastAPI-based servers
            return f": {body['detail'][:200]}"
    return f": {json.dumps(body)[:200]}"


def _language_code(language: str | None) -> str | None:
    """OpenAI and whisper.cpp name the language ("english"); others give "en". Give codes."""
    if not language:
        return None
    key = language.strip().lower()
    return _WHISPER_LANGUAGE_CODES.get(key, key)


# Whisper's language names -> ISO 639-1 (639-2/3 where there is none), as its tokenizer
# lists them ("_" stands for a space).
_WHISPER_LANGUAGES: Final = (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french "
    "ja:japanese pt:portuguese tr:turkish pl:polish ca:catalan nl:dutch ar:arabic "
    "sv:swedish it:italian id:indonesian hi:hindi fi:finnish vi:vietnamese he:hebrew "
    "uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish hu:hungarian ta:tamil "
    "no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali "
    "sr:serbian az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian "
    "br:breton eu:basque is:icelandic hy:armenian ne:nepali mn:mongolian bs:bosnian "
    "kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi pa:punjabi si:sinhala "
    "km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan ka:georgian "
    "be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
    "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit "
    "lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar "
    "haw:hawaiian ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
)
_WHISPER_LANGUAGE_CODES: Final = {
    name.replace("_", " "): code
    for code, name in (pair.split(":") for pair in _WHISPER_LANGUAGES.split())
}
