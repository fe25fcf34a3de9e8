"""Named worker exit codes, shared by the worker (which exits with them) and the host (which
explains them). Boot failures have their own codes so a broken bridge is not restarted forever."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 64  # bad command line
EXIT_BRIDGE_LOAD_FAILED = 65  # the bridge module/class/script could not be imported
EXIT_FRAMEWORK_INIT_FAILED = 66  # _initialize_framework raised (missing package, bad settings)
EXIT_PROTOCOL_DESYNC = 67  # the input stream could not be resynchronised
EXIT_INTERNAL = 70  # a bug in the worker runtime itself
EXIT_RESOURCE_LIMIT = 71  # a call hit an OS-enforced limit; the worker stopped to be replaced

BOOT_FAILURE_CODES = frozenset({EXIT_USAGE, EXIT_BRIDGE_LOAD_FAILED, EXIT_FRAMEWORK_INIT_FAILED})

DESCRIPTIONS = {
    EXIT_OK: "exited normally",
    EXIT_USAGE: "bad worker command line",
    EXIT_BRIDGE_LOAD_FAILED: "the bridge could not be imported",
    EXIT_FRAMEWORK_INIT_FAILED: "the bridge's framework failed to initialise",
    EXIT_PROTOCOL_DESYNC: "the input stream was corrupt beyond resynchronisation",
    EXIT_INTERNAL: "internal error in the worker runtime",
    EXIT_RESOURCE_LIMIT: "a call hit one of the bridge's resource limits; replaced",
}

# A worker that fails to boot prints one line starting with this marker on stderr, followed by a
# JSON object {"error", "error_type", "error_code", "traceback"}; the host reads it from the tail.
BOOT_ERROR_MARKER = "MLBRIDGE-BOOT-ERROR "
