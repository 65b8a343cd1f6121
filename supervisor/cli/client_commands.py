"""`node-supervisor generate|status|ping|reload`: the CLI side of the Python client."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workers import protocol as p
from workers.protocol import ExitCode
from workers.protocol.messages import SAMPLING_FIELDS

from ..client import Client, ClientTimeout
from ..config import Settings
from ..node.keys import KeysError, local_curve
from .output import format_reload, format_status, print_json


def client_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        curve = local_curve(settings, settings.client_endpoint)  # tcp: CURVE with this node's keys
    except KeysError as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        with Client(settings.client_endpoint or "", timeout_s=args.timeout, curve=curve) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "status":
                reply = client.status()
                print_json(reply) if args.json else print(format_status(reply))
                return 0
            if args.command == "reload":
                return _reload(client, args)
            reply = client.ping()
            print(f"pong: daemon {reply.get('version')}, protocol {reply.get('protocol')}")
            return 0
    except ClientTimeout as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE


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
    for name in (*SAMPLING_FIELDS, "engine", "deadline_ms"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if "logit_bias" in fields:  # TOKEN=VALUE pairs
        fields["logit_bias"] = dict(fields["logit_bias"])
    # A generate's first event may rightly take long (a queue, a model loading);
    # whether a daemon answers at all is known in a moment.
    client.receive(client.send({"op": p.OP_PING}), timeout_s=args.connect_timeout)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        events = client.generate(messages=messages, **fields)
    else:
        events = client.generate(prompt=args.prompt, **fields)
    request_id = None
    try:
        for event in events:
            request_id = event.get("id")
            if args.json:
                print(json.dumps(event, ensure_ascii=False), flush=True)
            elif event["event"] == p.EVENT_TOKEN:
                print(event["text"], end="", flush=True)
            elif event["event"] == p.EVENT_DONE:
                print(event.get("text", ""), end="")
                print(
                    f"\n[{event['finish_reason']}: {event['usage']['completion_tokens']} tokens, "
                    f"ttft {event['timings']['ttft_ms']} ms, total {event['timings']['total_ms']} ms, engine {event['engine']}]",
                    file=sys.stderr,
                )
            else:
                print(f"\nerror {event['code']}: {event['message']}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        if request_id:
            client.cancel(request_id)
            print("\n[cancelled]", file=sys.stderr)
        return 130
    return 0
