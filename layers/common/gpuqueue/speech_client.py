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
from typing import Final, Protocol

import requests
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from gpuqueue.errors import GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu_client import CONNECT_TIMEOUT_SECONDS, RETRYABLE_STATUSES
from gpuqueue.gpu_credentials import GpuCredentials
from gpuqueue.http_deadline import post_within
from gpuqueue.models import Endpoint

__all__ = [
    "DEFAULT_MODEL",
    "TRANSCRIPTIONS_PATH",
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
        audio: bytes,
        *,
        filename: str,
        content_type: str,
        language: str | None,
        prompt: str | None,
        timeout_seconds: float,
    ) -> Transcript:
        """Return the transcript, or raise GpuTimeout / RetryableGpuError / PermanentGpuError."""
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
        audio: bytes,
        *,
        filename: str,
        content_type: str,
        language: str | None,
        prompt: str | None,
        timeout_seconds: float,
    ) -> Transcript:
        fields: dict[str, str] = {"model": self._model, "response_format": "verbose_json"}
        if language:
            fields["language"] = language
        if prompt:
            fields["prompt"] = prompt
        url = f"{endpoint.url.rstrip('/')}{TRANSCRIPTIONS_PATH}"
        try:
            response = self._credentials.send(
                endpoint,
                lambda headers: post_within(
                    self._session,
                    url,
                    seconds=timeout_seconds,
                    connect_seconds=CONNECT_TIMEOUT_SECONDS,
                    data=fields,
                    files={"file": (filename, audio, content_type)},
                    headers=dict(headers),
                ),
            )
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
        return parse_transcription(endpoint, response)


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
