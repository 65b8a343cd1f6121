"""`node-supervisor ps | load NAME [--keep-alive S] | unload NAME|--all | models`: models on this node."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from workers import protocol as p

from ..client import Client
from ..config import Settings
from .client_commands import with_daemon
from .output import print_json

MIB = 1 << 20


def add_parsers(commands: Any, connect_timeout_s: float) -> None:
    ps = commands.add_parser("ps", help="loaded models: device, GPU memory measured and planned, RAM, idle, unload in")
    models = commands.add_parser("models", help="every model this node can serve, loaded or not, and bad files")
    load = commands.add_parser("load", help="load a model now (it then stays --keep-alive seconds when idle)")
    load.add_argument("name", help="the engine (model) name")
    load.add_argument("--keep-alive", help='seconds, or a duration ("5m", "1h"); negative: for ever')
    load.add_argument("--no-wait", action="store_true", help="return once the load has started")
    unload = commands.add_parser("unload", help="unload a model (its running requests finish first)")
    target = unload.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?", help="the engine (model) name")
    target.add_argument("--all", action="store_true", help="every loaded model")
    for parser in (ps, models, load, unload):
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--timeout", type=float, default=connect_timeout_s)
    load.set_defaults(load_timeout=600.0)


def models_command(settings: Settings, args: argparse.Namespace) -> int:
    return with_daemon(settings, args.timeout, lambda client: _models_command(client, args))


def _models_command(client: Client, args: argparse.Namespace) -> int:
    if args.command == "load":
        return _load(client, args)
    if args.command == "unload":
        reply = client.unload(None if args.all else args.name)
        return _answer(reply, args, _format_unload)
    reply = client.ps()
    return _answer(reply, args, format_ps if args.command == "ps" else format_models)


def _answer(reply: dict[str, Any], args: argparse.Namespace, formatter: Any) -> int:
    if args.json:
        print_json(reply)
    elif reply["event"] == p.EVENT_ERROR:
        print(f"node-supervisor: {reply['code']}: {reply['message']}", file=sys.stderr)
    else:
        print(formatter(reply))
    return 1 if reply["event"] == p.EVENT_ERROR else 0


def _load(client: Client, args: argparse.Namespace) -> int:
    """Ask for the load; unless --no-wait, follow ps until the model is loaded (or cannot be)."""
    reply = client.load(args.name, args.keep_alive)
    if reply["event"] == p.EVENT_ERROR or args.no_wait:
        return _answer(reply, args, lambda r: f"{r['engine']}: {r['state']}")
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        model = next((m for m in client.ps()["models"] if m["engine"] == args.name), None)
        if model is None or model["state"] == "ready" or model["state"] not in ("spawning", "loading", "waiting"):
            break
        time.sleep(0.2)
    if model is None:
        print(f"node-supervisor: {args.name} is gone", file=sys.stderr)
        return 1
    if args.json:
        print_json(model)
    else:
        print(f"{args.name}: {model['state']}" + (f" ({model['reason']})" if model["state"] != "ready" else ""))
    return 0 if model["state"] == "ready" else 1


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}s" if value < 120 else f"{value / 60:.0f}m"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def format_ps(reply: dict[str, Any]) -> str:
    """As `ollama ps`: the models that hold memory now."""
    rows = [["NAME", "MODEL", "DEVICE", "GPU MiB", "PLANNED", "RAM MiB", "STATE", "IDLE", "UNLOAD IN"]]
    for m in reply["models"]:
        if m["state"] not in ("spawning", "loading", "ready", "stopping"):
            continue
        devices = m.get("devices") or ([m["device"]] if m["device"] is not None else [])
        device = f"GPU {'+'.join(str(d) for d in devices)}" if devices else "-"
        split = m.get("device_mib") or []
        planned = "+".join(str(x) for x in split) if len(split) > 1 else _mib(m["gpu_bytes_planned"])
        unload = "never" if m["keep_alive_s"] < 0 and m["loaded"] else _seconds(m["unload_in_s"])
        rows.append(
            [
                m["engine"],
                Path(m["model"]).name,
                device,
                _mib(m["gpu_bytes_measured"]),
                planned,
                _mib(m["rss_bytes"]),
                m["state"],
                _seconds(m["idle_for_s"]),
                unload,
            ]
        )
    return _table(rows) if len(rows) > 1 else "no model is loaded"


def format_models(reply: dict[str, Any]) -> str:
    """Every model: name, kind, state (loaded, available, waiting, failed), the file; then the bad ones."""
    rows = [["NAME", "KIND", "STATE", "KEEP ALIVE", "MODEL"]]
    for m in reply["models"]:
        state = {"ready": "loaded", "stopped": "available"}.get(m["state"], m["state"])
        keep = "never" if m["keep_alive_s"] < 0 else _seconds(m["keep_alive_s"])
        rows.append([m["engine"], m["kind"], state, keep, m["model"]])
    lines = [_table(rows)]
    for bad in reply.get("unavailable", []):
        lines.append(f"unavailable: {bad['path']}: {bad['reason']}")
    lines += [f"warning: {problem}" for problem in reply.get("problems", [])]
    return "\n".join(lines)


def _format_unload(reply: dict[str, Any]) -> str:
    if not reply["engines"]:
        return "no model was loaded"
    return "\n".join(
        f"{e['engine']}: " + ("unloading once its requests have finished" if e["pending"] else e["state"])
        for e in reply["engines"]
    )
