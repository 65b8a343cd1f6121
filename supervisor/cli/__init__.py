"""node-supervisor: the one console command.

node-supervisor [--config FILE] [global flags] run | generate | chat | status | ping | reload | ps | load | unload | models | pull | events | logs | plan | keys | envs create|check | install-service
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

from .. import __version__
from ..config import (
    SERVICE_CONFIG_FILE,
    ConfigError,
    Settings,
    find_config_file,
    load_settings,
    unknown_environment_variables,
)

CONNECT_TIMEOUT_S = 5.0  # how long a command waits for a daemon that may not be running


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node-supervisor", description="Keeps local LLM inference running on this node."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_flags(parser, None)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--no-create-envs", action="store_true", help="do not create missing engine environments")
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible HTTP API there (overrides [http] listen; see docs/HTTP.md)",
    )
    _add_generate(commands.add_parser("generate", help="generate text, streaming it to the terminal"))
    _add_chat(commands.add_parser("chat", help="an interactive conversation with an engine (as `ollama run`)"))
    embed = commands.add_parser(
        "embed", help="embed texts with an engine in embedding mode; prints the vectors as JSON"
    )
    embed.add_argument("text", nargs="+", help="one input per argument")
    embed.add_argument("--engine", help="an engine with embedding = true (default: the first that embeds)")
    embed.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
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
    from .models_command import add_parsers as add_model_parsers

    add_model_parsers(commands, CONNECT_TIMEOUT_S)
    _add_plan(
        commands.add_parser("plan", help="what each engine would get on this node's GPU, and why (starts nothing)")
    )
    _add_keys(
        commands.add_parser(
            "keys", help="CURVE keys of tcp endpoints: the server's key and the authorized clients; add, make, remove"
        )
    )
    service = commands.add_parser(
        "install-service",
        help="write the systemd unit, its config file when absent, and the service user; print the systemctl commands",
    )
    service.add_argument("--dry-run", action="store_true", help="print the unit instead of writing anything")
    service.add_argument(
        "--user", help="run the daemon as this existing user (default: the system user node-supervisor, created)"
    )
    service.add_argument(
        "--root", help="install under this directory instead of / (the unit's paths included), e.g. to stage an image"
    )
    service.add_argument("--unit-dir", help="where the unit goes (default: <root>/etc/systemd/system)")
    service.add_argument(
        "--unit-config",
        help="the config file the unit passes to the daemon (default: <root>/etc/node-supervisor/config.toml)",
    )
    pull = commands.add_parser(
        "pull", help="download a GGUF model from the Hugging Face Hub into the data directory (HF_TOKEN, HF_ENDPOINT)"
    )
    pull.add_argument(
        "model", metavar="REPO[:QUANT|FILE]", help="e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M (default: Q4_K_M)"
    )
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    envs = commands.add_parser("envs", help="per-engine virtual environments")
    env_commands = envs.add_subparsers(dest="envs_command", required=True)
    for name, text in (("create", "create or update environments"), ("check", "report what each environment has")):
        sub = env_commands.add_parser(name, help=text)
        sub.add_argument(
            "names", nargs="*", metavar="NAME", help="environment names (default: those the configured engines use)"
        )
    for sub in _subcommand_parsers(parser):
        _add_global_flags(sub, argparse.SUPPRESS)  # also after the command, e.g. `status --state-dir D`
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """The flags every command takes; on a subcommand they default to nothing, so the main parser's stand."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        default=default,
        help="TOML config file (default: $NODESUP_CONFIG, ~/.config/node-supervisor/config.toml, /etc/node-supervisor/config.toml)",
    )
    where.add_argument(
        "--service",
        action="store_true",
        default=default if default is not None else False,
        help=f"use the system service's config file ({SERVICE_CONFIG_FILE}), as `install-service` wrote it",
    )
    parser.add_argument("--state-dir", default=default, help="environments, sockets and logs")
    parser.add_argument("--data-dir", default=default, help="models")
    parser.add_argument("--client-endpoint", default=default, help="ZeroMQ endpoint clients connect to")
    parser.add_argument("--log-level", default=default, choices=["debug", "info", "warning", "error"])


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += [sub, *_subcommand_parsers(sub)]
    return found


def _add_chat(chat: argparse.ArgumentParser) -> None:
    chat.add_argument("engine", nargs="?", help="the engine (default: the one the daemon chooses)")
    chat.add_argument("--system", help="a system message for the whole conversation")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S)
    chat.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each event of a reply")


def _add_generate(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", help="the prompt; - reads it from standard input")
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
        elif hint in (dict[str, Any] | None, tuple[dict[str, Any], ...] | None):  # response_format, tools: JSON
            gen.add_argument(flag, type=json.loads, metavar="JSON", help=text)
        elif hint is Any:  # tool_choice: a word (required) or JSON (a named function)
            gen.add_argument(flag, type=_word_or_json, metavar="WORD|JSON", help=text)
        elif hint == str | None:
            gen.add_argument(flag, help=text)
        else:
            gen.add_argument(flag, type=float if float in (hint, *typing.get_args(hint)) else int, help=text)
    gen.add_argument("--engine", help="pin an engine by name")
    gen.add_argument("--deadline-ms", type=int)
    gen.add_argument("--keep-alive", help='how long the model stays loaded once idle: seconds or "5m"; 0: unload after')
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


def _word_or_json(text: str) -> Any:
    """JSON when it parses (an object), else the word as it is (auto, none, required)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


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


def _count(text: str) -> int:
    return _mib(text)


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
        "-n",
        "--lines",
        type=_count,
        metavar="N",
        help="only the last N matching lines of the past (with -f the default is 10, as tail -f)",
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
    try:
        return COMMANDS[args.command](settings, args)
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing of its own to undo: no traceback
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `generate … | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + 13  # as a process ended by SIGPIPE


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


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from .models_command import models_command

    return models_command(settings, args)


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from .keys_command import keys_command

    return keys_command(settings, args)


def _pull(settings: Settings, args: argparse.Namespace) -> int:
    from .pull_command import pull_command  # huggingface_hub loads only for `pull`

    return pull_command(settings, args)


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
    "embed": _client,
    "chat": _client,
    "status": _client,
    "ping": _client,
    "reload": _client,
    "ps": _models,
    "load": _models,
    "unload": _models,
    "models": _models,
    "keys": _keys,
    "install-service": _install_service,
    "pull": _pull,
}


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag in ("state_dir", "data_dir", "client_endpoint", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    if getattr(args, "http", None) is not None:  # run --http: merged into the file's [http] table
        overrides["http"] = {"listen": args.http}
    return load_settings(find_config_file(SERVICE_CONFIG_FILE if args.service else args.config), overrides)
