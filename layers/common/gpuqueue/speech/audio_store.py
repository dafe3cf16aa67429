"""AudioStore: long audio uploaded straight to S3 (presigned PUT) and transcripts as JSON.

Keys are deterministic per task (`audio/<task id>`, `transcripts/<task id>.json`), so an
upload event maps back to its task and a repeated run overwrites the same transcript.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from gpuqueue.gpu.speech_client import AudioStream, Transcript

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

AUDIO_PREFIX = "audio/"
TRANSCRIPT_PREFIX = "transcripts/"


def audio_key(task_id: str) -> str:
    return f"{AUDIO_PREFIX}{task_id}"


def task_id_of_audio_key(key: str) -> str | None:
    """The task an uploaded object belongs to, or None for a key outside audio/."""
    if not key.startswith(AUDIO_PREFIX):
        return None
    task_id = key[len(AUDIO_PREFIX) :]
    return task_id if task_id and "/" not in task_id else None


def transcript_key(task_id: str) -> str:
    return f"{TRANSCRIPT_PREFIX}{task_id}.json"


class AudioStore:
    def __init__(self, s3: S3Client, bucket: str) -> None:
        self._s3 = s3
        self._bucket = bucket

    def presigned_put(
        self, key: str, *, size_bytes: int, content_type: str, expires_in_seconds: int
    ) -> str:
        """A PUT URL signed for exactly this length and type: S3 refuses another size."""
        return self._s3.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self._bucket,
                "Key": key,
                "ContentLength": size_bytes,
                "ContentType": content_type,
            },
            ExpiresIn=expires_in_seconds,
        )

    def get(self, key: str) -> bytes | None:
        stream = self.stream(key)
        return None if stream is None else stream.reader.read()

    def size(self, key: str) -> int | None:
        """The object's size in bytes (a HEAD: nothing read), None when there is none."""
        try:
            return self._s3.head_object(Bucket=self._bucket, Key=key)["ContentLength"]
        except ClientError as error:
            if _missing(error):
                return None
            raise

    def stream(self, key: str) -> AudioStream | None:
        """The object to read as it is sent (never held whole), None when there is none."""
        try:
            answer = self._s3.get_object(Bucket=self._bucket, Key=key)
        except ClientError as error:
            if _missing(error):
                return None
            raise
        return AudioStream(size=answer["ContentLength"], reader=answer["Body"])

    def put_transcript(self, task_id: str, transcript: Transcript) -> str:
        key = transcript_key(task_id)
        self._s3.put_object(
            Bucket=self._bucket,
            Key=key,
            Body=transcript.model_dump_json().encode(),
            ContentType="application/json",
            Metadata={"task-id": task_id},
        )
        return key

    def get_transcript(self, task_id: str) -> Transcript | None:
        body = self.get(transcript_key(task_id))
        return None if body is None else Transcript.model_validate_json(body)


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
