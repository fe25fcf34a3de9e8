"""The ``dspy`` bridge: DSPy signatures, programs, LMs, optimisation, and the DSPex protocol.

Programs are resources of type ``program`` (see :mod:`._dspy_programs` for the config)::

    create_resource("dspy", "program", {"signature": "question -> answer",
                                        "program_type": "chain_of_thought"})
    execute_resource("dspy", rid, {"question": "..."})
      -> {"outputs": {...every output field, plus reasoning / trajectory...},
          "usage": {prompt_tokens, completion_tokens, total_tokens}, "execution_time": s,
          "worker_id": the worker that ran it}
    execute_resource("dspy", rid, {"batch": [{...}, {...}]}) -> {"results": [...], ...}
    execute_resource(..., stream=True) -> {"field", "delta", "predictor"} chunks, then the result

Commands (old DSPex names and shapes kept, see shared/DSPEX_COMPAT.md; new ones beside them):

* ``configure_lm {model, api_key?, temperature?, max_tokens?, cache?, provider?}`` or
  ``{class: "pkg.mod:LM", kwargs}``: the bridge-wide LM. It is bridge-wide *state*: the host records
  it and applies it to every current, replacement and overflow worker. No live test call is made;
  API keys are never returned. With no LM configured, programs use ``local:smollm2`` served by
  the Transformers pool through a call back to the host.
* ``create_program {id, signature, program_type, session_id}``, ``execute_program {program_id,
  inputs, session_id}``, ``list_programs``, ``get_program_info``, ``delete_program``,
  ``cleanup``, ``reset_state``, ``cleanup_session``, ``shutdown``, ``get_stats``, ``ping``.
* ``optimize {program, optimizer, trainset, input_keys?, metric?, params?}``: compiles the program
  here and reports its new state to the host with the reply, so every worker (and a replacement
  after a crash) runs the optimised program.
* ``save_program {program, path}`` / ``load_program {path, id?}``; ``get_lm``.
* ``run_program_spec {config, state, inputs}`` (internal): how a batch is spread over the pool
  (the worker that got the batch runs items itself and hands others, with the program's config and
  state, to the pool's other workers through the host).

Settings: ``lm`` (an LM spec applied at start), ``cache_dir`` (``DSPY_CACHEDIR``),
``disk_cache`` (default true), ``batch_concurrency`` (items handed to other workers at once,
default 3; 0 runs batches here only), ``log_level``.

Batch, theory of operation: the main thread owns DSPy and runs items itself; up to
``batch_concurrency`` helper threads each take the next item index from a shared deque (under a
lock) and hand it, with the program's config and state, to ``run_program_spec`` on the pool
through ``self.host.call`` (blocking, so one item per helper at a time). Results land by index in
a list sized up front, so order is kept whoever ran them. Helpers never touch DSPy. A helper
whose hand-off is refused (``CallbackError``: no other worker, no host) puts its item back and
stops; after joining the helpers the main thread runs whatever is left. The first failed item
(by index) is raised once all have finished.

Cancel: a ``cancel`` stops a running program before its next LM call (a DSPy callback raises
into the program) or at the next stream chunk. DSPy/LiteLLM failures are translated to
``invalid_configuration`` / ``model_error`` / ``rate_limit`` / ``timeout`` keeping their type and
text. DSPy is imported only in ``_initialize_framework``.

The old host's launch line, ``python .../dspy_bridge.py --mode pool-worker --worker-id w1``,
is served by ``mlbridge/bridges/dspy_bridge.py`` (also ``python -m mlbridge.bridges.dspy_bridge``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import (
    CallbackError,
    CancelledCallError,
    InvalidRequestError,
    ResourceNotFoundError,
)
from ._logs import setup_bridge_logging
from .base import BaseBridge, ResourceRecord, ResourceType, rss_bytes

if TYPE_CHECKING:
    from ._dspy_programs import Program

__all__ = ["DSPyBridge"]

logger = logging.getLogger("mlbridge.bridge.dspy")
DEFAULT_BATCH_CONCURRENCY = 3
DSPEX_TEMPERATURE = 0.7  # the old bridge's default for configure_lm
_SPEC_CACHE_SIZE = 16


class DSPyBridge(BaseBridge):
    name = "dspy"

    # ------------------------------------------------------------------ set-up
    def _initialize_framework(self) -> None:
        s = self.settings
        setup_bridge_logging(logger, s.get("log_level"), "WARNING")
        # LiteLLM would fetch its model price list from the network at import.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        if s.get("cache_dir"):
            os.environ["DSPY_CACHEDIR"] = str(s["cache_dir"])
        concurrency = s.get("batch_concurrency", DEFAULT_BATCH_CONCURRENCY)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
            from ..errors import InvalidConfigurationError

            raise InvalidConfigurationError(
                f"setting 'batch_concurrency' must be an integer >= 0, got {concurrency!r}"
            )
        self.batch_concurrency = concurrency

        import dspy

        from . import _dspy_errors, _dspy_lm, _dspy_optimize, _dspy_programs

        if s.get("disk_cache", True) is False:
            dspy.configure_cache(enable_disk_cache=False)
        self._dspy = dspy
        self._lm_mod = _dspy_lm
        self._programs = _dspy_programs
        self._optimize = _dspy_optimize
        self._errors = _dspy_errors
        self._lm_spec: dict[str, Any] | None = None
        self._lm: Any = None
        self._adapter_name: str | None = None  # bridge-wide adapter (configure_lm's "adapter")
        self._adapter: Any = None
        self._built: tuple[str, Any] | None = None  # the LM configure_lm just built, by spec
        self._default_lm: Any = None
        self._spec_cache: collections.OrderedDict[str, Program] = collections.OrderedDict()
        self._public_ids: dict[str, str] = {}  # record key -> the DSPex program id
        self._callbacks = [_dspy_programs.CancelCallback(self._cancelled)]  # on every LM built
        if s.get("lm") is not None:
            self.apply_bridge_state("lm", _dspy_lm.normalize_spec(s["lm"], where="settings.lm"))
        logger.info("dspy %s ready", dspy.__version__)

    def get_framework_info(self) -> dict[str, Any]:
        return {
            "name": "dspy",
            "version": self._dspy.__version__,
            "lm": self._lm_mod.public_spec(self._lm_spec),
            "default_lm": self._lm_mod.DEFAULT_LOCAL_MODEL,
            "program_types": ["predict", "chain_of_thought", "react", "module"],
            "optimizers": ["bootstrap_few_shot", "labeled_few_shot"],
            "adapters": sorted(self._programs.ADAPTERS),
            "capabilities": [
                "programs",
                "signatures",
                "streaming",
                "batch",
                "optimization",
                "dspex_protocol",
            ],
        }

    def ping_info(self) -> dict[str, Any]:
        return {"dspy_available": True}

    def _register_handlers(self) -> None:
        self.register_resource_type(
            ResourceType(
                "program",
                create=self._make_program,
                execute=self._execute,
                stream=self._stream,
                describe=lambda p: p.describe(),
            )
        )
        r = self.register_handler
        r("create_program", self._h_create_program)
        r("execute_program", self._h_execute_program)
        r("list_programs", self._h_list_programs)
        r("get_program_info", self._h_get_program_info)
        r("delete_program", self._h_delete_program)
        r("configure_lm", self._h_configure_lm)
        r(
            "get_lm",
            lambda a: {
                "lm": self._lm_mod.public_spec(self._lm_spec),
                "adapter": self._adapter_name,
            },
        )
        r("reset_state", self._h_reset_state)
        r("cleanup_session", self._h_cleanup_session)
        r("shutdown", self._h_shutdown)
        r("optimize", self._h_optimize)
        r("save_program", self._h_save_program)
        r("load_program", self._h_load_program)
        r("run_program_spec", self._h_run_program_spec)

    # ------------------------------------------------------------------ LMs
    def _host_client(self) -> Any:
        return self.host

    def apply_bridge_state(self, key: str, value: Any) -> None:
        if key == "adapter":
            self._adapter_name, self._adapter = self._programs.make_adapter(value)
            super().apply_bridge_state(key, value)
            return
        if key != "lm":
            super().apply_bridge_state(key, value)
            return
        if value is None:
            self._lm_spec, self._lm = None, None
            super().apply_bridge_state(key, None)
            return
        spec = self._lm_mod.normalize_spec(value)
        text = json.dumps(spec, sort_keys=True, default=str)
        built = self._built
        lm = built[1] if built is not None and built[0] == text else None
        self._built = None
        if lm is None:
            lm = self._lm_mod.build_lm(spec, self._host_client, self._callbacks)
        self._lm_spec, self._lm = spec, lm
        super().apply_bridge_state(key, self._lm_mod.public_spec(spec))

    def current_lm(self) -> Any:
        """The bridge-wide LM, or the local model through the host when none is configured."""
        if self._lm is not None:
            return self._lm
        if self._default_lm is None:
            lm = self._lm_mod.HostLM(self._host_client)
            lm.callbacks = list(self._callbacks)
            self._default_lm = lm
        return self._default_lm

    def _h_configure_lm(self, args: dict[str, Any]) -> dict[str, Any]:
        raw = {k: v for k, v in args.items() if k not in ("session_id", "adapter")}
        if "class" not in raw and raw.get("model") not in self._lm_mod.LOCAL_MODELS:
            raw.setdefault("temperature", DSPEX_TEMPERATURE)
        spec = self._lm_mod.normalize_spec(raw, where="configure_lm")
        adapter = args.get("adapter")
        if adapter is not None:
            self._programs.make_adapter(adapter)  # refuse a bad name before changing anything
        lm = self._lm_mod.build_lm(spec, self._host_client, self._callbacks)  # makes no call
        self._built = (json.dumps(spec, sort_keys=True, default=str), lm)
        self.set_bridge_state("lm", spec)
        if adapter is not None:
            self.set_bridge_state("adapter", adapter)
        shown = self._lm_mod.public_spec(spec) or {}
        return {
            "status": "configured",
            "model": args.get("model") or spec.get("class"),  # as given, like the old bridge
            "provider": spec.get("provider"),
            "temperature": spec.get("temperature"),
            "adapter": self._adapter_name,
            "lm": shown,
        }

    # ------------------------------------------------------------------ programs
    def _cancelled(self) -> bool:
        call = self._call
        return call is not None and call.cancelled

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Cancellation raised into DSPy becomes CancelledCallError; DSPy errors are translated.
        The bridge-wide adapter, if configured, applies inside (a program's own one wins)."""
        try:
            with self._errors.translating():
                if self._adapter is None:
                    yield
                else:
                    with self._dspy.context(adapter=self._adapter):
                        yield
        except self._programs.Cancelled as exc:
            call = self._call
            where = f"call {call.id} ({call.command})" if call is not None else "the call"
            raise CancelledCallError(f"{where} was cancelled before its next LM call") from exc

    def _make_program(self, config: dict[str, Any], state: Any) -> Program:
        with self._guard():
            return self._programs.make_program(config, state, self._host_client, self._callbacks)

    def _execute(self, prog: Program, inputs: dict[str, Any]) -> Any:
        if self._is_batch(prog, inputs):
            return self._batch(prog, inputs["batch"])
        with self._guard():
            out = self._programs.run_program(prog, inputs, self.current_lm())
        out["worker_id"] = self.worker_id
        return out

    def _stream(self, prog: Program, inputs: dict[str, Any]) -> Generator[Any, None, Any]:
        if self._is_batch(prog, inputs):
            raise InvalidRequestError("a batch cannot be streamed; send its items one by one")
        gen = self._programs.stream_program(prog, inputs, self.current_lm(), self._cancelled)
        with self._guard():
            result = yield from gen
        self.check_cancelled()
        result["worker_id"] = self.worker_id
        return result

    @staticmethod
    def _is_batch(prog: Program, inputs: dict[str, Any]) -> bool:
        names = prog.input_names()
        return "batch" in inputs and len(inputs) == 1 and not (names and "batch" in names)

    # ------------------------------------------------------------------ batch
    def _batch(self, prog: Program, items: Any) -> dict[str, Any]:
        """Run ``items`` in order; hand some to the pool's other workers through the host."""
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise InvalidRequestError("'batch' must be a list of input objects")
        t0 = time.perf_counter()
        results: list[Any] = [None] * len(items)
        errors: dict[int, BaseException] = {}
        todo = collections.deque(range(len(items)))
        lock = threading.Lock()

        def take() -> int | None:
            with lock:
                return todo.popleft() if todo else None

        def run_here() -> None:
            while (i := take()) is not None:
                self.check_cancelled()
                try:
                    with self._guard():
                        out = self._programs.run_program(prog, items[i], self.current_lm())
                    out["worker_id"] = self.worker_id
                    results[i] = out
                except CancelledCallError:
                    raise
                except Exception as exc:
                    errors[i] = exc

        helpers = self._batch_helpers(prog, items, results, errors, take, todo, lock)
        try:
            run_here()
        finally:
            for t in helpers:
                t.join()
        run_here()  # items a helper handed back (no other worker could take them)
        if errors:
            first = min(errors)
            raise errors[first]
        self.check_cancelled()
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for res in results:
            for key in usage:
                usage[key] += int((res.get("usage") or {}).get(key) or 0)
        return {
            "results": results,
            "count": len(results),
            "usage": usage,
            "execution_time": time.perf_counter() - t0,
            "workers": sorted({str(r.get("worker_id")) for r in results}),
        }

    def _batch_helpers(
        self,
        prog: Program,
        items: list[dict[str, Any]],
        results: list[Any],
        errors: dict[int, BaseException],
        take: Any,
        todo: collections.deque[int],
        lock: threading.Lock,
    ) -> list[threading.Thread]:
        host = self.host
        n = min(self.batch_concurrency, len(items) - 1)
        if host is None or not host.available or n <= 0:
            return []
        spec = {"config": prog.config, "state": prog.dump_state()}

        def helper() -> None:
            while (i := take()) is not None:
                try:
                    results[i] = host.call(
                        self.name, "run_program_spec", {**spec, "inputs": items[i]}
                    )
                except CallbackError:
                    # No other worker can take it (pool of one, host going away): run it here.
                    with lock:
                        todo.appendleft(i)
                    return
                except Exception as exc:
                    errors[i] = exc

        threads = [
            threading.Thread(target=helper, name=f"mlbridge-batch-{k}", daemon=True)
            for k in range(n)
        ]
        for t in threads:
            t.start()
        return threads

    def _h_run_program_spec(self, args: dict[str, Any]) -> dict[str, Any]:
        config, state, inputs = args.get("config"), args.get("state"), args.get("inputs")
        if not isinstance(config, dict) or not isinstance(inputs, dict):
            raise InvalidRequestError("run_program_spec needs 'config' and 'inputs' objects")
        key = hashlib.sha256(
            json.dumps([config, state], sort_keys=True, default=str).encode()
        ).hexdigest()
        prog = self._spec_cache.get(key)
        if prog is None:
            prog = self._make_program(config, state)
            self._spec_cache[key] = prog
            while len(self._spec_cache) > _SPEC_CACHE_SIZE:
                self._spec_cache.popitem(last=False)
        else:
            self._spec_cache.move_to_end(key)
        with self._guard():
            out = self._programs.run_program(prog, inputs, self.current_lm())
        out["worker_id"] = self.worker_id
        return out

    # ------------------------------------------------------------------ DSPex commands
    def _key(self, program_id: Any, session_id: Any) -> str:
        """Where a DSPex program id lives: namespaced by session, as the old pool workers did."""
        return f"{session_id}/{program_id}" if session_id else str(program_id)

    def _record(self, args: dict[str, Any], key: str = "program_id") -> ResourceRecord:
        pid = args.get(key) or args.get("program") or args.get("resource_id")
        if not pid:
            raise InvalidRequestError(f"'{key}' is required")
        session = args.get("session_id")
        if session is None and self._call is not None:
            session = self._call.session_id
        for candidate in (self._key(pid, session), str(pid)):
            rec = self.resources.get(candidate)
            if rec is not None and rec.type == "program":
                return rec
        if session is None:  # the old get_program_info sent no session: find the id in any one
            found = [r for r in self.resources.values() if self._public_ids.get(r.id) == str(pid)]
            if len(found) == 1:
                return found[0]
        raise ResourceNotFoundError(
            f"program {pid!r} not found in worker {self.worker_id}"
            + (f" (session {session!r})" if session else "")
            + "; create it first with create_program (through the host, create_resource)",
            resource_id=str(pid),
        )

    def _public_id(self, rec: ResourceRecord) -> str:
        return self._public_ids.get(rec.id, rec.id)

    def _h_create_program(self, args: dict[str, Any]) -> dict[str, Any]:
        args = dict(args)
        dspex = "resource_id" not in args and "config" not in args
        program_id = args.get("resource_id") or args.get("id")
        if dspex:
            if not program_id:
                raise InvalidRequestError("create_program: 'id' (the program id) is required")
            session = args.get("session_id")
            key = self._key(program_id, session)
            if key in self.resources:
                raise InvalidRequestError(
                    f"a program with id {program_id!r} already exists"
                    + (f" in session {session!r}" if session else "")
                    + "; delete it first (delete_program)"
                )
            args["resource_id"] = key
            args.pop("id", None)
        out = self._create(self._resource_types["program"], args)
        rec = self.resources[out["resource_id"]]
        if dspex:
            self._public_ids[rec.id] = str(program_id)
        prog: Program = rec.obj
        sig = prog.signature
        fields = [*sig.input_fields, *sig.output_fields] if sig is not None else []
        out.update(
            program_id=self._public_id(rec),
            status="created",
            signature=rec.config.get("signature"),
            program_type=prog.program_type,
            signature_class=sig.__name__ if sig is not None else None,
            field_mapping={f: f for f in fields},
            signature_def=out.get("signature"),
        )
        return out

    def _h_execute_program(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(args)
        inputs = args.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InvalidRequestError("execute_program: 'inputs' must be an object")
        result = self._execute(rec.obj, inputs)
        rec.execution_count += 1
        rec.last_executed = time.time()
        return {"program_id": self._public_id(rec), **result}

    def _program_row(self, rec: ResourceRecord) -> dict[str, Any]:
        prog: Program = rec.obj
        return {
            "id": self._public_id(rec),
            "program_id": self._public_id(rec),
            "resource_id": rec.id,
            "created_at": rec.created_at,
            "execution_count": rec.execution_count,
            "last_executed": rec.last_executed,
            "signature": rec.config.get("signature"),
            "program_type": prog.program_type,
            "session_id": rec.session_id,
        }

    def _h_list_programs(self, args: dict[str, Any]) -> dict[str, Any]:
        session = args.get("session_id")
        recs = [
            r
            for r in self.resources.values()
            if r.type == "program" and (session is None or r.session_id == session)
        ]
        rtype = self._resource_types["program"]
        return {
            "programs": [self._program_row(r) for r in recs],
            "resources": [r.summary(rtype) for r in recs],
            "total_count": len(recs),
        }

    def _h_get_program_info(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(args)
        prog: Program = rec.obj
        return {**prog.describe(), **self._program_row(rec)}

    def _h_delete_program(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(args)
        del self.resources[rec.id]
        self._close(rec)
        pid = self._public_ids.pop(rec.id, rec.id)
        return {"program_id": pid, "status": "deleted"}

    def _clear_programs(self, session: Any = None) -> int:
        doomed = [
            rid
            for rid, r in self.resources.items()
            if r.type == "program" and (session is None or r.session_id == session)
        ]
        for rid in doomed:
            self._close(self.resources.pop(rid))
            self._public_ids.pop(rid, None)
        self._spec_cache.clear()
        return len(doomed)

    def cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        programs = sum(1 for r in self.resources.values() if r.type == "program")
        removed = self.run_cleanup()
        self._public_ids.clear()
        self._spec_cache.clear()
        return {"status": "cleaned", "programs_removed": programs, "resources_removed": removed}

    def _h_reset_state(self, args: dict[str, Any]) -> dict[str, Any]:
        cleared = self._clear_programs()
        commands, errors = self.requests_processed, self.error_count
        self.stats["requests_processed"] = 0
        self.stats["errors"] = 0
        self._stats.clear()
        return {
            "status": "reset",
            "programs_cleared": cleared,
            "commands_reset": commands,
            "errors_reset": errors,
        }

    def _h_cleanup_session(self, args: dict[str, Any]) -> dict[str, Any]:
        session = args.get("session_id")
        if not session:
            raise InvalidRequestError("cleanup_session: 'session_id' is required")
        return {
            "status": "cleaned",
            "session_id": session,
            "programs_removed": self._clear_programs(session),
        }

    def _h_shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        sessions = {r.session_id for r in self.resources.values() if r.session_id}
        self._clear_programs()
        # The reply goes out first; the signal only asks the serve loop to stop after it
        # (its handler sets flags), and the worker then exits 0 through its normal cleanup.
        os.kill(os.getpid(), signal.SIGTERM)
        return {
            "status": "shutting_down",
            "worker_id": args.get("worker_id") or self.worker_id,
            "mode": self.mode,
            "sessions_cleaned": len(sessions),
        }

    def get_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        stats = self.statistics()
        try:
            import psutil

            proc = psutil.Process()
            mem = proc.memory_info()
            memory = {"rss": mem.rss, "vms": mem.vms, "percent": proc.memory_percent()}
        except Exception:
            memory = {"rss": rss_bytes(), "vms": 0, "percent": 0.0}
        stats.update(
            programs_count=sum(1 for r in self.resources.values() if r.type == "program"),
            command_count=self.requests_processed,
            error_count=self.error_count,
            memory_usage=memory,
            dspy_available=True,
            lm=self._lm_mod.public_spec(self._lm_spec),
        )
        return stats

    # ------------------------------------------------------------------ optimisation, files
    def _report_state(self, rec: ResourceRecord) -> None:
        """Send the program's new state to the host with this reply (it keeps it)."""
        call = self._call
        if call is not None:
            call.resource_states[rec.id] = rec.obj.dump_state()

    def _h_optimize(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(args, "program")
        prog: Program = rec.obj
        with self._guard():
            out = self._optimize.optimize(prog, args, self.current_lm())
        self._spec_cache.clear()
        self._report_state(rec)
        return {
            "program_id": self._public_id(rec),
            "resource_id": rec.id,
            "worker_id": self.worker_id,
            **out,
        }

    def _h_save_program(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self._record(args, "program")
        out = self._programs.save_file(rec.obj, args.get("path"))
        return {"program_id": self._public_id(rec), "status": "saved", **out}

    def _h_load_program(self, args: dict[str, Any]) -> dict[str, Any]:
        path = args.get("path")
        self._programs.load_file(path)  # a clear error now if the file is not a saved program
        create: dict[str, Any] = {"config": {"load_from": path}}
        program_id = args.get("id") or args.get("program_id")
        session = args.get("session_id")
        key = self._key(program_id, session) if program_id else None
        if key is not None:
            create["resource_id"] = key
        if session:
            create["session_id"] = session
        out = self._create(self._resource_types["program"], create)
        rec = self.resources[out["resource_id"]]
        if program_id:
            self._public_ids[rec.id] = str(program_id)
        return {
            "program_id": self._public_id(rec),
            "resource_id": rec.id,
            "status": "loaded",
            "path": path,
            "demos": rec.obj.demos_count(),
            "config": create["config"],
        }
