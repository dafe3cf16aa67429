"""Stand-in speech-to-text server for tests and the local stack; it really transcribes.

It speaks the OpenAI-compatible ``POST /v1/audio/transcriptions`` (multipart/form-data:
``file``, ``model``, ``language``, ``prompt``, ``response_format``) and recognises English
with PocketSphinx, whose wheel carries the acoustic model, language model and dictionary:
nothing is downloaded at run time. Accuracy is that of a small 2010s recogniser, not of
Whisper: clear speech comes out mostly right.

Audio: WAV is read with the stdlib ``wave`` module; FLAC, OGG (Vorbis, Opus) and MP3 with
``soundfile`` (libsndfile, bundled in its wheel). WebM and M4A/MP4 answer 400 "unsupported
by the stand-in": libsndfile cannot read them and a real server would use ffmpeg, which we
do not ship. Everything is mixed to mono and resampled to 16 kHz, the model's rate.

Answers: ``verbose_json`` (``task``, ``language`` "en", ``language_probability`` 1.0 since
the model is English-only, ``duration``, ``text``, ``segments`` [{``id``, ``start``,
``end``, ``text``}], one segment per stretch of speech found by PocketSphinx's voice
activity detector), ``json`` ({``text``}) or ``text``. ``language`` other than English is
refused with 400; ``prompt`` and ``model`` are accepted and ignored. Bad input answers 400
with an OpenAI-style ``{"error": {"message", "type"}}``.

Behaviour of a real box under stress (latency, failures, hangs, saturation, bad health) is
injected through :class:`SpeechServerKnobs`, changed at run time through the Python API or
``POST /knobs``, as for the image stand-in. Extra routes: ``GET /health``, ``GET /stats``,
``POST /reset-stats``, ``GET|POST /knobs``, ``POST /shutdown``, ``GET /v1/models``.

Run standalone::

    python -m gpuqueue_local.standins.speech_server --port 8101 --latency 0.1
"""

from __future__ import annotations

import argparse
import collections
import email.parser
import email.policy
import io
import json
import random
import select
import signal
import socket
import sys
import threading
import time
import wave
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt
from pocketsphinx import Decoder, Segmenter  # type: ignore[import-untyped]

from gpuqueue_local.standins.fault_knobs import (
    CONTROL_PATHS,
    HANG_BOUND_S,
    FaultKnobs,
    discard_body,
    drip_all_but_last,
    is_authorized,
    public_knobs,
    send_last_piece,
)
from gpuqueue_local.standins.serving import BackgroundServer

__all__ = [
    "HANG_BOUND_S",
    "MODEL_ID",
    "SAMPLE_RATE",
    "AudioDecodeError",
    "DecodedAudio",
    "Recognizer",
    "SpeechServer",
    "SpeechServerKnobs",
    "Transcription",
    "TranscriptionSegment",
    "decode_audio",
    "main",
]

MODEL_ID: Final = "whisper-1"  # what clients ask for; any model name is accepted
SAMPLE_RATE: Final = 16_000  # the PocketSphinx en-us model's rate
_HANG_TICK_S: Final = 0.05
# Above the API's 100 MB async upload cap plus multipart framing; a real server has one too.
_MAX_BODY_BYTES: Final = 256 * 1024 * 1024
_TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
_RESPONSE_FORMATS: Final = ("json", "text", "verbose_json")
_ENGLISH: Final = frozenset({"en", "eng", "english"})
# Digital silence (exact zeros, as synthesised or gated audio has) gives -inf log energies
# that throw PocketSphinx's cepstral mean and silence model off: "hello world" came out as
# "oh where". Noise at ~-55 dBFS, seeded so a clip always transcribes the same, fixes it.
_DITHER_RMS: Final = 60.0  # in 16-bit sample units
# Silence around the clip so speech starting at sample 0 still gets a lead-in.
_PAD_S: Final = 0.3
_LOWPASS_TAPS: Final = 101
_DECODER_INIT_LOCK: Final = threading.Lock()


class SpeechServerKnobs(FaultKnobs):
    """Fault-injection knobs of this stand-in (see fault_knobs.FaultKnobs)."""


# --------------------------------------------------------------------------- audio

Samples = npt.NDArray[np.float64]


class AudioDecodeError(Exception):
    """The upload is not audio this stand-in can read (answered 400)."""


@dataclass(frozen=True)
class DecodedAudio:
    samples: Samples  # mono, SAMPLE_RATE Hz, 16-bit scale (-32768..32767)
    duration: float  # seconds, of the original


def decode_audio(data: bytes) -> DecodedAudio:
    """WAV, FLAC, OGG or MP3 bytes -> 16 kHz mono samples. Raises AudioDecodeError."""
    if not data:
        raise AudioDecodeError("the audio file is empty")
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        raise AudioDecodeError("webm audio is unsupported by the stand-in (wav/mp3/flac/ogg)")
    if data[4:8] == b"ftyp":
        raise AudioDecodeError("m4a/mp4 audio is unsupported by the stand-in (wav/mp3/flac/ogg)")
    decoded: tuple[npt.NDArray[np.float64], int] | None = None
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        decoded = _read_pcm_wav(data)  # None: a WAV flavour `wave` cannot read (float, ...)
    if decoded is None:
        decoded = _read_with_soundfile(data)
    channels, rate = decoded
    if channels.shape[0] == 0:
        raise AudioDecodeError("the audio file holds no samples")
    mono = channels.mean(axis=1)
    return DecodedAudio(samples=_resample(mono, rate), duration=mono.shape[0] / rate)


def _read_pcm_wav(data: bytes) -> tuple[npt.NDArray[np.float64], int] | None:
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    # wave raises RuntimeError on a chunk size that points past the end of the file.
    except (wave.Error, EOFError, RuntimeError, ValueError):
        return None
    if rate <= 0 or channels <= 0:
        raise AudioDecodeError("the WAV header is invalid")
    raw = raw[: len(raw) - len(raw) % (width * channels)]  # drop a truncated last frame
    if width == 1:  # 8-bit WAV is unsigned
        ints = np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0
        scaled = ints * 256.0
    elif width == 2:
        scaled = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    elif width == 3:
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints32 = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        ints32 = np.where(ints32 >= 1 << 23, ints32 - (1 << 24), ints32)
        scaled = ints32.astype(np.float64) / 256.0
    elif width == 4:
        scaled = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 65536.0
    else:
        raise AudioDecodeError(f"unsupported WAV sample width: {width} bytes")
    return scaled.reshape(-1, channels), rate


def _read_with_soundfile(data: bytes) -> tuple[npt.NDArray[np.float64], int]:
    try:
        import soundfile  # type: ignore[import-untyped]  # noqa: PLC0415 - optional
    except ImportError:  # pragma: no cover - soundfile is in requirements-dev.txt
        raise AudioDecodeError("only WAV is supported here (soundfile is not installed)") from None
    try:
        frames, rate = soundfile.read(io.BytesIO(data), dtype="float64", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError):
        raise AudioDecodeError("could not decode the audio (send wav, mp3, flac or ogg)") from None
    return cast(npt.NDArray[np.float64], frames) * 32768.0, int(rate)


def _resample(samples: Samples, rate: int) -> Samples:
    """To SAMPLE_RATE: a windowed-sinc low-pass first when downsampling, then linear steps.

    The low-pass keeps the 8-11 kHz content of a 22.05 kHz clip (espeak-ng's rate) from
    folding back into the band the model listens to.
    """
    if rate == SAMPLE_RATE:
        return samples
    if rate > SAMPLE_RATE and samples.shape[0] > _LOWPASS_TAPS:
        cutoff = 0.475 * SAMPLE_RATE / rate  # just under the new Nyquist, in cycles/sample
        n = np.arange(_LOWPASS_TAPS) - (_LOWPASS_TAPS - 1) / 2
        taps = np.sinc(2 * cutoff * n) * np.hamming(_LOWPASS_TAPS)
        samples = np.convolve(samples, taps / taps.sum(), mode="same")
    count = max(1, round(samples.shape[0] * SAMPLE_RATE / rate))
    positions = np.arange(count) * (rate / SAMPLE_RATE)
    return np.interp(positions, np.arange(samples.shape[0]), samples)


def _to_pcm16(samples: Samples) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


# --------------------------------------------------------------------------- recognition


@dataclass(frozen=True)
class TranscriptionSegment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcription:
    text: str
    segments: tuple[TranscriptionSegment, ...]
    duration: float


class Recognizer:
    """PocketSphinx with the wheel's en-us model, at most ``decoders`` decodes at once.

    A Decoder is not thread-safe and costs ~90 MB and ~0.5 s to create, so a few are kept
    and lent out one request at a time; requests beyond that wait (like calls to a busy GPU).
    """

    def __init__(self, decoders: int = 1) -> None:
        if decoders < 1:
            raise ValueError("decoders must be at least 1")
        self._slots = threading.BoundedSemaphore(decoders)
        self._lock = threading.Lock()
        self._idle: list[Any] = []

    def warm(self) -> None:
        """Create one decoder ahead of the first request (model loading is the slow part)."""
        with self._decoder():
            pass

    @contextmanager
    def _decoder(self) -> Iterator[Any]:
        with self._slots:
            with self._lock:
                decoder = self._idle.pop() if self._idle else None
            if decoder is None:
                with _DECODER_INIT_LOCK:  # loading the model twice at once only wastes RAM
                    decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
            try:
                yield decoder
            finally:
                with self._lock:
                    self._idle.append(decoder)

    def transcribe(self, audio: DecodedAudio) -> Transcription:
        rng = np.random.default_rng(0)  # same clip, same dither, same words
        pad = np.zeros(round(_PAD_S * SAMPLE_RATE))
        padded = np.concatenate([pad, audio.samples, pad])
        pcm = _to_pcm16(padded + rng.normal(0.0, _DITHER_RMS, padded.shape[0]))
        segments: list[TranscriptionSegment] = []
        # The voice activity detector splits the audio into utterances: each is decoded on
        # its own (long audio stays cheap) and becomes one segment of the answer.
        segmenter = Segmenter(sample_rate=SAMPLE_RATE)
        with self._decoder() as decoder:
            for speech in segmenter.segment(io.BytesIO(pcm)):
                decoder.start_utt()
                decoder.process_raw(speech.pcm, full_utt=True)
                decoder.end_utt()
                hypothesis = decoder.hyp()
                text = hypothesis.hypstr.strip() if hypothesis is not None else ""
                if text:
                    start = min(max(0.0, speech.start_time - _PAD_S), audio.duration)
                    end = min(max(start, speech.end_time - _PAD_S), audio.duration)
                    segments.append(
                        TranscriptionSegment(start=round(start, 3), end=round(end, 3), text=text)
                    )
        return Transcription(
            text=" ".join(s.text for s in segments),
            segments=tuple(segments),
            duration=round(audio.duration, 3),
        )


# --------------------------------------------------------------------------- requests


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _TranscriptionRequest:
    audio: bytes
    filename: str | None
    response_format: str


def _parse_multipart(content_type: str, body: bytes) -> dict[str, EmailMessage]:
    """multipart/form-data -> {field name: part}. The email parser keeps binary parts intact."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise _BadRequest("send multipart/form-data with the audio in the field 'file'")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise _BadRequest("malformed multipart body")
    parts: dict[str, EmailMessage] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts.setdefault(name, cast(EmailMessage, part))
    return parts


def _part_bytes(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text_field(parts: Mapping[str, EmailMessage], name: str) -> str | None:
    part = parts.get(name)
    if part is None:
        return None
    try:
        return _part_bytes(part).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _BadRequest(f"{name} must be UTF-8 text") from None


def _parse_transcription(content_type: str, body: bytes) -> _TranscriptionRequest:
    parts = _parse_multipart(content_type, body)
    file_part = parts.get("file")
    if file_part is None:
        raise _BadRequest("the field 'file' (the audio) is required")
    response_format = _text_field(parts, "response_format") or "json"
    if response_format not in _RESPONSE_FORMATS:
        raise _BadRequest(
            f"response_format must be one of {', '.join(_RESPONSE_FORMATS)} in the stand-in"
        )
    language = _text_field(parts, "language")
    if language and language.lower().split("-", 1)[0] not in _ENGLISH:
        raise _BadRequest(f"the stand-in transcribes English only, not {language!r}")
    return _TranscriptionRequest(
        audio=_part_bytes(file_part),
        filename=file_part.get_filename(),
        response_format=response_format,
    )


def _verbose_json(result: Transcription) -> dict[str, Any]:
    return {
        "task": "transcribe",
        "language": "en",
        # English-only model: the language is given, not detected.
        "language_probability": 1.0,
        "duration": result.duration,
        "text": result.text,
        "segments": [
            {"id": i, "start": s.start, "end": s.end, "text": s.text}
            for i, s in enumerate(result.segments)
        ],
    }


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    # Daemon handler threads: a hung call must never keep the interpreter alive.
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: SpeechServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, hang tests) is expected, not an error.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "gpuqueue-speech-standin/1.0"
    # HTTP/1.0: one request per connection, so a closed socket reliably means the client left.
    protocol_version = "HTTP/1.0"

    @property
    def owner(self) -> SpeechServer:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        if self.owner.verbose:
            super().log_message(format, *args)

    def _refused(self, path: str) -> bool:
        """Answer 401 (and say so) when the credential knob wants a key this lacks."""
        if path in CONTROL_PATHS or is_authorized(self.owner.knobs, self.headers):
            return False
        self.owner._record_refused()
        # Read what the client sends first: closing on an unread body could reset the
        # connection before it reads the 401.
        discard_body(self.rfile, self.headers)
        self._send_json(401, _error("invalid or missing API key", "authentication_error"))
        return True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._refused(path):
            return
        if path == "/health":
            self._health()
        elif path == "/stats":
            self._send_json(200, self.owner.stats())
        elif path == "/knobs":
            self._send_json(200, public_knobs(self.owner.knobs))
        elif path == "/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "pocketsphinx"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(404, _error(f"no route for GET {path}", "not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._refused(path):
            return
        if path == _TRANSCRIPTIONS_PATH:
            self._transcribe()
        elif path == "/reset-stats":
            self.owner.reset_stats()
            self._send_json(200, self.owner.stats())
        elif path == "/knobs":
            self._post_knobs()
        elif path == "/shutdown":
            # Die like a crashed server (the port then refuses connections): answer first,
            # stop from another thread.
            self._send_json(200, {"status": "stopping"})
            threading.Thread(target=self.owner.stop, daemon=True).start()
        else:
            self._send_json(404, _error(f"no route for POST {path}", "not_found"))

    def _health(self) -> None:
        if not self.owner.knobs.healthy:
            self._send_json(503, {"status": "down"})
            return
        stats = self.owner.stats()
        self._send_json(
            200,
            {
                "status": "ok",
                "in_flight": stats["in_flight"],
                "max_in_flight": stats["max_in_flight"],
                "calls": stats["calls"],
            },
        )

    def _post_knobs(self) -> None:
        try:
            body = json.loads(self._read_body(1 << 20) or b"{}")
            if not isinstance(body, dict):
                raise _BadRequest("request body must be a JSON object")
            knobs = self.owner.set_knobs(body)
        except (_BadRequest, ValueError) as exc:  # JSONDecodeError is a ValueError
            self._send_json(400, _error(str(exc)))
            return
        self._send_json(200, public_knobs(knobs))

    def _transcribe(self) -> None:
        owner = self.owner
        try:
            body = self._read_body(_MAX_BODY_BYTES)
            request = _parse_transcription(self.headers.get("Content-Type", ""), body)
        except _BadRequest as exc:
            owner._record_call(None)
            self._send_json(exc.status, _error(str(exc)))
            return

        admitted, fail = owner._enter()
        if not admitted:
            self._send_json(429, _error("busy: too many concurrent requests", "rate_limit"))
            return
        try:
            if not self._wait_before_answer():
                # Stopped, client gone, or hang bound hit: drop the connection like a dead box.
                self.close_connection = True
                return
            if fail:
                status, payload = owner.knobs.fail_status, _error("injected failure", "server")
            else:
                status, payload = self._run(request)
            if status == 200 and request.response_format == "text":
                content_type = "text/plain; charset=utf-8"
                data = f"{payload['text']}\n".encode()
            else:
                content_type, data = "application/json", json.dumps(payload).encode()
            last_piece = None
            if owner.knobs.drip_s > 0:
                last_piece = drip_all_but_last(
                    self,
                    status,
                    content_type,
                    data,
                    interval=owner.knobs.drip_s,
                    stop=owner._stop_event,
                )
                if last_piece is None:
                    return
        finally:
            # Leave in_flight before answering so a client that got its reply sees it released.
            owner._exit()
        if last_piece is not None:
            send_last_piece(self, last_piece)
        else:
            self._send(status, content_type, data)

    def _run(self, request: _TranscriptionRequest) -> tuple[int, dict[str, Any]]:
        try:
            audio = decode_audio(request.audio)
        except AudioDecodeError as exc:
            return 400, _error(str(exc))
        try:
            result = self.owner.recognizer.transcribe(audio)
        except Exception as exc:  # a decoder failure must still answer, as a server would
            return 500, _error(f"transcription failed: {exc}", "server_error")
        self.owner._record_result(result)
        if request.response_format == "verbose_json":
            return 200, _verbose_json(result)
        return 200, {"text": result.text}

    def _wait_before_answer(self) -> bool:
        """Apply latency/hang knobs. False means: do not answer at all."""
        owner = self.owner
        latency = owner.knobs.latency_s
        # Event.wait instead of time.sleep so stop() interrupts the delay at once.
        if latency > 0 and owner._stop_event.wait(latency):
            return False
        deadline = time.monotonic() + HANG_BOUND_S
        # Re-read the knob each tick so tests can release hung calls by clearing `hang`.
        while owner.knobs.hang:
            if owner._stop_event.wait(_HANG_TICK_S):
                return False
            if self._peer_closed() or time.monotonic() >= deadline:
                return False
        return True

    def _peer_closed(self) -> bool:
        # The request is fully read, so a readable socket with no data means EOF (client left).
        conn: socket.socket = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self, limit: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            raise _BadRequest("invalid Content-Length") from None
        if length < 0:
            raise _BadRequest("Content-Length is required", status=411)
        if length > limit:
            # The body stays unread: close the connection rather than read megabytes.
            self.close_connection = True
            raise _BadRequest(f"request body over {limit} bytes", status=413)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(payload).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            pass  # client already gone; nothing useful to do


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


# --------------------------------------------------------------------------- public API


class SpeechServer(BackgroundServer[SpeechServerKnobs]):
    """In-process stand-in speech server; binds in ``__init__`` so ``port`` is known early."""

    name = "speech-server"

    def __init__(
        self,
        port: int = 0,
        knobs: SpeechServerKnobs | None = None,
        host: str = "127.0.0.1",
        *,
        decoders: int = 1,
        verbose: bool = False,
    ) -> None:
        self.knobs = knobs if knobs is not None else SpeechServerKnobs()
        self.verbose = verbose
        self.recognizer = Recognizer(decoders)
        self._host = host
        self._init_serving()
        self._calls = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._audio_seconds = 0.0
        self._texts: collections.deque[str] = collections.deque(maxlen=100)
        self._httpd = _HTTPServer((host, port), self)

    def _before_start(self) -> None:
        # The model loads in another thread while the server starts taking requests.
        threading.Thread(target=self.recognizer.warm, name="speech-warm", daemon=True).start()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "audio_seconds": round(self._audio_seconds, 3),
                "texts": list(self._texts),  # the last 100 transcripts
                "refused": self._refused,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = 0
            self._refused = 0
            self._audio_seconds = 0.0
            self._texts.clear()
            # Calls still running keep their in_flight slot; the peak restarts from there.
            self._max_in_flight = self._in_flight

    # -- bookkeeping used by the handler

    def _record_call(self, text: str | None) -> None:
        with self._lock:
            self._calls += 1
            if text is not None:
                self._texts.append(text)

    def _record_result(self, result: Transcription) -> None:
        with self._lock:
            self._texts.append(result.text)
            self._audio_seconds += result.duration

    def _enter(self) -> tuple[bool, bool]:
        """Count a well-formed call; returns (admitted, should_fail)."""
        with self._lock:
            self._calls += 1
            knobs = self.knobs
            if knobs.capacity and self._in_flight >= knobs.capacity:
                return False, False
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if knobs.failure_seed != self._rng_seed:
                # Knob mutated directly on the dataclass: pick up the new seed.
                self._rng_seed = knobs.failure_seed
                self._rng = random.Random(self._rng_seed)
            # Draw on every admitted call so the failure pattern depends only on call order.
            return True, self._rng.random() < knobs.failure_rate

    def _exit(self) -> None:
        with self._lock:
            self._in_flight -= 1


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stand-in speech-to-text server (PocketSphinx).")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="extra seconds per call")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-seed", type=int, default=None)
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--capacity", type=int, default=0, help="0 = unlimited")
    parser.add_argument("--decoders", type=int, default=1, help="parallel decodes (~90 MB each)")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument(
        "--auth-token",
        default=None,
        help="require this API key on every call and /health (401 without it)",
    )
    parser.add_argument(
        "--auth-header",
        default="Authorization",
        help="where the key goes: Authorization (as 'Bearer <key>', the default) or a header "
        "such as X-Api-Key",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if args.decoders < 1:
        parser.error("--decoders must be at least 1")

    server = SpeechServer(
        port=args.port, host=args.host, decoders=args.decoders, verbose=args.verbose
    )
    try:
        server.set_knobs(
            {
                "latency_s": args.latency,
                "failure_rate": args.failure_rate,
                "failure_seed": args.failure_seed,
                "fail_status": args.fail_status,
                "capacity": args.capacity,
                "hang": args.hang,
                "healthy": not args.unhealthy,
                "auth_token": args.auth_token,
                "auth_header": args.auth_header,
            }
        )
    except ValueError as exc:
        server.stop()
        parser.error(str(exc))

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(f"speech-server listening on {server.url}", flush=True)
    try:
        # Timed waits keep the main thread responsive to signals; /shutdown also ends it.
        while not done.wait(0.5) and not server.stopped:
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
