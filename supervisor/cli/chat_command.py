"""`node-supervisor chat [ENGINE]`: an interactive conversation, as `ollama run`.

Each line typed is a user message; the reply streams back and both stay in
the conversation, which is sent whole with every turn.  Ctrl-C during a
reply cancels it (the conversation goes on without it); Ctrl-D, Ctrl-C at
the prompt, or ``/bye`` ends the chat; ``/clear`` starts the conversation
again.  Reading from a pipe works the same, without the prompt.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workers import protocol as p

from ..client import Client

HELP = "/bye (or Ctrl-D) ends the chat, /clear forgets the conversation, Ctrl-C stops a reply"


def chat(client: Client, args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    client.receive(client.send({"op": p.OP_PING}), timeout_s=args.connect_timeout)  # a daemon answers at all
    system = [{"role": "system", "content": args.system}] if args.system else []
    conversation: list[dict[str, str]] = []
    fields: dict[str, Any] = {"stream": True}
    for name in ("engine", "max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if interactive:
        print(f"chatting with {args.engine or 'the default engine'}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/bye":
            return 0
        if text == "/clear":
            conversation.clear()
            continue
        conversation.append({"role": "user", "content": line})
        reply, error = _turn(client, system + conversation, fields)
        if error is not None:
            conversation.pop()  # the daemon refused it: not part of the conversation
            print(f"error {error['code']}: {error['message']}", file=sys.stderr)
            if not interactive:
                return 1
            continue
        if reply is None:  # cancelled
            conversation.pop()
            continue
        conversation.append({"role": "assistant", "content": reply})


def _turn(
    client: Client, messages: list[dict[str, str]], fields: dict[str, Any]
) -> tuple[str | None, dict[str, Any] | None]:
    """One reply streamed to the terminal: (its text, None), (None, the error event), or (None, None) when cancelled."""
    request_id = client.send({"op": p.OP_GENERATE, "messages": messages, **fields})
    text: list[str] = []
    try:
        for event in client.events(request_id):
            if event["event"] == p.EVENT_TOKEN:
                text.append(event["text"])
                print(event["text"], end="", flush=True)
            elif event["event"] == p.EVENT_DONE:
                print(flush=True)
                if event.get("finish_reason") == p.FINISH_CANCELLED:
                    return None, None
                return "".join(text), None
            else:
                if text:
                    print(flush=True)
                return None, event
    except KeyboardInterrupt:
        client.cancel(request_id)
        for event in client.events(request_id):  # up to its end, so the next turn starts clean
            if event["event"] in p.TERMINAL_EVENTS:
                break
        print("\n[cancelled]", file=sys.stderr)
    return None, None
