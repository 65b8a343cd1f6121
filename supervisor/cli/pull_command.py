"""`node-supervisor pull REPO[:QUANT|FILE]`: a GGUF model from the Hugging Face Hub (supervisor/node/pull.py)."""

from __future__ import annotations

import argparse
import sys

from ..config import Settings
from ..config.discovery import engine_name
from ..node.pull import PullError, pull


def pull_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        pulled = pull(settings, args.model, progress=not args.quiet)
    except PullError as exc:
        print(f"node-supervisor: pull: {exc}", file=sys.stderr)
        return exc.code
    checked = f"SHA-256 {pulled.sha256[:12]}… checked" if pulled.sha256 else "no SHA-256 listed to check"
    print(f"pulled {pulled.repo} {pulled.filename}: {pulled.path} ({pulled.size / 2**20:.1f} MiB, {checked})")
    name = engine_name(pulled.path.stem)
    if pulled.path.parent in settings.model_dirs:  # models_dir: the file is an engine of its own name
        print(
            f"engine {name} (loaded on demand): `node-supervisor reload` if the daemon runs, then e.g.\n"
            f"  node-supervisor generate --engine {name} 'Hello'      (HTTP model: {name} or {pulled.path.stem})"
        )
    else:
        print(
            "serve it as an engine (in the config file, then `node-supervisor reload`):\n"
            f'  [engines.{name}]\n  kind = "llamacpp"\n  model = "{pulled.path}"'
        )
    return 0
