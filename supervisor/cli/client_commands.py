"""`node-supervisor generate|status|ping`: the CLI side of the Python client."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workers import protocol as p

from .cli import print_json
from .client import Client, ClientTimeout
from .config import Settings

EX_UNAVAILABLE = 69


def client_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        with Client(settings.client_endpoint or "", timeout_s=args.timeout) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "status":
                reply = client.status()
                print_json(reply) if args.json else print(format_status(reply))
                return 0
            reply = client.ping()
            print(f"pong: daemon {reply.get('version')}, protocol {reply.get('protocol')}")
            return 0
    except ClientTimeout as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


def _generate(client: Client, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"stream": not args.no_stream}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "engine", "deadline_ms"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
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
                print(f"\n[{event['finish_reason']}: {event['usage']['completion_tokens']} tokens, "
                      f"ttft {event['timings']['ttft_ms']} ms, total {event['timings']['total_ms']} ms, engine {event['engine']}]",
                      file=sys.stderr)
            else:
                print(f"\nerror {event['code']}: {event['message']}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        if request_id:
            client.cancel(request_id)
            print("\n[cancelled]", file=sys.stderr)
        return 130
    return 0


def watch_events(settings: Settings, args: argparse.Namespace) -> int:
    """Print events from the daemon's PUB socket as they happen."""
    import time

    import zmq

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in args.topic or [""]:
        sub.setsockopt_string(zmq.SUBSCRIBE, topic)
    sub.connect(settings.events_endpoint or "")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    try:
        while args.count is None or seen < args.count:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not sub.poll(wait_ms):
                break
            topic, payload = sub.recv_multipart()
            event = p.decode(payload)
            seen += 1
            if args.json:
                print(json.dumps(event, ensure_ascii=False), flush=True)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event.pop("time", time.time())))
                event.pop("topic", None)
                details = " ".join(f"{k}={v}" for k, v in event.items() if v is not None and k != "last_lines")
                print(f"{stamp} {topic.decode()} {details}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        context.term()
    return 0


def format_status(reply: dict[str, Any]) -> str:
    daemon = reply["daemon"]
    lines = [f"daemon pid {daemon['pid']}  version {daemon['version']}  uptime {daemon['uptime_s']}s  endpoint {daemon['client_endpoint']}"]
    if daemon.get("active_engine"):
        lines.append(f"unpinned traffic goes to: {daemon['active_engine']}")
    for engine in reply["engines"]:
        latency = engine["latency"]
        lines.append(
            f"engine {engine['name']} ({engine['kind']}, priority {engine['priority']}, {engine['standby']}): {engine['state']}"
            + (f" - {engine['reason']}" if engine["reason"] else "")
        )
        lines.append(f"  model {engine['model']}")
        lines.append(
            f"  queue {engine['queue_depth']}/{engine['max_queue']}  in flight {engine['in_flight']}  served {engine['served']}  failed {engine['failed']}"
        )
        lines.append(
            f"  ttft p50/p95 {latency['ttft_ms']['p50']}/{latency['ttft_ms']['p95']} ms  "
            f"per-token p50/p95 {latency['per_token_ms']['p50']}/{latency['per_token_ms']['p95']} ms  ({latency['ttft_ms']['samples']} samples)"
        )
        for worker in engine["workers"]:
            rss = f"{worker['rss_bytes'] / 2**20:.0f} MiB" if worker["rss_bytes"] else "-"
            lines.append(
                f"  worker {worker['id'] or '-'}: {worker['state']}  pid {worker['pid'] or '-'}  rss {rss}  uptime {worker['uptime_s'] or '-'}s  restarts {worker['restarts']}"
            )
            if worker.get("last_exit"):
                lines.append(f"    last exit: {worker['last_exit']['cause']}")
    return "\n".join(lines)
