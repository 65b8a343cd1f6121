"""`node-supervisor generate|status|ping|reload`: the CLI side of the Python client."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from workers import protocol as p
from workers.protocol import ExitCode
from workers.protocol.messages import SAMPLING_FIELDS

from ..client import Client, ClientTimeout
from ..config import Settings
from ..node.keys import KeysError, local_curve
from .output import format_reload, format_status, print_json


NOT_SERVING = 3  # `status`: the daemon answers, but no engine can serve now (as `systemctl is-active`'s 3)


def client_command(settings: Settings, args: argparse.Namespace) -> int:
    return with_daemon(settings, args.timeout, lambda client: _client_command(client, args))


def with_daemon(settings: Settings, timeout_s: float, action: Callable[[Client], int]) -> int:
    """Run ``action`` with a client of this node's daemon: at once 69 when no daemon socket is there,
    78 when this node's CURVE keys cannot be read, 69 when the daemon does not answer in time."""
    endpoint = settings.client_endpoint or ""
    if _socket_file_missing(endpoint):
        print(
            f"node-supervisor: no daemon socket at {endpoint[6:]}: is the daemon running (`node-supervisor run`, "
            "or `systemctl status node-supervisor`), and is this its state directory (--state-dir, --service)?",
            file=sys.stderr,
        )
        return ExitCode.UNAVAILABLE
    try:
        curve = local_curve(settings, settings.client_endpoint)  # tcp: CURVE with this node's keys
    except KeysError as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        with Client(endpoint, timeout_s=timeout_s, curve=curve) as client:
            return action(client)
    except ClientTimeout as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE


def _client_command(client: Client, args: argparse.Namespace) -> int:
    if args.command == "generate":
        return _generate(client, args)
    if args.command == "embed":
        return _embed(client, args)
    if args.command == "chat":
        from .chat_command import chat

        return chat(client, args)
    if args.command == "status":
        reply = client.status()
        print_json(reply) if args.json else print(format_status(reply))
        return 0 if reply["daemon"].get("serving", True) else NOT_SERVING
    if args.command == "reload":
        return _reload(client, args)
    reply = client.ping()
    print(f"pong: daemon {reply.get('version')}, protocol {reply.get('protocol')}, {reply.get('phase')}")
    return 0


def _embed(client: Client, args: argparse.Namespace) -> int:
    """The embeddings event as one JSON line (vectors in argument order); an error to stderr, exit 1."""
    reply = client.embed(list(args.text), **({"engine": args.engine} if args.engine else {}))
    if reply["event"] != p.EVENT_EMBEDDINGS:
        print(f"node-supervisor: error {reply.get('code')}: {reply.get('message')}", file=sys.stderr)
        return 1
    print(json.dumps({key: reply[key] for key in ("embeddings", "usage", "engine")}))
    return 0


def _socket_file_missing(endpoint: str) -> bool:
    """An ipc endpoint whose file is not there: no daemon, known at once (not after the connect timeout)."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return False
    try:
        Path(endpoint[len("ipc://") :]).lstat()
    except FileNotFoundError:
        return True
    except OSError:  # not allowed to look: the connection attempt will say more
        return False
    return False


def _reload(client: Client, args: argparse.Namespace) -> int:
    """Exit 0 when applied; 78 (as at start-up) when the file is invalid and nothing changed."""
    reply = client.reload()
    if args.json:
        print_json(reply)
    elif reply["event"] == p.EVENT_RELOADED:
        print(format_reload(reply))
    else:
        print(f"node-supervisor: reload refused, the running configuration stays: {reply['message']}", file=sys.stderr)
    if reply["event"] == p.EVENT_RELOADED:
        return 0
    return ExitCode.CONFIG if reply.get("code") == p.ErrorCode.INVALID_CONFIG else 1


def _generate(client: Client, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"stream": not args.no_stream}
    for name in (*SAMPLING_FIELDS, "engine", "deadline_ms", "keep_alive"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if "logit_bias" in fields:  # TOKEN=VALUE pairs
        fields["logit_bias"] = dict(fields["logit_bias"])
    # A generate's first event may rightly take long (a queue, a model loading);
    # whether a daemon answers at all is known in a moment.
    client.receive(client.send({"op": p.OP_PING}), timeout_s=args.connect_timeout)
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        request_id = client.send({"op": p.OP_GENERATE, "messages": messages, **fields})
    else:
        request_id = client.send({"op": p.OP_GENERATE, "prompt": prompt, **fields})
    try:
        for event in client.events(request_id):
            if args.json:
                print(json.dumps(event, ensure_ascii=False), flush=True)
            elif event["event"] == p.EVENT_TOKEN:
                print(event["text"], end="", flush=True)
            elif event["event"] == p.EVENT_DONE:
                print(event.get("text", ""), end="")
                for call in event.get("tool_calls") or ():  # one line per call: NAME ARGUMENTS-JSON
                    print(f"\n{call['function']['name']} {json.dumps(call['function']['arguments'])}", end="")
                print(
                    f"\n[{event['finish_reason']}: {event['usage']['completion_tokens']} tokens, "
                    f"ttft {event['timings']['ttft_ms']} ms, total {event['timings']['total_ms']} ms, engine {event['engine']}]",
                    file=sys.stderr,
                )
            else:
                print(f"\nerror {event['code']}: {event['message']}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:  # before the first event too, and with --no-stream: the daemon stops generating
        client.cancel(request_id)
        print("\n[cancelled]", file=sys.stderr)
        return 130
    except BrokenPipeError:  # nobody reads the rest: stop generating it (cli/__init__.py ends quietly)
        client.cancel(request_id)
        raise
    return 0
