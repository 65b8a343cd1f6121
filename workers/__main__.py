"""python -m workers --engine KIND --endpoint ENDPOINT --worker-id ID [--heartbeat-interval S]

Started by the daemon with the interpreter of the engine's own environment.
Never writes protocol to stdout: llama.cpp and engine libraries print there.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .protocol import ExitCode


def main(argv: list[str] | None = None) -> int:
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

    from .runtime import WorkerRuntime, exit_with_parent

    exit_with_parent()
    runtime = WorkerRuntime(args.engine, args.endpoint, args.worker_id, args.heartbeat_interval)
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())
