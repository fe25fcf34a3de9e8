"""Call-backs: a worker's ``{"cb": ...}`` frame becomes an ordinary host call on the target
bridge (with the caller's session id, which never moves that session's affinity), and its reply,
chunks or failure go back to the worker keyed ``"cb"``. The pool's checkout refuses, with a clear
error, a call-back that could only deadlock (every worker of the target waiting on call-backs)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .._protocol.messages import MessageError
from .._protocol.wire_errors import failure_from_exception
from ..errors import InvalidRequestError
from .channel import WorkerChannel
from .connection import Connection
from .pool import Worker
from .tracecontext import parent_context

if TYPE_CHECKING:
    from .host import Host

__all__ = ["route_callback"]


def _worker_of(host: Host, channel: WorkerChannel) -> Worker | None:
    pool = host.pools.get(channel.bridge)
    return pool.worker_of(channel) if pool is not None else None


async def route_callback(host: Host, channel: WorkerChannel, msg: dict[str, Any]) -> None:
    try:
        req = Connection.parse_callback(msg)
    except MessageError as exc:
        channel.send_callback_reply(
            failure_from_exception(
                exc.id, InvalidRequestError(str(exc)), with_traceback=False
            ).to_wire("cb")
        )
        return
    caller = _worker_of(host, channel)
    if caller is not None:
        caller.waiting_on_callbacks += 1
    # A traced caller's context: the call-back's span continues its trace.
    parent = parent_context.set(req.context)
    try:
        if req.stream:
            final: list[Any] = []
            async for chunk in host.stream(
                req.bridge,
                req.command,
                req.args,
                session_id=req.session_id,
                timeout=req.timeout,
                caller=caller,
                final=final,
            ):
                channel.send_callback_reply({"cb": req.cb, "chunk": chunk})
            result = final[0] if final else None
        else:
            result = await host.execute(
                req.bridge,
                req.command,
                req.args,
                session_id=req.session_id,
                timeout=req.timeout,
                caller=caller,
            )
        channel.send_callback_reply({"cb": req.cb, "success": True, "result": result})
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        channel.send_callback_reply(failure_from_exception(req.cb, exc).to_wire("cb"))
    finally:
        parent_context.reset(parent)
        if caller is not None:
            caller.waiting_on_callbacks -= 1
