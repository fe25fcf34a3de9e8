"""Executable documentation: every Python and shell block of README.md (and docs/*.md) runs as
written, against the real project (the embedded models included). The conventions are in
:mod:`readme_runner` and the README's "Executable documentation" section.

The runner itself is checked first, on small documents written here: it must fail on a block
that fails, honour skip markers only with a reason, and keep a section's blocks together.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import readme_runner as rr

DOCS = rr.documentation_files()


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "DOC.md"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the runner


def test_runner_fails_on_an_unmarked_failing_block_and_names_its_line(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "# Title\n\n## Good\n\n```python\nx = 1\n```\n\n## Bad\n\n```python\ny = 2\n"
        "raise RuntimeError('this block is broken')\n```\n",
    )
    (failure,) = rr.run_python(doc, timeout=120)
    assert failure.where == "DOC.md:12 (Bad)"
    assert "RuntimeError: this block is broken" in failure.output
    assert 'File "' + str(doc) + '", line 13' in failure.output  # the file's own line


def test_runner_fails_on_a_failing_shell_block(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "## Shell\n\n```sh\necho fine\nfalse   # fails\necho never\n```\n\n"
        "```console\n$ test -d /\nsome output that is not run\n```\n",
    )
    (failure,) = rr.run_shell(doc, timeout=60)
    assert failure.where.startswith("DOC.md:5 (Shell)")
    assert "never" not in failure.output


def test_section_blocks_share_state_and_files_are_written(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "## A\n\n```python\n# helper_mod.py\nVALUE = 41\n```\n\n```python\nimport helper_mod\n"
        "value = helper_mod.VALUE + 1\n```\n\n```py\nassert value == 42, value\n```\n\n"
        "## B\n\n```python\nassert 'value' not in globals()\n```\n\n"
        '## C\n\n```bash\nexport X=1\n```\n\n```sh\ntest "$X" = 1\n```\n',
    )
    assert rr.run_python(doc, timeout=120) == []
    assert rr.run_shell(doc, timeout=60) == []


def test_skip_marker_needs_a_reason_and_a_block(tmp_path: Path) -> None:
    ok = _doc(tmp_path, "## S\n\n<!-- readme: skip (needs a GPU) -->\n\n```python\n1/0\n```\n")
    (block,) = rr.parse_blocks(ok)
    assert block.skip == "needs a GPU"
    assert rr.run_python(ok, timeout=60) == []
    for bad in (
        "<!-- readme: skip -->\n```python\n1/0\n```\n",
        "<!-- readme: skip () -->\n```python\n1/0\n```\n",
        "<!-- readme: skip (why) -->\nsome text\n```python\n1/0\n```\n",
        "<!-- readme: skipp (why) -->\n```python\n1/0\n```\n",
        "text\n<!-- readme: skip (why) -->\n",
    ):
        with pytest.raises(rr.MarkerError):
            rr.parse_blocks(_doc(tmp_path, bad))


def test_other_languages_are_not_run(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```toml\nx = [\n```\n\n```text\n$ false\n```\n\n```\nfalse\n```\n")
    assert not any(b.runnable for b in rr.parse_blocks(doc))


# --------------------------------------------------------------------------- the documents


def test_every_runnable_block_is_run_or_marked_with_a_reason() -> None:
    """Every document parses; each skip says why (the list is printed for reviewers)."""
    assert DOCS and DOCS[0].name == "README.md"
    runnable = [b for doc in DOCS for b in rr.parse_blocks(doc) if b.runnable]
    assert runnable, "README.md has no Python or shell block?"
    for b in runnable:
        if b.skip is not None:
            assert len(b.skip) >= 10, f"{b.where}: say why it cannot run ({b.skip!r})"
            print(f"skipped: {b.where}: {b.skip}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_documentation_python_blocks_run_as_written(doc: Path) -> None:
    failures = rr.run_python(doc)
    assert not failures, "\n\n".join(f"{f.where}:\n{f.output}" for f in failures)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_documentation_shell_blocks_run_as_written(doc: Path) -> None:
    failures = rr.run_shell(doc)
    assert not failures, "\n\n".join(f"{f.where}:\n{f.output}" for f in failures)
