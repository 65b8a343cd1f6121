"""`node-supervisor events`: print the daemon's event feed as it happens."""

from __future__ import annotations

import argparse
import json
import sys
import time

import zmq

from workers import protocol as p
from workers.protocol import ExitCode

from ..client import CurveKeys
from ..config import Settings
from ..node.keys import KeysError, local_curve

TOPIC_FEED_SUBSCRIBED = "feed.subscribed"  # the daemon's answer to each new subscription


def _subscribe(context: zmq.Context, endpoint: str, topics: list[str], curve: CurveKeys | None) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sub)
    for topic in topics:
        sub.setsockopt_string(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def watch_events(settings: Settings, args: argparse.Namespace) -> int:
    """Print events from the daemon's feed as they happen; "watching" on stderr once the subscription is in place."""
    try:
        curve = local_curve(settings, settings.events_endpoint)  # tcp: CURVE with this node's keys
    except KeysError as exc:
        print(f"node-supervisor: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    context = zmq.Context()
    topics = args.topic or [""]
    sub = _subscribe(context, settings.events_endpoint or "", [*topics, TOPIC_FEED_SUBSCRIBED], curve)
    watching = False
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    try:
        while args.count is None or seen < args.count:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not sub.poll(wait_ms):
                break
            topic, payload = sub.recv_multipart()
            event = p.decode(payload)
            if topic.decode() == TOPIC_FEED_SUBSCRIBED:
                if not watching:  # the daemon has our subscription: nothing from now on is missed
                    watching = True
                    print(f"watching {settings.events_endpoint}", file=sys.stderr, flush=True)
                if not any(TOPIC_FEED_SUBSCRIBED.startswith(t) for t in topics):
                    continue
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
