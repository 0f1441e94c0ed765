"""README.md runs as written (issue 17).

Every ```bash and ```python block of README.md is either run here, in README order, in one
temporary folder laid out like the project's workspace (``tmp/project`` with ``.venv``
pointing at this interpreter's environment and ``tmp/shared`` -> the real ``../shared``
when it exists), or is marked in README.md by an HTML comment on the line before its fence:

``<!-- readme-test: skip (REASON) -->``
    never run here (``make demo`` / ``make test``, which CI runs directly; CPU-hours).
``<!-- readme-test: realdata -->``
    run when ``../shared/data/real`` exists, skipped (and said so) otherwise.

A block that is neither run nor marked fails the fast test, so the README cannot drift
silently. Bash blocks run with ``bash -e -o pipefail``, each starting with the exported
variables the previous one left (a reader types them into one shell); Python blocks run
with this interpreter. Fences of other languages (output, YAML) are not code to run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
REAL = SHARED / "data" / "real"

RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*readme-test:\s*(?P<kind>[a-z]+)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence in README.md
    lang: str  # "bash" or "python"
    code: str
    mark: str | None  # "skip", "realdata" or None
    reason: str

    def __str__(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip()), "")
        return f"README.md:{self.line} ({self.lang}: {first.strip()[:60]!r})"


def readme_blocks(text: str) -> list[Block]:
    """The bash and python blocks of a README with their ``readme-test`` marks."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang = m.group(1).lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: code fence never closed"
        i += 1
        if lang not in RUN_LANGS:
            continue
        mark, reason = None, ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and "readme-test" in lines[j]:
            mm = _MARK.match(lines[j].strip())
            assert mm, f"README.md:{j + 1}: cannot read the mark {lines[j].strip()!r}"
            mark, reason = mm.group("kind"), (mm.group("reason") or "").strip()
        blocks.append(Block(start + 1, RUN_LANGS[lang], "\n".join(body) + "\n", mark, reason))
    return blocks


def test_every_block_is_run_or_marked():
    blocks = readme_blocks(README.read_text())
    assert blocks, "README.md has no bash or python block: did the fences change?"
    bad = [
        f"{b}: unknown mark {b.mark!r} (use skip or realdata)"
        for b in blocks
        if b.mark not in (None, "skip", "realdata")
    ]
    bad += [
        f"{b}: a skip mark needs its reason, <!-- readme-test: skip (REASON) -->"
        for b in blocks
        if b.mark == "skip" and not b.reason
    ]
    assert not bad, "\n".join(bad)
    # The commands CI runs itself must be the ones the README skips.
    skipped = "".join(b.code for b in blocks if b.mark == "skip")
    assert "make demo" in skipped and "make test" in skipped
    run = [b for b in blocks if b.mark != "skip"]
    assert any("procsky run drp" in b.code for b in run), "the tour's pipeline run must be tested"


def test_readme_parser_reads_marks():
    text = (
        "x\n<!-- readme-test: skip (CI runs it) -->\n```bash\nmake demo\n```\n\n"
        "<!-- readme-test: realdata -->\n\n```python\nprint(1)\n```\n```bash\necho hi\n```\n```text\nout\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.lang, b.mark, b.reason) for b in blocks] == [
        (3, "bash", "skip", "CI runs it"),
        (9, "python", "realdata", ""),
        (12, "bash", None, ""),
    ]
    assert blocks[2].code == "echo hi\n"


def _workspace(tmp: Path) -> Path:
    """``tmp/project`` (the working folder) with ``.venv`` and, when present, ``tmp/shared``."""
    project = tmp / "project"
    project.mkdir()
    if SHARED.exists():
        (tmp / "shared").symlink_to(SHARED, target_is_directory=True)
    if (Path(sys.prefix) / "bin" / "activate").exists():
        (project / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    else:  # not a virtualenv: an activate script that puts this interpreter first on PATH
        bindir = project / ".venv" / "bin"
        bindir.mkdir(parents=True)
        (bindir / "python").symlink_to(sys.executable)
        (bindir / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return project


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout kill the group (dask workers too)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, pytest-timeout): leave no cluster behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


#: Time for all the blocks together, s. The tour simulates the `demo` survey and runs
#: every drp stage on it: minutes on 2 free cores, much longer on a shared machine.
BUDGET_S = 3600


@pytest.mark.slow
@pytest.mark.timeout(BUDGET_S + 300)
def test_readme_blocks_run(tmp_path):
    project = _workspace(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NUMBA_NUM_THREADS", "1")
    deadline = time.time() + BUDGET_S
    state = tmp_path / "shell-state.sh"  # the exported variables after the last bash block
    ran, skipped = [], []
    for block in readme_blocks(README.read_text()):
        if block.mark == "skip":
            continue
        if block.mark == "realdata" and not REAL.exists():
            skipped.append(f"{block} (no {REAL})")
            continue
        if block.lang == "bash":  # one shell session, as a reader's: later blocks see `source .venv/bin/activate`
            script = (
                f'[ -f "{state}" ] && source "{state}"\n{block.code}\n'
                f'export -p | grep -v "^declare -[a-zA-Z]*r" > "{state}" || true\n'
            )
            cmd = ["bash", "-e", "-o", "pipefail", "-c", script]
        else:
            cmd = [sys.executable, "-c", block.code]
        t0 = time.time()
        returncode, output = _run(cmd, project, env, deadline - t0)
        dt = time.time() - t0
        assert returncode == 0, (
            f"{block} {'timed out' if returncode is None else f'failed (exit {returncode})'} after {dt:.0f} s "
            f"in {project}; last output:\n" + "\n".join(output.splitlines()[-40:])
        )
        ran.append(f"{block}: {dt:.0f} s")
    print("README blocks run:\n  " + "\n  ".join(ran))
    if skipped:
        print("README blocks skipped:\n  " + "\n  ".join(skipped))
    assert ran
