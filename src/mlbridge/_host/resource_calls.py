"""Host-owned resources as calls: create, execute, stream and delete them through the pools.

:class:`ResourceCalls` is the resource half of :class:`~.host.Host`: it builds a record's live
copy on whichever worker a call lands on (rebuilding it from config + saved state when that
worker's copy is missing or stale), saves the state replies carry, and queues deletes on every
worker holding a copy (see :mod:`.resources` for the records themselves). Runs on the host's
event loop, over the same :class:`~.callpath.Call` path as every other call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from . import calls
from .callpath import Call, retry_undelivered
from .pool import Pool, Worker
from .resources import HostResource, ResourceStore
from .sessions import SessionStore
from .telemetry import Telemetry

if TYPE_CHECKING:
    from ..config import BridgeConfig

__all__ = ["ResourceCalls"]


class ResourceCalls:
    if TYPE_CHECKING:
        resources: ResourceStore
        sessions: SessionStore
        pools: dict[str, Pool]
        telemetry: Telemetry

        @property
        def configs(self) -> Mapping[str, BridgeConfig]: ...

        def config_for(self, name: str) -> BridgeConfig: ...

        def pool(self, name: str) -> Pool: ...

    def _call(
        self,
        pool: Pool,
        command: str,
        session_id: str | None,
        *,
        prefer: str | None = None,
        caller: Worker | None = None,
    ) -> Call:
        """The one call path (see :mod:`.callpath`): ``async with self._call(...) as worker``."""
        return Call(
            pool,
            command,
            session_id,
            self.sessions,
            self.telemetry.request,
            prefer=prefer,
            caller=caller,
        )

    async def _stream_on(
        self,
        pool: Pool,
        worker: Worker,
        command: str,
        args: dict[str, Any],
        timeout: float | None,
        session_id: str | None,
        final: list[Any] | None,
    ) -> AsyncIterator[Any]:
        """A streaming call on a checked-out worker: its chunks; then what the final reply
        carries is kept (see Pool.absorb) and its result appended to ``final``."""
        replies: list[dict[str, Any]] = []
        async for chunk in calls.stream(
            worker.channel,
            command,
            args,
            timeout=timeout,
            session_id=session_id,
            cancel_grace=pool.cfg.options.cancel_grace,
            replies=replies,
        ):
            yield chunk
        if replies:
            pool.absorb(worker, replies[0])
            if final is not None:
                final.append(replies[0].get("result"))

    async def create_resource(
        self,
        framework: str,
        rtype: str,
        config: dict[str, Any],
        *,
        session_id: str | None = None,
        resource_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        self.config_for(framework)
        rec = self.resources.new(
            framework, rtype, config, session_id=session_id, resource_id=resource_id
        )
        pool = self.pool(framework)

        async def attempt(left: float | None) -> None:
            async with self._call(pool, f"create_{rtype}", session_id) as worker:
                await self._build(worker, rec, left)

        opts = pool.cfg.options
        await retry_undelivered(opts.timeout if timeout is None else timeout, attempt)
        self.resources.add(rec)
        session = self.sessions.for_call(session_id, framework)
        if session is not None:
            session.resources.add(rec.id)
        return rec.id

    async def _build(self, worker: Worker, rec: HostResource, timeout: float | None) -> None:
        opts = self.configs[rec.framework].options
        await worker.channel.request(
            f"create_{rec.type}",
            rec.build_args(),
            timeout=opts.timeout if timeout is None else timeout,
            cancel_grace=opts.cancel_grace,
        )
        worker.resources[rec.id] = rec.version
        worker.pending_deletes.discard(rec.id)

    async def _built_missing(
        self, worker: Worker, reply: dict[str, Any], timeout: float | None
    ) -> bool:
        """A ``resource_not_found`` failure naming a host-owned resource of this worker's
        framework: build it on ``worker`` (True: run the command again)."""
        if reply.get("error_code") != "resource_not_found":
            return False
        details = reply.get("details")
        rid = details.get("resource_id") if isinstance(details, dict) else None
        rec = self.resources.records.get(rid) if isinstance(rid, str) else None
        if rec is None or rec.framework != worker.channel.bridge:
            return False
        worker.resources.pop(rec.id, None)
        await self._build(worker, rec, timeout)
        return True

    async def _ensure_built(self, worker: Worker, rec: HostResource, timeout: float | None) -> None:
        if worker.resources.get(rec.id) != rec.version:
            await self._build(worker, rec, timeout)

    async def execute_resource(
        self,
        framework: str,
        rid: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        command: str = "execute_resource",
        extra_args: dict[str, Any] | None = None,
    ) -> Any:
        rec = self.resources.get(framework, rid)
        pool = self.pool(framework)
        opts = pool.cfg.options
        session_id = session_id or rec.session_id
        args: dict[str, Any] = {"resource_id": rid, "inputs": inputs or {}}
        if extra_args:
            args.update(extra_args)

        async def attempt(left: float | None) -> Any:
            async with self._call(pool, command, session_id, prefer=rec.last_worker) as worker:
                for first in (True, False):
                    await self._ensure_built(worker, rec, left)
                    reply = await calls.call(
                        worker.channel,
                        command,
                        args,
                        timeout=left,
                        session_id=session_id,
                        cancel_grace=opts.cancel_grace,
                    )
                    if first and reply.get("error_code") == "resource_not_found":
                        worker.resources.pop(rid, None)  # our bookkeeping was stale: rebuild
                        continue
                    break
                result = pool.result_of(worker, reply)
                rec.executed_on(worker.id)
                return result

        return await retry_undelivered(opts.timeout if timeout is None else timeout, attempt)

    async def stream_resource(
        self,
        framework: str,
        rid: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        final: list[Any] | None = None,
    ) -> AsyncIterator[Any]:
        """``execute_resource`` as a stream: the resource type's chunks, then its final output."""
        rec = self.resources.get(framework, rid)
        pool = self.pool(framework)
        opts = pool.cfg.options
        session_id = session_id or rec.session_id
        async with self._call(pool, "execute_resource", session_id, prefer=rec.last_worker) as w:
            await self._ensure_built(w, rec, timeout)
            args = {"resource_id": rid, "inputs": inputs or {}}
            limit = opts.timeout if timeout is None else timeout
            async for chunk in self._stream_on(
                pool, w, "execute_resource", args, limit, session_id, final
            ):
                yield chunk
            rec.executed_on(w.id)

    def list_resources(
        self,
        framework: str | None = None,
        rtype: str | None = None,
        *,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.resources.listing(framework, rtype, session_id)

    async def delete_resource(self, framework: str, rid: str) -> dict[str, Any]:
        pool = self.pools.get(framework)
        rec, copies = self.resources.remove(framework, rid, pool.workers if pool else ())
        self.sessions.forget_resource(rid)
        if pool is not None:
            await pool.service_idle_now()  # idle workers drop their copy now, busy ones later
        return {"resource_id": rec.id, "status": "deleted", "copies": copies}
