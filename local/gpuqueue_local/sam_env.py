"""events/env.local.json: the function env vars for `sam local invoke` against `make up`.

`sam local` runs each function in Docker, so the local stack is reached at
host.docker.internal. Names and ids are deterministic (stack "gpuqueue-local", moto's HASH
id strategy for Cognito), so the file is generated once and committed; a test keeps it in
step with the template:

    PYTHONPATH=local .venv/bin/python -m gpuqueue_local.sam_env > events/env.local.json
"""

from __future__ import annotations

import json
import logging
import os
import sys

from moto.server import ThreadedMotoServer

from gpuqueue_local.provision import LocalStack, physical_name, provision
from gpuqueue_local.stack import (
    DOCKER_MOTO_PORT,
    IMAGE_PORT_BASE_FOR_DOCKER,
    MOTO_DETERMINISTIC_IDS,
    SPEECH_PORT_BASE_FOR_DOCKER,
)
from gpuqueue_local.template import resources_of_type

DOCKER_HOST = "host.docker.internal"


def sam_env_vars(stack: LocalStack, moto_url: str) -> dict[str, dict[str, str]]:
    """{function logical id: env} with the local endpoints rewritten for Docker."""
    docker_moto = f"http://{DOCKER_HOST}:{DOCKER_MOTO_PORT}"
    # A secret's ARN ends in a random suffix (moto's, as AWS's); Secrets Manager takes its
    # name as SecretId too, and the name is the same in every local stack.
    secrets = {
        stack.ref(logical_id): physical_name(stack.name, logical_id)
        for logical_id in resources_of_type(stack.template, "AWS::SecretsManager::Secret")
        if logical_id in stack.resolver.refs  # not one whose Condition is false
    }
    result = {}
    for function in stack.functions():
        env = {
            k: secrets.get(v, v).replace(moto_url, docker_moto)
            for k, v in stack.function_env(function).items()
        }
        env["AWS_ENDPOINT_URL"] = docker_moto
        env["POWERTOOLS_TRACE_DISABLED"] = "true"
        result[function] = dict(sorted(env.items()))
    return result


def generate() -> dict[str, dict[str, str]]:
    os.environ.update(MOTO_DETERMINISTIC_IDS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = moto_url
    try:
        image_urls = ",".join(
            f"http://{DOCKER_HOST}:{IMAGE_PORT_BASE_FOR_DOCKER + i}" for i in range(2)
        )
        speech_urls = f"http://{DOCKER_HOST}:{SPEECH_PORT_BASE_FOR_DOCKER}"
        stack = provision(
            parameters={"ImageEndpointUrls": image_urls, "SpeechEndpointUrls": speech_urls}
        )
        return sam_env_vars(stack, moto_url)
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        server.stop()


def main() -> int:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    json.dump(generate(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
