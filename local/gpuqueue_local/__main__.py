"""`python -m gpuqueue_local` (what `make up` runs): start the local stack in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from gpuqueue_local.stack import (
    DOCKER_MOTO_PORT,
    IMAGE_PORT_BASE_FOR_DOCKER,
    IMAGE_STANDIN_PROTOCOLS,
    SPEECH_PORT_BASE_FOR_DOCKER,
    StackOptions,
    banner,
    start_stack,
)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep:
            raise SystemExit(f"--{what} wants NAME=VALUE, got {value!r}")
        pairs[name] = setting
    return pairs


def parse_args(argv: list[str] | None = None) -> StackOptions:
    parser = argparse.ArgumentParser(prog="python -m gpuqueue_local", description=__doc__)
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GPUQUEUE_PORT", "3000")),
        help="API port (default $GPUQUEUE_PORT or 3000; 0 = any free port)",
    )
    parser.add_argument("--moto-port", type=int, default=0, help="moto server port (0 = free)")
    parser.add_argument(
        "--ws-port", type=int, default=0, help="WebSocket API port (push; 0 = a free port)"
    )
    parser.add_argument("--image-servers", type=int, default=2, help="stand-in image endpoints")
    parser.add_argument("--image-latency", type=float, default=1.0, help="seconds per image")
    parser.add_argument(
        "--comfyui-servers",
        type=int,
        default=0,
        help="stand-in ComfyUI servers, registered as comfyui image endpoints",
    )
    parser.add_argument(
        "--image-capacity",
        type=int,
        default=0,
        help="concurrent calls each image stand-in takes (more get 429) and the slots the "
        "registry gives it (0 = unlimited stand-ins, 1 registered slot)",
    )
    parser.add_argument(
        "--image-protocol",
        choices=IMAGE_STANDIN_PROTOCOLS,
        default="openai",
        help="the protocol the image stand-ins are registered with (a1111: txt2img, with "
        "progress and running cancel)",
    )
    parser.add_argument(
        "--speech-servers", type=int, default=1, help="stand-in speech endpoints (PocketSphinx)"
    )
    parser.add_argument(
        "--cog-server",
        action="store_true",
        help="also run the real Cog server (.venv-cog; `make venv` builds it) as a cog endpoint",
    )
    parser.add_argument(
        "--cog-step-delay", type=float, default=None, help="seconds per step of the Cog model"
    )
    parser.add_argument(
        "--cog-callback",
        action="store_true",
        help="the Cog endpoint in callback mode (webhooks to this gateway; no Lambda waits)",
    )
    parser.add_argument(
        "--invocation-log",
        type=Path,
        default=None,
        help="append each Lambda invocation (function, start, end: epoch seconds) as a JSON line",
    )
    parser.add_argument(
        "--docker-ports",
        action="store_true",
        help="moto on 5000 and image stand-ins on 8001+, as events/env.local.json expects; "
        "speech stand-ins on 8101+",
    )
    parser.add_argument(
        "--no-s3-events",
        action="store_true",
        help="do not emulate the template's S3 -> EventBridge rules (no bucket polling)",
    )
    parser.add_argument(
        "--s3-poll-interval",
        type=float,
        default=0.2,
        help="seconds between the S3 -> EventBridge emulation's bucket listings",
    )
    parser.add_argument(
        "--schedule-speedup", type=float, default=1.0, help="run schedules N times faster"
    )
    parser.add_argument(
        "--param", action="append", default=[], help="template parameter NAME=VALUE"
    )
    parser.add_argument("--env", action="append", default=[], help="extra function env NAME=VALUE")
    parser.add_argument("--state-file", type=Path, help="write URLs and resource names here")
    parser.add_argument(
        "--no-iam",
        action="store_true",
        help="run every function with full rights (moto's default) instead of its role's",
    )
    parser.add_argument(
        "--warm-all",
        action="store_true",
        help="start a warm worker for every function (default: only event-driven ones; "
        "functions behind the HTTP and WebSocket APIs start cold on their first request)",
    )
    parser.add_argument("--no-demo-user", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no function logs")
    parser.add_argument("--raw-logs", action="store_true", help="function logs as emitted")
    args = parser.parse_args(argv)
    if args.docker_ports:
        args.moto_port = args.moto_port or DOCKER_MOTO_PORT
    return StackOptions(
        port=args.port,
        moto_port=args.moto_port,
        ws_port=args.ws_port,
        image_servers=args.image_servers,
        image_latency_s=args.image_latency,
        comfyui_servers=args.comfyui_servers,
        image_capacity=args.image_capacity,
        image_protocol=args.image_protocol,
        image_port_base=IMAGE_PORT_BASE_FOR_DOCKER if args.docker_ports else 0,
        speech_servers=args.speech_servers,
        speech_port_base=SPEECH_PORT_BASE_FOR_DOCKER if args.docker_ports else 0,
        cog_server=args.cog_server,
        cog_step_delay_s=args.cog_step_delay,
        cog_callback=args.cog_callback,
        invocation_log=args.invocation_log,
        s3_events=not args.no_s3_events,
        s3_poll_interval_s=args.s3_poll_interval,
        schedule_speedup=args.schedule_speedup,
        parameters=_pairs(args.param, "param"),
        function_env=_pairs(args.env, "env"),
        state_file=args.state_file,
        demo_user=not args.no_demo_user,
        quiet=args.quiet,
        raw_logs=args.raw_logs,
        warm_all=args.warm_all,
        iam=not args.no_iam,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    running = start_stack(options)
    print(banner(running), flush=True)
    try:
        stopping.wait()
    finally:
        print("[local] stopping", flush=True)
        running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
