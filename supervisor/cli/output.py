"""How the CLI prints what the daemon answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


NO_DATA = "–"  # a figure with nothing measured yet (no request, no worker)


def _ms(p50: float | None, p95: float | None) -> str:
    if p50 is None and p95 is None:
        return NO_DATA
    return f"{NO_DATA if p50 is None else p50}/{NO_DATA if p95 is None else p95} ms"


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def format_status(reply: dict[str, Any]) -> str:
    daemon = reply["daemon"]
    lines = [
        f"daemon pid {daemon['pid']}  version {daemon['version']}  uptime {daemon['uptime_s']}s  endpoint {daemon['client_endpoint']}"
    ]
    if daemon.get("phase") and daemon["phase"] != "serving":
        progress = f": {daemon['progress']}" if daemon.get("progress") else ""
        lines.append(f"{daemon['phase']}{progress}")
    if daemon.get("active_engine"):
        lines.append(f"unpinned traffic goes to: {daemon['active_engine']}")
    if daemon.get("metrics_url"):
        lines.append(f"metrics: {daemon['metrics_url']}")
    for engine in reply["engines"]:
        latency = engine["latency"]
        lines.append(
            f"engine {engine['name']} ({engine['kind']}, priority {engine['priority']}, {engine['standby']}): {engine['state']}"
            + (f" - {engine['reason']}" if engine["reason"] else "")
        )
        lines.append(f"  model {engine['model']}")
        chosen = (engine.get("plan") or {}).get("chosen")
        if chosen:
            devices = chosen.get("devices") or [chosen["device"]]
            gpus = f"GPUs {'+'.join(str(d) for d in devices)}" if len(devices) > 1 else f"GPU {devices[0]}"
            where = f"{gpus}, {chosen['layers']} layers" if chosen["n_gpu_layers"] else "CPU"
            lines.append(
                f"  plan: {Path(chosen['path']).name} on {where}, n_ctx {chosen['n_ctx']}, {chosen['cache_type']} KV cache"
            )
        lines += [f"  warning: {warning}" for warning in engine.get("warnings", [])]
        lines.append(
            f"  queue {engine['queue_depth']}/{engine['max_queue']}  in flight {engine['in_flight']}  served {engine['served']} (cancelled {engine.get('cancelled', 0)})  failed {engine['failed']}"
        )
        lines.append(_accounting(engine["tokens"], engine["cost"]))
        ttft, per_token = latency["ttft_ms"], latency["per_token_ms"]
        lines.append(
            f"  ttft p50/p95 {_ms(ttft['p50'], ttft['p95'])}  per-token p50/p95 {_ms(per_token['p50'], per_token['p95'])}"
            f"  ({ttft['samples']} samples)"
        )
        for worker in engine["workers"]:
            rss = f"{worker['rss_bytes'] / 2**20:.0f} MiB" if worker["rss_bytes"] else NO_DATA
            if worker.get("gpu_memory_bytes"):
                rss += f"  gpu {worker['gpu_memory_bytes'] / 2**20:.0f} MiB"
            uptime = NO_DATA if worker["uptime_s"] is None else f"{worker['uptime_s']}s"
            lines.append(
                f"  worker {worker['id'] or NO_DATA}: {worker['state']}  pid {worker['pid'] or NO_DATA}  rss {rss}  uptime {uptime}  restarts {worker['restarts']}"
            )
            lines += _llama_settings(worker.get("model") or {})
            if worker.get("last_exit"):
                failure = worker.get("failure") or worker.get("load_failure")
                why = f" ({failure['message']})" if failure and failure.get("message") else ""
                lines.append(f"    last exit: {worker['last_exit']['cause']}{why}")
    return "\n".join(lines)


def _accounting(tokens: dict[str, int], cost: dict[str, Any]) -> str:
    """Tokens since start and today; what they cost, for an engine with prices or a budget."""
    line = f"  tokens prompt/generated {tokens['prompt']}/{tokens['completion']}, today {tokens['prompt_today']}/{tokens['completion_today']}"
    if cost["price_input_per_mtok"] or cost["price_output_per_mtok"] or cost["daily_budget"] is not None:
        line += f"  cost today {cost['today']:g}, total {cost['total']:g}"
        if cost["daily_budget"] is not None:
            line += f"  budget {cost['daily_budget']:g}" + (
                " spent: takes no traffic until the day turns" if cost["budget_exhausted"] else ""
            )
    return line


def format_reload(reply: dict[str, Any]) -> str:
    """What a reload did, one line per kind of change that happened."""
    labels = (
        ("restarted", "restarting (load settings changed)"),
        ("updated", "updated in place"),
        ("added", "added"),
        ("removed", "removed (draining)"),
        ("unchanged", "unchanged"),
        ("applied", "settings applied"),
    )
    lines = ["configuration reloaded"]
    lines += [f"  {label}: {', '.join(reply[key])}" for key, label in labels if reply.get(key)]
    if reply.get("needs_restart"):
        lines.append(f"  needs a daemon restart to change: {', '.join(reply['needs_restart'])}")
    return "\n".join(lines)


def _llama_settings(model: dict[str, Any]) -> list[str]:
    """llama.cpp's threads, batch sizes and flash attention as the worker reports them in force."""
    if model.get("n_threads") is None:
        return []
    return [
        f"    llama.cpp: {model['n_threads']} threads, {model['n_threads_batch']} for prompts, n_batch {model['n_batch']}, "
        f"n_ubatch {model['n_ubatch']}, flash attention {'on' if model['flash_attn'] else 'off'}"
    ]
