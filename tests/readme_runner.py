"""Executable documentation: run every Python and shell block of README.md (and docs/*.md).

Conventions (the README's "Executable documentation" section says the same for writers):

* A fenced block tagged ``python``, ``py``, ``bash``, ``sh``, ``shell`` or ``console`` runs, as
  written. Any other tag (``toml``, ``text``, ``json``, none...) is shown, not run.
* A block runs in its *section* (the text under the nearest heading, any level): the Python
  blocks of a section share one namespace, the shell blocks of a section run as one bash script
  (``set -euo pipefail``), so a block may use what an earlier block of its section defined.
* Every Python block of a file runs in one process, with one shared host: a block that uses the
  name ``bridge`` without defining it gets ``bridge = MLBridge()`` (the built-in bridges,
  started lazily, closed at the end).
* A Python block whose first line is ``# <name>.py`` is a file: it is written to the working
  directory under that name (and compiled) for later blocks to use, not executed.
* ``console`` blocks run their ``$ `` lines; the other lines are shown output.
* Each file runs in a fresh temporary working directory with a private ``MLBRIDGE_RUNTIME_DIR``
  and no network (``HF_HUB_OFFLINE=1``); processes a shell block leaves behind are killed with
  its process group.
* A block that cannot run as written is marked with an HTML comment right before it (blank lines
  between are allowed): ``<!-- readme: skip (the reason) -->``. The reason is required.

:func:`run_python` / :func:`run_shell` return the failures (empty when every block ran).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_TAGS = frozenset({"python", "py", "python3"})
SHELL_TAGS = frozenset({"bash", "sh", "shell", "console"})
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
_SKIP = re.compile(r"^<!--\s*readme:\s*skip\b(?P<rest>.*?)-->\s*$")
_FILE_HEADER = re.compile(r"^#\s*(?P<name>[\w.-]+\.py)\s*$")


class MarkerError(ValueError):
    """A ``readme:`` marker that is malformed (no reason, or not followed by a block)."""


@dataclass(frozen=True, slots=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str
    section: str
    skip: str | None = None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line} ({self.section})"

    @property
    def runnable(self) -> bool:
        return self.lang in PYTHON_TAGS or self.lang in SHELL_TAGS


@dataclass
class Failure:
    where: str
    output: str


@dataclass
class _Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def documentation_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md (sorted)."""
    files = [root / "README.md"]
    docs = root / "docs"
    if docs.is_dir():
        files += sorted(docs.glob("**/*.md"))
    return [f for f in files if f.is_file()]


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` with its language, section and skip marker."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    section = "(top)"
    pending_skip: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m:
            fence, info = m.group("fence"), m.group("info").strip()
            lang = info.split()[0].lower() if info else ""
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j])
                j += 1
            skip = None
            if pending_skip is not None:
                skip = pending_skip[1]
                pending_skip = None
            blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", section, skip))
            i = j + 1
            continue
        s = _SKIP.match(line.strip())
        if s:
            reason = s.group("rest").strip()
            if not (reason.startswith("(") and reason.endswith(")") and len(reason) > 2):
                raise MarkerError(
                    f"{path.name}:{i + 1}: a readme skip marker needs its reason: write "
                    "<!-- readme: skip (why this block cannot run as written) -->"
                )
            pending_skip = (i + 1, reason[1:-1].strip())
        elif line.strip().startswith("<!--") and "readme:" in line:
            raise MarkerError(
                f"{path.name}:{i + 1}: unknown readme marker {line.strip()!r}; the only one is "
                "<!-- readme: skip (reason) -->"
            )
        elif line.strip():
            h = _HEADING.match(line)
            if h:
                section = h.group("title")
            if pending_skip is not None:
                raise MarkerError(
                    f"{path.name}:{pending_skip[0]}: a readme skip marker must come right before "
                    "the block it skips (only blank lines between)"
                )
        i += 1
    if pending_skip is not None:
        raise MarkerError(f"{path.name}:{pending_skip[0]}: a readme skip marker with no block")
    return blocks


def _sections(blocks: Iterable[Block], tags: frozenset[str]) -> list[_Section]:
    out: dict[str, _Section] = {}
    for b in blocks:
        if b.lang in tags and b.skip is None:
            out.setdefault(b.section, _Section(b.section)).blocks.append(b)
    return list(out.values())


def _environment(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    env["MLBRIDGE_RUNTIME_DIR"] = str(workdir / ".runtime")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # `python` and `mlbridge` are this interpreter's and its console script.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- python

_DRIVER = r"""
import json, os, re, sys, traceback
plan = json.load(open(sys.argv[1]))
shared = {}
def shared_bridge():
    if "bridge" not in shared:
        from mlbridge import MLBridge
        shared["bridge"] = MLBridge()
    return shared["bridge"]
failures = []
header = re.compile(r"^#\s*([\w.-]+\.py)\s*$")
for section in plan:
    ns = {"__name__": "__readme__"}
    for block in section["blocks"]:
        code, first = block["code"], block["code"].split("\n", 1)[0]
        where = "%s:%d (%s)" % (os.path.basename(block["path"]), block["line"], section["title"])
        print("readme: running " + where, file=sys.stderr, flush=True)
        # pad so that tracebacks show the file's own line numbers
        source = "\n" * (block["line"] - 1) + code
        try:
            m = header.match(first)
            if m:
                with open(m.group(1), "w") as f:
                    f.write(code)
                compile(source, block["path"], "exec")
                continue
            compiled = compile(source, block["path"], "exec")
            if "bridge" in compiled.co_names and "bridge" not in ns:
                ns["bridge"] = shared_bridge()
            exec(compiled, ns)
        except BaseException:
            failures.append({"where": where, "output": traceback.format_exc()})
            break  # later blocks of this section depend on this one
if "bridge" in shared:
    shared["bridge"].close()
json.dump(failures, open(sys.argv[2], "w"))
"""


def run_python(
    path: Path, timeout: float = 1500.0, blocks: list[Block] | None = None
) -> list[Failure]:
    """Run the Python blocks of ``path`` (see the conventions above); the failures."""
    sections = _sections(parse_blocks(path) if blocks is None else blocks, PYTHON_TAGS)
    if not sections:
        return []
    with tempfile.TemporaryDirectory(prefix="readme-py-") as tmp:
        work = Path(tmp)
        plan = [
            {
                "title": s.title,
                "blocks": [{"path": str(b.path), "line": b.line, "code": b.code} for b in s.blocks],
            }
            for s in sections
        ]
        (work / ".plan.json").write_text(json.dumps(plan))
        result = work / ".failures.json"
        proc = _run(
            [sys.executable, "-c", _DRIVER, str(work / ".plan.json"), str(result)],
            work,
            timeout,
        )
        if not result.exists():
            return [Failure(f"{path.name} (python blocks)", proc)]
        return [Failure(f["where"], f["output"]) for f in json.loads(result.read_text())]


# --------------------------------------------------------------------------- shell


def shell_script(blocks: list[Block]) -> tuple[str, dict[int, int]]:
    """One bash script for a section's shell blocks, and script line -> file line."""
    lines = ["set -euo pipefail"]
    where: dict[int, int] = {}
    for b in blocks:
        for k, text in enumerate(b.code.splitlines()):
            if b.lang == "console":
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            lines.append(text)
            where[len(lines)] = b.line + k
    return "\n".join(lines) + "\n", where


def run_shell(
    path: Path, timeout: float = 900.0, blocks: list[Block] | None = None
) -> list[Failure]:
    """Run the shell blocks of ``path``, one bash script per section; the failures."""
    failures = []
    sections = _sections(parse_blocks(path) if blocks is None else blocks, SHELL_TAGS)
    with tempfile.TemporaryDirectory(prefix="readme-sh-") as tmp:
        work = Path(tmp)
        for s in sections:
            script, where = shell_script(s.blocks)
            script_path = work / ".section.sh"
            script_path.write_text(script)
            trap = (
                "trap 'echo \"readme-runner: failed at script line $LINENO (exit $?)\" >&2' ERR\n"
            )
            script_path.write_text(trap + script)
            proc_output, code = _run_code(["bash", str(script_path)], work, timeout)
            if code != 0:
                m = re.search(r"failed at script line (\d+)", proc_output)
                line = where.get(int(m.group(1)) - 1) if m else None
                at = f"{path.name}:{line}" if line else f"{path.name}:{s.blocks[0].line}"
                failures.append(Failure(f"{at} ({s.title}), exit {code}", proc_output[-6000:]))
    return failures


# --------------------------------------------------------------------------- processes


def _run_code(argv: list[str], cwd: Path, timeout: float) -> tuple[str, int]:
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=_environment(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return out + f"\n(readme-runner: killed after {timeout:g}s)", -9
    finally:
        # whatever the block left running (a server started with &) goes with its group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return out, code


def _run(argv: list[str], cwd: Path, timeout: float) -> str:
    out, code = _run_code(argv, cwd, timeout)
    return f"exit {code}\n{out[-6000:]}"
