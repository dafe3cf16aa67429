"""ImageStore: results in a private S3 bucket, read through short-lived presigned URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def result_key(task_id: str) -> str:
    """Deterministic: a repeated run of the same task overwrites the same object."""
    return f"results/{task_id}.png"


class ImageStore:
    def __init__(self, s3: S3Client, bucket: str) -> None:
        self._s3 = s3
        self._bucket = bucket

    def put_png(self, task_id: str, png: bytes) -> str:
        key = result_key(task_id)
        self._s3.put_object(
            Bucket=self._bucket,
            Key=key,
            Body=png,
            ContentType="image/png",
            Metadata={"task-id": task_id},
        )
        return key

    def presigned_get(self, key: str, *, expires_in_seconds: int) -> str:
        return self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=expires_in_seconds,
        )
