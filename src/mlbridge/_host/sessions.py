"""Sessions: resources grouped with a preferred worker (affinity) and an idle TTL.

A session belongs to one framework. Every call made with it (execute, stream, resources,
create_resource) marks it used and moves its affinity to the worker that served the call (or
off it, if that worker died). A call-back made *from* a session's worker into another bridge
carries the session id for the worker's benefit, but never moves the affinity: the session's
worker belongs to its own framework's pool. Expired sessions are found by :meth:`expired`; the
host closes them (deleting their resources). Owned by the host's event loop.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..errors import InvalidRequestError

__all__ = ["SessionState", "SessionStore"]


@dataclass(slots=True)
class SessionState:
    id: str
    framework: str
    ttl: float | None = None
    worker_id: str | None = None
    resources: set[str] = field(default_factory=set)
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    def used(self, worker_id: str | None) -> None:
        """A call of this session ran on ``worker_id`` (None: that worker is gone)."""
        self.worker_id = worker_id
        self.last_used = time.monotonic()


class SessionStore:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionState] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, framework: str, ttl: float | None, session_id: str | None) -> SessionState:
        sid = session_id or f"session_{uuid.uuid4().hex[:12]}"
        if sid in self.sessions:
            raise InvalidRequestError(f"session {sid!r} already exists")
        s = self.sessions[sid] = SessionState(sid, framework, ttl)
        return s

    def for_call(self, session_id: str | None, framework: str) -> SessionState | None:
        """The session whose affinity a call on ``framework`` follows and updates (None for a
        call-back into another framework that merely carries the caller's session id)."""
        if session_id is None:
            return None
        s = self.sessions.get(session_id)
        return s if s is not None and s.framework == framework else None

    def pop(self, session_id: str) -> SessionState | None:
        return self.sessions.pop(session_id, None)

    def forget_resource(self, rid: str) -> None:
        for s in self.sessions.values():
            s.resources.discard(rid)

    def forget_workers(self, framework: str) -> None:
        """The framework's pool was replaced: no session may prefer one of its old workers."""
        for s in self.sessions.values():
            if s.framework == framework:
                s.worker_id = None

    def expired(self, now: float | None = None) -> list[SessionState]:
        now = time.monotonic() if now is None else now
        return [
            s for s in self.sessions.values() if s.ttl is not None and now - s.last_used > s.ttl
        ]
