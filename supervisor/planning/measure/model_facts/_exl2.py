"""An EXL2 model directory: shape from config.json, sizes from the safetensors headers."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from ._common import ModelFacts, ModelFactsError

_EXL2_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def read_exl2(path: Path) -> ModelFacts:
    """Facts of an EXL2 directory: shape from config.json, sizes from the safetensors headers."""
    config = _load_config(path)
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict) or "bits" not in quant:
        raise ModelFactsError(f"{path}: config.json has no quantization_config with bits: not an EXL2 model")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFactsError(f"{path}: no *.safetensors files")
    sizes: dict[str, int] = {}
    for f in files:
        sizes.update(_safetensors_sizes(f))
    try:
        return _exl2_facts(path, config, quant, sizes, sum(f.stat().st_size for f in files))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelFactsError(f"{path}: config.json lacks or garbles {exc}") from None


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFactsError(f"{path}: no config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelFactsError(f"{path}: unreadable config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFactsError(f"{path}: config.json is not an object")
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def _safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes from a safetensors header (an 8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelFactsError(f"{path}: not a safetensors file: {exc}") from None


def _exl2_facts(path: Path, config: dict, quant: dict, sizes: dict[str, int], file_bytes: int) -> ModelFacts:
    """ExLlamaV2 caches every layer at full length, so swa_layers is 0 even for SWA models."""
    n_layer, n_embd, n_head = (
        int(config["num_hidden_layers"]),
        int(config["hidden_size"]),
        int(config["num_attention_heads"]),
    )
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    layers = [0] * n_layer
    embd = output = other = 0
    for name, size in sizes.items():
        m = _EXL2_LAYER_RE.match(name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += size
        elif name.startswith("model.embed_tokens."):
            embd += size
        elif name.startswith("lm_head."):
            output += size
        else:
            other += size
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelFacts(
        path=str(path),
        format="exl2",
        architecture=str(archs[0]),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_ctx_train=int(config.get("max_position_embeddings") or 0),
        n_vocab=int(config["vocab_size"]),
        sliding_window=config.get("sliding_window") or None,
        swa_layers=0,
        file_type=None,
        file_bytes=file_bytes,
        layer_bytes=tuple(layers),
        token_embd_bytes=embd,
        output_bytes=output,
        other_bytes=other,
        bits=float(quant["bits"]),
        head_bits=int(quant["head_bits"]) if quant.get("head_bits") is not None else None,
    )
