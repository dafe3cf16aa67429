"""Audio uploads: format detection, raw PCM validation and wrapping, WAV duration, limits."""

from __future__ import annotations

import base64
import io
import math
import struct
import wave

import pytest

from gpuqueue.errors import InvalidInput, UnsupportedMediaType
from gpuqueue.speech.audio import (
    HEAD_BYTES,
    SUPPORTED_AUDIO,
    SYNC_AUDIO_MAX_BYTES,
    AudioFormat,
    audio_format,
    pcm_to_wav,
    validate_pcm,
    wav_duration_seconds,
)

LAMBDA_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024


def tone(seconds: float, *, sample_rate: int = 16_000, channels: int = 1) -> bytes:
    """A 440 Hz tone as 16-bit little-endian PCM, channels interleaved."""
    frames = round(seconds * sample_rate)
    samples = [round(12_000 * math.sin(2 * math.pi * 440 * i / sample_rate)) for i in range(frames)]
    interleaved = [s for s in samples for _ in range(channels)]
    return struct.pack(f"<{len(interleaved)}h", *interleaved)


def riff(*chunks: tuple[bytes, bytes], size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(
        cid + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1) for cid, data in chunks
    )
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def fmt_chunk(*, format_tag: int, channels: int, rate: int, bits: int) -> tuple[bytes, bytes]:
    block = channels * bits // 8
    return b"fmt ", struct.pack("<HHIIHH", format_tag, channels, rate, rate * block, block, bits)


# --------------------------------------------------------------------------- format detection

MAGIC_SAMPLES = {
    AudioFormat.WAV: b"RIFF\x24\x00\x00\x00WAVEfmt ",
    AudioFormat.MP3: b"ID3\x04\x00\x00\x00\x00\x00\x00",
    AudioFormat.FLAC: b"fLaC\x00\x00\x00\x22",
    AudioFormat.OGG: b"OggS\x00\x02\x00\x00",
    AudioFormat.WEBM: b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81",
    AudioFormat.M4A: b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00",
}


@pytest.mark.parametrize(("expected", "head"), MAGIC_SAMPLES.items(), ids=lambda v: str(v)[:8])
def test_magic_bytes_identify_each_format_without_a_name(expected: AudioFormat, head: bytes):
    assert audio_format(None, None, head) is expected


@pytest.mark.parametrize(
    "head",
    [
        b"\xff\xfb\x90\x64\x00",  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
        b"\xff\xf3\x80\xc4\x00",  # MPEG-2 layer III (what libsndfile writes at 22.05 kHz)
        b"\xff\xe3\x18\xc4\x00",  # MPEG-2.5 layer III
    ],
)
def test_an_mpeg_frame_header_without_id3_is_mp3(head: bytes):
    assert audio_format(None, None, head) is AudioFormat.MP3


def test_rf64_wav_and_other_mp4_brands_are_recognised():
    assert audio_format(None, None, b"RF64\xff\xff\xff\xffWAVEds64") is AudioFormat.WAV
    assert audio_format(None, None, b"\x00\x00\x00\x1cftypisom\x00\x00") is AudioFormat.M4A
    assert audio_format(None, None, b"\x00\x00\x00\x18ftypmp42\x00\x00") is AudioFormat.M4A


def test_magic_bytes_win_over_a_misleading_name_and_type():
    head = MAGIC_SAMPLES[AudioFormat.FLAC]
    assert audio_format("voice.mp3", "audio/mpeg", head) is AudioFormat.FLAC


@pytest.mark.parametrize(
    "head",
    [
        b"\xff\xf1\x50\x80\x00",  # AAC ADTS: sync bits, but layer bits 00
        b"\xff\xfb\xf0\x64\x00",  # bitrate index 1111 is reserved
        b"\xff\xfb\x9c\x64\x00",  # sample-rate index 11 is reserved
        b"\xff\xeb\x90\x64\x00",  # version bits 01 are reserved
    ],
)
def test_invalid_mpeg_headers_are_not_taken_for_mp3(head: bytes):
    with pytest.raises(UnsupportedMediaType):
        audio_format(None, None, head)
    # ...but the name still decides when the bytes say nothing.
    assert audio_format("clip.m4a", None, head) is AudioFormat.M4A


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (name, fmt)
        for fmt, audio_type in SUPPORTED_AUDIO.items()
        for name in (f"clip{ext}" for ext in audio_type.extensions)
    ]
    + [("CLIP.WAV", AudioFormat.WAV), ("my.voice.Flac", AudioFormat.FLAC)],
)
def test_extension_decides_when_the_bytes_are_not_recognised(filename: str, expected: AudioFormat):
    assert audio_format(filename, "application/octet-stream", b"\x00" * HEAD_BYTES) is expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (ctype, fmt)
        for fmt, audio_type in SUPPORTED_AUDIO.items()
        for ctype in audio_type.content_types
    ]
    + [("Audio/OGG; codecs=opus", AudioFormat.OGG), ("audio/wav ; rate=16000", AudioFormat.WAV)],
)
def test_content_type_decides_last(content_type: str, expected: AudioFormat):
    assert audio_format("upload", content_type, b"\x00" * HEAD_BYTES) is expected


def test_extension_is_asked_before_content_type():
    assert audio_format("a.flac", "audio/mpeg", b"") is AudioFormat.FLAC
    # An unknown extension does not stop the content type from deciding.
    assert audio_format("a.bin", "audio/mpeg", b"") is AudioFormat.MP3


@pytest.mark.parametrize(
    ("filename", "content_type", "head"),
    [
        (None, None, b""),
        ("notes.txt", "text/plain", b"hello, this is text"),
        ("clip", "application/octet-stream", b"\x00" * HEAD_BYTES),
        ("clip.aiff", "audio/aiff", b"FORM\x00\x00\x00\x00AIFF"),
        ("clip.", None, b"\x00\x01"),
    ],
)
def test_anything_else_is_unsupported_and_names_the_field(
    filename: str | None, content_type: str | None, head: bytes
):
    with pytest.raises(UnsupportedMediaType) as raised:
        audio_format(filename, content_type, head)
    assert raised.value.field == "file"
    assert raised.value.code == "UNSUPPORTED_MEDIA_TYPE"
    assert "wav, mp3, flac, ogg, webm, m4a" in raised.value.message


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"%PDF-1.7\n", "PDF"),
        (b"PK\x03\x04\x14\x00", "ZIP"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "HEIF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "AVIF"),
    ],
)
def test_known_non_audio_is_refused_even_when_named_like_audio(head: bytes, what: str):
    with pytest.raises(UnsupportedMediaType) as raised:
        audio_format("voice.wav", "audio/wav", head, field="upload")
    assert what in raised.value.message
    assert raised.value.field == "upload"


def test_canonical_extension_and_content_type():
    assert AudioFormat.WAV.extension == ".wav"
    assert AudioFormat.WAV.content_type == "audio/wav"
    assert AudioFormat.M4A.extension == ".m4a"
    assert AudioFormat.M4A.content_type == "audio/mp4"
    assert {f.value for f in SUPPORTED_AUDIO} == {"wav", "mp3", "flac", "ogg", "webm", "m4a"}


# --------------------------------------------------------------------------- raw PCM


def test_empty_pcm_is_refused_on_the_body():
    with pytest.raises(InvalidInput) as raised:
        validate_pcm(b"", 16_000, 1)
    assert raised.value.field == "body"
    assert "empty" in raised.value.message


@pytest.mark.parametrize("size", [1, 3, 31_999])
def test_odd_byte_count_is_refused_on_the_body(size: int):
    with pytest.raises(InvalidInput) as raised:
        validate_pcm(b"\x01" * size, 16_000, 1)
    assert raised.value.field == "body"
    assert raised.value.message.startswith(
        "odd byte count: 16-bit PCM needs an even number of bytes"
    )
    assert str(size) in raised.value.message


def test_stereo_needs_whole_frames():
    with pytest.raises(InvalidInput) as raised:
        validate_pcm(b"\x00" * 6, 16_000, 2)
    assert raised.value.field == "body"
    assert "multiple of 4" in raised.value.message
    validate_pcm(b"\x00" * 8, 16_000, 2)


@pytest.mark.parametrize("rate", [0, -16_000, 7_999, 48_001, 96_000, 1_000_000])
def test_absurd_sample_rates_are_refused(rate: int):
    with pytest.raises(InvalidInput) as raised:
        validate_pcm(b"\x00\x00", rate, 1)
    assert raised.value.field == "sample_rate"
    assert "8000" in raised.value.message
    assert "48000" in raised.value.message
    assert str(rate) in raised.value.message


@pytest.mark.parametrize("channels", [0, 3, 6, -1])
def test_channels_other_than_one_or_two_are_refused(channels: int):
    with pytest.raises(InvalidInput) as raised:
        validate_pcm(b"\x00" * 24, 16_000, channels)
    assert raised.value.field == "channels"


@pytest.mark.parametrize(("rate", "channels"), [(8_000, 1), (16_000, 1), (44_100, 2), (48_000, 2)])
def test_plausible_pcm_passes(rate: int, channels: int):
    validate_pcm(tone(0.01, sample_rate=rate, channels=channels), rate, channels)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (22_050, 1), (48_000, 2)])
def test_pcm_to_wav_round_trips_through_the_wave_module(rate: int, channels: int):
    pcm = tone(0.25, sample_rate=rate, channels=channels)
    wav = pcm_to_wav(pcm, sample_rate=rate, channels=channels)
    with wave.open(io.BytesIO(wav)) as read:
        assert read.getframerate() == rate
        assert read.getnchannels() == channels
        assert read.getsampwidth() == 2
        assert read.getnframes() == len(pcm) // (2 * channels)
        assert read.readframes(read.getnframes()) == pcm
    assert wav.startswith(b"RIFF")
    assert audio_format(None, None, wav[:HEAD_BYTES]) is AudioFormat.WAV


def test_pcm_to_wav_validates_first():
    with pytest.raises(InvalidInput) as raised:
        pcm_to_wav(b"\x00" * 3, sample_rate=16_000, channels=1)
    assert raised.value.field == "body"


# --------------------------------------------------------------------------- WAV duration


def test_duration_of_a_wav_made_from_pcm():
    wav = pcm_to_wav(tone(1.5, sample_rate=22_050), sample_rate=22_050, channels=1)
    assert wav_duration_seconds(wav) == pytest.approx(1.5, abs=1e-4)
    stereo = pcm_to_wav(tone(0.5, channels=2), sample_rate=16_000, channels=2)
    assert wav_duration_seconds(stereo) == pytest.approx(0.5)


def test_duration_skips_other_chunks_and_reads_float_wavs():
    samples = b"\x00" * (4 * 8_000)  # 32-bit float, mono, 8 kHz: 1 s
    wav = riff(
        (b"LIST", b"INFOISFT\x05\x00\x00\x00test\x00"),  # odd length: padded to even
        fmt_chunk(format_tag=3, channels=1, rate=8_000, bits=32),
        (b"fact", struct.pack("<I", 8_000)),
        (b"data", samples),
    )
    assert wav_duration_seconds(wav) == pytest.approx(1.0)


@pytest.mark.parametrize("declared", [0, 0xFFFFFFFF, 10**9])
def test_streamed_wavs_are_measured_by_the_bytes_present(declared: int):
    fmt = fmt_chunk(format_tag=1, channels=1, rate=16_000, bits=16)
    wav = riff(fmt, (b"data", b""), size=0xFFFFFFFF)
    wav = wav[:-4] + struct.pack("<I", declared) + b"\x00" * 16_000  # 0.5 s present
    assert wav_duration_seconds(wav) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RIFF",
        b"not a wav file at all",
        MAGIC_SAMPLES[AudioFormat.FLAC],
        riff((b"data", b"\x00" * 100)),  # samples before any fmt chunk
        riff((b"fmt ", b"\x01\x00")),  # fmt chunk too short
        riff(fmt_chunk(format_tag=1, channels=1, rate=16_000, bits=16)),  # no data chunk
        riff(fmt_chunk(format_tag=1, channels=1, rate=0, bits=16), (b"data", b"\x00" * 8)),
    ],
)
def test_duration_of_something_unreadable_is_none(data: bytes):
    assert wav_duration_seconds(data) is None


# --------------------------------------------------------------------------- limits


def test_sync_limit_fits_a_synchronous_lambda_event_after_base64():
    encoded = len(base64.b64encode(b"\x00" * SYNC_AUDIO_MAX_BYTES))
    assert encoded == 5_333_336
    # Headroom for headers, JWT claims and request context in the same 6 MB event.
    assert LAMBDA_SYNC_PAYLOAD_BYTES - encoded > 900_000
    assert SYNC_AUDIO_MAX_BYTES < 10_000_000  # API Gateway HTTP API payload cap
