"""`python -m gpuqueue_local.moto_server [moto.server args]`: the local stack's moto server,
as strict as AWS where moto is lax: DynamoDB's conditional writes atomic (`moto_atomic`) and
IAM enforced per caller on the resource it touches (`moto_iam`), and Cognito's password
length as AWS's (`moto_cognito`). `GPUQUEUE_IAM=off` runs
it without IAM enforcement (moto's default), for comparison or debugging.
"""

from __future__ import annotations

import os
import sys

from moto.server import main as moto_main

from gpuqueue_local import moto_atomic, moto_cognito, moto_iam

IAM_SWITCH_ENV = "GPUQUEUE_IAM"
# A folder: each moto server started while it is set records its authorization decisions in
# a file of its own there (tools/permissions_report.py reads them).
AUDIT_DIR_ENV = "GPUQUEUE_IAM_AUDIT_DIR"


def iam_enforced() -> bool:
    return os.environ.get(IAM_SWITCH_ENV, "on").lower() not in ("off", "0", "false")


def main(argv: list[str] | None = None) -> None:
    moto_atomic.install()
    moto_cognito.install()
    moto_iam.install(enforce=iam_enforced())
    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
