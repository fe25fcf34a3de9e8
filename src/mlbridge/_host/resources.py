"""Host-owned resources: the records that are the truth, of which workers hold caches.

Theory of operation
-------------------
``create_resource`` records ``(framework, type, config)`` under an id before any worker sees it.
A worker's live object is a cache tagged with the record's *version* (``Worker.resources``:
id -> version). Running a resource on a worker whose copy is missing or stale first rebuilds it
from the record (config + last saved state); a reply carrying ``resource_states`` saves the new
state and bumps the version, so the worker that produced it is current and every other copy is
stale. Calls can therefore go to any worker, and a crashed or recycled worker loses nothing.
Deleting a record queues the delete on every worker holding a copy (idle workers drop it at once,
busy ones before their next call).

The :class:`ResourceStore` is owned by the host's event loop; nothing here does I/O.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._redact import redact
from ..errors import InvalidRequestError, ResourceNotFoundError

if TYPE_CHECKING:
    from .pool import Worker

__all__ = ["HostResource", "ResourceStore", "apply_patch"]


@dataclass(slots=True)
class HostResource:
    id: str
    framework: str
    type: str
    config: dict[str, Any]
    session_id: str | None = None
    state: Any = None
    version: int = 1
    created_at: float = field(default_factory=time.time)
    execution_count: int = 0
    last_executed: float | None = None
    last_worker: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "resource_id": self.id,
            "framework": self.framework,
            "type": self.type,
            "config": redact(self.config),  # API keys in a config are never shown
            "session_id": self.session_id,
            "has_state": self.state is not None,
            "version": self.version,
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "last_executed": self.last_executed,
        }

    def build_args(self) -> dict[str, Any]:
        """The ``create_<type>`` arguments that rebuild this resource on a worker."""
        args: dict[str, Any] = {
            "resource_id": self.id,
            "config": self.config,
            "session_id": self.session_id,
        }
        if self.state is not None:
            args["state"] = self.state
        return args

    def executed_on(self, worker_id: str) -> None:
        self.execution_count += 1
        self.last_executed = time.time()
        self.last_worker = worker_id


class ResourceStore:
    def __init__(self) -> None:
        self.records: dict[str, HostResource] = {}

    def __len__(self) -> int:
        return len(self.records)

    def new(
        self,
        framework: str,
        rtype: str,
        config: Any,
        *,
        session_id: str | None,
        resource_id: str | None,
    ) -> HostResource:
        """A record for a resource about to be built (added with :meth:`add` once it is)."""
        if not isinstance(config, dict):
            raise InvalidRequestError(
                f"resource config must be a dict, got {type(config).__name__}"
            )
        rid = resource_id or f"{rtype}_{uuid.uuid4().hex[:12]}"
        if rid in self.records:
            raise InvalidRequestError(f"a resource with id {rid!r} already exists; delete it first")
        return HostResource(rid, framework, rtype, dict(config), session_id)

    def add(self, rec: HostResource) -> None:
        self.records[rec.id] = rec

    def get(self, framework: str, rid: str) -> HostResource:
        rec = self.records.get(rid)
        if rec is None or rec.framework != framework:
            raise ResourceNotFoundError(
                f"no {framework!r} resource with id {rid!r}; create it with create_resource first",
                resource_id=rid,
            )
        return rec

    def remove(
        self, framework: str, rid: str, workers: Iterable[Worker]
    ) -> tuple[HostResource, int]:
        """Drop the record; queue the delete on every worker holding a copy (returned count)."""
        rec = self.get(framework, rid)
        del self.records[rid]
        copies = 0
        for w in workers:
            if w.resources.pop(rid, None) is not None:
                w.pending_deletes.add(rid)
                copies += 1
        return rec, copies

    def save_states(self, worker: Worker, states: Any) -> None:
        """A reply's ``resource_states``: new saved state, new version; ``worker`` is current.

        A state of the form ``{"$patch": [[path, value], ...]}`` changes only the parts of the
        saved state it names (``path``: keys into nested objects; ``value`` None deletes), so
        two workers changing different parts of one resource at once (say, two sessions' chat
        histories) both keep their change. The worker stays current only if its copy was
        current before the patch; otherwise it rebuilds from the merged record before its next
        call on the resource."""
        if not isinstance(states, dict):
            return
        for rid, state in states.items():
            rec = self.records.get(rid)
            if rec is None:
                continue
            patch = state.get("$patch") if isinstance(state, dict) and len(state) == 1 else None
            if isinstance(patch, list):
                current = worker.resources.get(rid) == rec.version
                rec.state = apply_patch(rec.state, patch)
                rec.version += 1
                if current:
                    worker.resources[rid] = rec.version
                continue
            rec.state = state
            rec.version += 1
            worker.resources[rid] = rec.version

    def listing(
        self, framework: str | None, rtype: str | None, session_id: str | None
    ) -> list[dict[str, Any]]:
        return [
            r.snapshot()
            for r in self.records.values()
            if (framework is None or r.framework == framework)
            and (rtype is None or r.type == rtype)
            and (session_id is None or r.session_id == session_id)
        ]


def apply_patch(state: Any, patch: list[Any]) -> dict[str, Any]:
    """``state`` (a dict, else treated as empty) with each ``[path, value]`` of ``patch`` set
    (``value`` None: removed); entries that are not ``[list of str, value]`` are skipped."""
    out: dict[str, Any] = dict(state) if isinstance(state, dict) else {}
    for entry in patch:
        if not (isinstance(entry, list | tuple) and len(entry) == 2):
            continue
        path, value = entry
        if not (isinstance(path, list | tuple) and path and all(isinstance(k, str) for k in path)):
            continue
        node = out
        for key in path[:-1]:
            child = node.get(key)
            node[key] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return out
