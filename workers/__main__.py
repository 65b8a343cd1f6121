"""python -m workers --engine KIND --endpoint ENDPOINT --worker-id ID [--heartbeat-interval S]

Started by the daemon with the interpreter of the engine's own environment,
with its per-spawn secret in NODESUP_WORKER_SECRET (see protocol/) and, on
a tcp worker endpoint, its CURVE keys in NODESUP_WORKER_CURVE.
Never writes protocol to stdout: llama.cpp and engine libraries print there.

Order matters: the secret and the keys leave the environment before any engine code
runs, and the engine library is imported before pyzmq (runtime.py imports
it), because a CUDA build of llama.cpp crashed when a ZeroMQ context existed
before it was loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .engine import prepare_engine
from .process import exit_with_parent, take_curve_keys, take_secret
from .protocol import ExitCode


def main(argv: list[str] | None = None) -> int:
    secret, curve = take_secret(), take_curve_keys()
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--engine", required=True, help="engine kind, e.g. llamacpp")
    parser.add_argument("--endpoint", required=True, help="the daemon's worker endpoint")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return ExitCode.USAGE if exc.code else ExitCode.OK
    if args.heartbeat_interval <= 0:
        parser.print_usage(sys.stderr)
        return ExitCode.USAGE
    # One line per record on stderr; the daemon re-logs each line with the worker's id.
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    exit_with_parent()  # before the engine's import, which can take seconds
    prepared = prepare_engine(args.engine)

    import zmq  # only now, with the engine loaded

    from .runtime import WorkerRuntime

    if curve is not None and not zmq.has("curve"):
        sys.stderr.write(
            "worker: the tcp worker endpoint takes CURVE, and this environment's pyzmq has no CURVE support\n"
        )
        return ExitCode.UNAVAILABLE

    runtime = WorkerRuntime(
        prepared, args.endpoint, args.worker_id, args.heartbeat_interval, secret=secret, curve=curve
    )
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())
