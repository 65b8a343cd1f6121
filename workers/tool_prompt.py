"""Tools and tool messages as plain chat messages, for a chat template that knows nothing of tools.

A model's own template renders tools when it can (llama.cpp: a GGUF Jinja template that reads ``tools``).
A template without tool support (and llama.cpp's built-in templates, which take role and content only)
gets the conversation rewritten here, the way llama-server's and Ollama's generic tool formats do:

* the tools go into the system message (added, or put before the existing one's text): their JSON
  descriptions and the instruction to answer with only ``{"name": ..., "arguments": {...}}``, which the
  plain-JSON rule of workers/protocol/tool_calls.py reads back;
* an assistant's tool calls become that same JSON as its text (after any content it had);
* a tool result (role ``tool``) becomes a user message: ``Tool result (call ID): CONTENT``.

``tool_choice`` none leaves the tools out (the model is not told of them; nothing is parsed); required or a
named function says the answer must be a call (the grammar then enforces it).  Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from .protocol.tool_calls import forced_name

INSTRUCTION = (
    "You can call the following tools (functions). To call one, answer with only a JSON object of the form "
    '{"name": <the tool\'s name>, "arguments": <an object of its arguments>} and nothing else; to call several, '
    "a JSON list of such objects. WHEN\n\nTools:\n"
)
WHEN_AUTO = "When no tool is needed, answer normally."
WHEN_REQUIRED = "You must call one of them."


def tools_as_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any
) -> list[dict[str, str]]:
    """``messages`` as role/content pairs of system, user and assistant, the tools described in the system
    message (unless tool_choice is none or there are none)."""
    out = [_plain(message) for message in messages]
    if not tools or tool_choice == "none":
        return out
    only = forced_name(tool_choice)
    described = [tool["function"] for tool in tools if only is None or tool["function"]["name"] == only]
    when = WHEN_AUTO if tool_choice in (None, "auto") else WHEN_REQUIRED
    system = INSTRUCTION.replace("WHEN", when) + json.dumps(described, indent=2, ensure_ascii=False)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": system + "\n\n" + out[0]["content"]}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _plain(message: dict[str, Any]) -> dict[str, str]:
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        head = f"Tool result ({call_id})" if call_id else "Tool result"
        return {"role": "user", "content": f"{head}: {message['content']}"}
    calls = message.get("tool_calls")
    if not calls:
        return {"role": message["role"], "content": message["content"] or ""}
    said = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    text = json.dumps(said[0] if len(said) == 1 else said, ensure_ascii=False)
    return {"role": "assistant", "content": f"{message['content']}\n{text}" if message["content"] else text}


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face tool templates read them: an assistant's calls with ``arguments`` an object
    (as the protocol has them) and its content a string ("" when it had none)."""
    return [
        {**message, "content": message["content"] or ""} if message.get("tool_calls") else message
        for message in messages
    ]
