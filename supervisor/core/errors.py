"""What a client is told when its message is not taken: an error event with a code, never a traceback.

``InvalidMessage`` (core/validate.py and core/tool_validation.py check): the message itself is wrong (a field
missing, of the wrong type, out of range).  ``Refused``: the message is valid
but the daemon will not take it now (its queue is full, no engine can serve,
it is stopping, the id is in use, the configuration file a reload read is
invalid).  Both are ``ClientError``s, answered the same way.
"""

from __future__ import annotations


class ClientError(Exception):
    """A message answered with ``code`` and ``message`` (the one line the client reads) instead of being taken."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidMessage(ClientError):
    """A message that is wrong in itself, refused with ``code`` (``message`` names the field)."""


class Refused(ClientError):
    """A valid message the daemon will not take now."""
