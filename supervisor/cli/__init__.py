"""node-supervisor: the one console command.

node-supervisor [--config FILE] [global flags] run | generate | status | ping | reload | events | logs | plan | keys | envs create|check | install-service
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from datetime import datetime
from typing import Any

from workers.protocol import ExitCode
from workers.protocol.messages import Sampling

from ..config import ConfigError, Settings, find_config_file, load_settings, unknown_environment_variables

CONNECT_TIMEOUT_S = 5.0  # how long a command waits for a daemon that may not be running


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node-supervisor", description="Keeps local LLM inference running on this node."
    )
    parser.add_argument(
        "--config",
        help="TOML config file (default: $NODESUP_CONFIG, ~/.config/node-supervisor/config.toml, /etc/node-supervisor/config.toml)",
    )
    parser.add_argument("--state-dir", help="environments, sockets and logs")
    parser.add_argument("--data-dir", help="models")
    parser.add_argument("--client-endpoint", help="ZeroMQ endpoint clients connect to")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--no-create-envs", action="store_true", help="do not create missing engine environments")
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible HTTP API there (overrides [http] listen; see docs/HTTP.md)",
    )
    _add_generate(commands.add_parser("generate", help="generate text, streaming it to the terminal"))
    status = commands.add_parser("status", help="engines, workers, queues, latency")
    status.add_argument("--json", action="store_true")
    status.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S)
    events = commands.add_parser("events", help="watch worker states, restarts, switches and probes live")
    events.add_argument(
        "--topic", action="append", default=[], help="topic prefix, e.g. worker. (repeatable; default: all)"
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--count", type=int, help="exit after this many events")
    events.add_argument("--timeout", type=float, help="exit after this many seconds")
    _add_logs(
        commands.add_parser("logs", help="the daemon's log: filter it, follow it (-f), as readable lines or JSON")
    )
    ping = commands.add_parser("ping", help="check that the daemon answers")
    ping.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S)
    reload = commands.add_parser(
        "reload", help="read the configuration again; engines whose settings changed restart without losing requests"
    )
    reload.add_argument("--json", action="store_true")
    reload.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S)
    _add_plan(
        commands.add_parser("plan", help="what each engine would get on this node's GPU, and why (starts nothing)")
    )
    _add_keys(
        commands.add_parser(
            "keys", help="CURVE keys of tcp endpoints: the server's key and the authorized clients; add, make, remove"
        )
    )
    service = commands.add_parser(
        "install-service", help="write the systemd unit for this checkout and print the systemctl commands"
    )
    service.add_argument("--dry-run", action="store_true", help="print the unit instead of writing it")
    service.add_argument("--user", help="the user the daemon runs as (default: the current user)")
    service.add_argument("--unit-dir", default="/etc/systemd/system")
    service.add_argument(
        "--unit-config",
        default="/etc/node-supervisor/config.toml",
        help="the config file the unit passes to the daemon",
    )
    envs = commands.add_parser("envs", help="per-engine virtual environments")
    env_commands = envs.add_subparsers(dest="envs_command", required=True)
    for name, text in (("create", "create or update environments"), ("check", "report what each environment has")):
        sub = env_commands.add_parser(name, help=text)
        sub.add_argument(
            "names", nargs="*", metavar="NAME", help="environment names (default: those the configured engines use)"
        )
    return parser


def _add_generate(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--system", help="system message (with --chat)")
    hints = typing.get_type_hints(Sampling)
    for f in dataclasses.fields(Sampling):  # one flag per sampling field, as the protocol defines it
        flag, hint, text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help")
        if hint is bool:
            gen.add_argument(flag, action="store_true", default=None, help=text)
        elif typing.get_origin(hint) is tuple:
            gen.add_argument(flag, action="append", help=text)
        elif typing.get_origin(hint) is dict:  # logit_bias: TOKEN=BIAS, repeatable
            gen.add_argument(flag, action="append", type=_token_value, metavar="TOKEN=VALUE", help=text)
        elif hint == dict[str, Any] | None:  # response_format: JSON
            gen.add_argument(flag, type=json.loads, metavar="JSON", help=text)
        elif hint == str | None:
            gen.add_argument(flag, help=text)
        else:
            gen.add_argument(flag, type=float if float in (hint, *typing.get_args(hint)) else int, help=text)
    gen.add_argument("--engine", help="pin an engine by name")
    gen.add_argument("--deadline-ms", type=int)
    gen.add_argument("--no-stream", action="store_true", help="one reply at the end")
    gen.add_argument("--json", action="store_true", help="print every event as a JSON line")
    gen.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help="seconds to wait for the daemon to answer at all",
    )
    gen.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each event once the daemon answered"
    )


def _token_value(text: str) -> tuple[str, float]:
    token, _, value = text.partition("=")
    try:
        return token, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOKEN=NUMBER") from None


def _add_keys(keys: argparse.ArgumentParser) -> None:
    sub = keys.add_subparsers(dest="keys_command")
    add = sub.add_parser("add", help="authorize a client's public key")
    add.add_argument("name", help="a name for the client (letters, digits, '.', '-', '_')")
    add.add_argument(
        "public_key",
        metavar="KEY",
        help="its public key (40 characters of Z85), or a file holding it (NAME.key or NAME.key_secret)",
    )
    sub.add_parser("new", help="make a client key pair and authorize it; prints where its secret file is").add_argument(
        "name"
    )
    sub.add_parser("remove", help="stop accepting a client's key").add_argument("name")


def _mib(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _add_plan(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--engine", help="only this engine")
    plan.add_argument(
        "--gpu-memory", type=_mib, metavar="MIB", help="plan for one hypothetical GPU of this size with nothing on it"
    )
    plan.add_argument(
        "--reserve",
        type=_mib,
        metavar="MIB",
        help="MiB held back per GPU for other services (overrides [gpu] reserve_mib)",
    )
    plan.add_argument("--json", action="store_true")


def _add_logs(logs: argparse.ArgumentParser) -> None:
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines, across rotations (Ctrl-C stops)"
    )
    logs.add_argument(
        "--engine", metavar="NAME", help="lines about this engine (their engine field, or a worker id NAME.N)"
    )
    logs.add_argument(
        "--worker", metavar="ID", help="lines about this worker (worker_id, e.g. llama.1), its own output included"
    )
    logs.add_argument("--level", choices=["debug", "info", "warning", "error", "critical"], help="this level and above")
    logs.add_argument("--request", metavar="ID", help="lines about this request (request_id)")
    logs.add_argument(
        "--since", type=_since, metavar="TIME", help="an ISO time (no zone: local time) or an age: 30s, 10m, 2h, 1d, 1w"
    )
    logs.add_argument("--json", action="store_true", help="the JSON lines exactly as written, for tools")


def _since(text: str) -> datetime:
    from ..logs_reader import parse_since

    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"node-supervisor: config error: {exc}", file=sys.stderr)
        if args.command == "reload":
            print(
                "node-supervisor: reload refused: the running daemon was not asked and keeps its configuration",
                file=sys.stderr,
            )
        return ExitCode.CONFIG
    if args.command != "run":  # the daemon logs these itself
        for name in unknown_environment_variables(os.environ):
            print(f"node-supervisor: warning: {name} is not a setting; ignored", file=sys.stderr)
    return COMMANDS[args.command](settings, args)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from ..daemon.run import run_daemon  # the daemon's modules load only for `run`

    return run_daemon(settings, create_envs=settings.create_envs and not args.no_create_envs)


def _envs(settings: Settings, args: argparse.Namespace) -> int:
    from .envs_command import envs_command

    return envs_command(settings, args.envs_command, args.names)


def _events(settings: Settings, args: argparse.Namespace) -> int:
    from .events_command import watch_events

    return watch_events(settings, args)


def _logs(settings: Settings, args: argparse.Namespace) -> int:
    from .logs_command import logs_command

    return logs_command(settings, args)


def _plan(settings: Settings, args: argparse.Namespace) -> int:
    from .plan_command import plan_command

    return plan_command(settings, args)


def _client(settings: Settings, args: argparse.Namespace) -> int:
    from .client_commands import client_command

    return client_command(settings, args)


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from .keys_command import keys_command

    return keys_command(settings, args)


def _install_service(settings: Settings, args: argparse.Namespace) -> int:
    from .service_command import install_service

    return install_service(args)


# One entry per command; each command's code lives in its own module.
COMMANDS = {
    "run": _run,
    "envs": _envs,
    "events": _events,
    "logs": _logs,
    "plan": _plan,
    "generate": _client,
    "status": _client,
    "ping": _client,
    "reload": _client,
    "keys": _keys,
    "install-service": _install_service,
}


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag in ("state_dir", "data_dir", "client_endpoint", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    if getattr(args, "http", None) is not None:  # run --http: merged into the file's [http] table
        overrides["http"] = {"listen": args.http}
    return load_settings(find_config_file(args.config), overrides)
