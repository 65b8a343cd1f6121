"""Serving one embed request: the engine's vectors, or its error, back to the daemon.

Used by both serving loops (runtime.py one request at a time, batch.py between
two steps): an embed request is served whole when it is taken, since an
engine in embedding mode batches the request's own inputs into each decode.
While it runs, heartbeats say ``PHASE_EMBEDDING`` with the time of the last
decode, which is how the daemon tells a long embed from a stalled one.
"""

from __future__ import annotations

import time
import traceback

from . import protocol as p
from .conversation import Conversation
from .engine import EngineFailed, RequestError
from .protocol.messages import PHASE_EMBEDDING, Done, Embed, Embeddings, Usage


def serve_embed(conversation: Conversation, engine: object, request: Embed) -> None:
    """Exactly one answer for ``request``: embeddings, an error, or done "cancelled" when it was stopped."""
    rid, activity = request.request_id, conversation.activity
    started = time.monotonic()
    deadline = started + request.deadline_ms / 1000 if request.deadline_ms else None
    activity.update(phase=PHASE_EMBEDDING, request_id=rid, tokens=0, last_token_at=started)

    def progress(tokens: int) -> bool:
        now = time.monotonic()
        activity["tokens"] += tokens
        activity["last_token_at"] = now
        conversation.read_commands()
        return conversation.stopping or rid in conversation.cancelled or (deadline is not None and now >= deadline)

    embed = getattr(engine, "embed", None)
    try:
        if embed is None:
            raise RequestError(p.ErrorCode.UNSUPPORTED_PARAMETER, "input: this engine does not embed")
        result = embed(request, progress)
    except RequestError as exc:
        conversation.send_error(rid, exc.code, exc.message)
    except EngineFailed:
        raise
    except Exception as exc:
        traceback.print_exc()
        conversation.send_error(rid, p.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    else:
        elapsed_ms = round((time.monotonic() - started) * 1000, 3)
        if result is None:  # stopped between two decodes
            conversation.send(Done(request_id=rid, finish_reason=p.FINISH_CANCELLED, usage=Usage()))
        else:
            conversation.send(
                Embeddings(
                    request_id=rid,
                    vectors=tuple(tuple(v) for v in result.vectors),
                    usage=Usage(prompt_tokens=result.prompt_tokens),
                    timings={"embed_ms": elapsed_ms},
                )
            )
    finally:
        conversation.forget(rid)
        activity.update(phase="idle", request_id=None)
