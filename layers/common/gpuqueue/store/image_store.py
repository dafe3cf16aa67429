"""ImageStore: results in a private S3 bucket, read through short-lived presigned URLs."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from gpuqueue.errors import ResultExpired
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = Logger(child=True)


def result_key(task_id: str) -> str:
    """One key per task, written once (see `put_png`)."""
    return f"results/{task_id}.png"


def check_image_kept(finished_at: datetime, *, kept: timedelta, now: datetime) -> None:
    """ResultExpired once the bucket's lifecycle rule (ImageRetentionDays, counted from the
    image's write, which is when its task finished) may have deleted the image: a clear 410
    rather than a presigned URL that answers S3's 404, the same answer before and after S3
    gets round to the deletion (lifecycle expiry is lazy)."""
    if now >= finished_at + kept:
        days = kept / timedelta(days=1)
        raise ResultExpired(
            f"the image was kept {days:g} day{'s' if days != 1 else ''} after its task "
            "finished and has been deleted; submit the task again",
            field="task_id",
        )


class ImageStore:
    def __init__(self, s3: S3Client, bucket: str) -> None:
        self._s3 = s3
        self._bucket = bucket

    @raises_store_error("bucket")
    def put_png(self, task_id: str, png: bytes) -> str:
        """Store the task's image unless one is stored already: the first image of a task is
        its image. A stale worker (its lease taken over) finishing after another worker must
        not replace the image of a task already DONE; a later attempt that finds one from an
        earlier attempt (whose DONE write was lost) uses it."""
        key = result_key(task_id)
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=png,
                ContentType="image/png",
                Metadata={"task-id": task_id},
                IfNoneMatch="*",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            logger.info("the task's image was already stored", extra={"task_id": task_id})
        return key

    def presigned_get(self, key: str, *, expires_in_seconds: int) -> str:
        return self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=expires_in_seconds,
        )
