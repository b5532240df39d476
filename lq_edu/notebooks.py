"""The notebook machinery: student copies, their sync check, and the course runner.

``solutions/`` is the source of truth. A student copy in ``notebooks/`` is the
same notebook with every region between nbgrader's markers::

    ### BEGIN SOLUTION
    ...the answer...
    ### END SOLUTION

replaced by a stub that raises ``NotImplementedError`` (which the self-checks
report as "not solved yet"), with all outputs cleared, and without the
``NBVAL_CHECK_OUTPUT`` tags (there is nothing stored to check against; the
test suite still runs every student copy end to end). Markers must stand
on their own lines, inside a function body, and come in BEGIN/END pairs.

    python -m lq_edu.notebooks sync            # regenerate notebooks/ from solutions/
    python -m lq_edu.notebooks check           # fail if notebooks/ has drifted
    python -m lq_edu.notebooks course --profile ci   # run every lesson headless, print a table
    python -m lq_edu.notebooks execute solutions/00_welcome.ipynb   # refresh committed outputs
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lq_edu.paths import REPO_ROOT

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
SOLUTIONS_DIR = REPO_ROOT / "solutions"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
COURSE_OUT_DIR = REPO_ROOT / "build" / "course"


class MarkerError(ValueError):
    """A solution marker is missing its partner, nested, or not on its own line."""


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region of ``source`` with a stub.

    The stub keeps the indentation of the BEGIN marker, so a region inside a
    function body leaves a valid function that raises ``NotImplementedError``.
    """
    out: list[str] = []
    open_at: int | None = None
    for lineno, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        has_begin, has_end = BEGIN in line, END in line
        if (has_begin or has_end) and stripped not in (BEGIN, END):
            raise MarkerError(f"{where}, line {lineno}: a solution marker must stand alone on its line, got {stripped!r}")
        if stripped == BEGIN:
            if open_at is not None:
                raise MarkerError(f"{where}, line {lineno}: {BEGIN!r} inside the region opened at line {open_at}; close it first with {END!r}")
            open_at = lineno
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("exercise not solved yet")')
        elif stripped == END:
            if open_at is None:
                raise MarkerError(f"{where}, line {lineno}: {END!r} without a matching {BEGIN!r}")
            open_at = None
        elif open_at is None:
            out.append(line)
    if open_at is not None:
        raise MarkerError(f"{where}: {BEGIN!r} at line {open_at} is never closed with {END!r}")
    return "\n".join(out)


def check_markers(nb, name: str = "notebook") -> int:
    """Validate every marker in ``nb``; return how many solution regions it has."""
    regions = 0
    for i, cell in enumerate(nb.cells):
        if BEGIN not in cell.source and END not in cell.source:
            continue
        where = f"{name}, cell {i}"
        if cell.cell_type != "code":
            raise MarkerError(f"{where}: solution markers belong in code cells, found one in a {cell.cell_type} cell")
        strip_solutions(cell.source, where)
        regions += cell.source.count(BEGIN)
    return regions


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _clean_metadata(nb) -> None:
    """Drop widget state and per-run noise so that diffs show only real changes.

    Outputs that are widget views (tqdm progress bars in a kernel) are removed:
    without their saved state they would render as "model not found".
    """
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_MIME not in o.get("data", {})]


def student_notebook(nb, name: str = "notebook"):
    """The student copy of a solution notebook: stubs instead of solutions, no outputs."""
    check_markers(nb, name)
    student = copy.deepcopy(nb)
    _clean_metadata(student)
    for i, cell in enumerate(student.cells):
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{name}, cell {i}")
            cell.outputs = []
            cell.execution_count = None
            # no stored outputs to compare with: nbval just runs the student copy
            tags = [t for t in cell.metadata.get("tags", []) if t != "NBVAL_CHECK_OUTPUT"]
            if tags:
                cell.metadata["tags"] = tags
            else:
                cell.metadata.pop("tags", None)
    return student


def _read(path: Path):
    import nbformat

    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as err:
        raise ValueError(f"{path} is not a readable notebook ({err}); restore it from git") from err


def _dumps(nb) -> str:
    import nbformat

    return nbformat.writes(nb) + "\n"


def sync(solutions: Path = SOLUTIONS_DIR, notebooks: Path = NOTEBOOKS_DIR, check: bool = False) -> list[str]:
    """Generate ``notebooks/`` from ``solutions/``.

    With ``check=True`` nothing is written; returns the problems found (files
    missing, stale or without a solution), so a test can fail on drift.
    Without it, writes the student copies and returns the files it changed.
    """
    solutions, notebooks = Path(solutions), Path(notebooks)
    sources = sorted(solutions.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no solution notebooks in {solutions}")
    problems: list[str] = []
    for src in sources:
        want = _dumps(student_notebook(_read(src), src.name))
        dst = notebooks / src.name
        have = dst.read_text(encoding="utf-8") if dst.is_file() else None
        if have == want:
            continue
        if check:
            state = "missing, no student copy of" if have is None else "out of sync with"
            problems.append(f"{dst.name}: {state} {solutions.name}/{src.name}")
        else:
            notebooks.mkdir(parents=True, exist_ok=True)
            dst.write_text(want, encoding="utf-8")
            problems.append(dst.name)
    expected = {s.name for s in sources}
    for extra in sorted(notebooks.glob("*.ipynb")):
        if extra.name not in expected:
            problems.append(f"{extra.name}: in {notebooks.name}/ but has no solution in {solutions.name}/ (delete it or add the solution)")
    return problems


def _kernel_env(profile: str) -> None:
    """Make kernels started from here use this Python and this profile."""
    os.environ["LQ_PROFILE"] = profile
    bindir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def execute_in_place(path: Path, profile: str = "ci", timeout: int = 600) -> float:
    """Run a solution notebook and store its outputs in it (no widget state). Returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    from lq_edu.profiles import get_profile

    get_profile(profile)
    _kernel_env(profile)
    path = Path(path)
    nb = _read(path)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    _clean_metadata(nb)
    nbformat.write(nb, str(path))
    return time.perf_counter() - start


@dataclass
class RunResult:
    """One row of the course table."""

    notebook: str
    status: str  # "ok" or "FAILED"
    seconds: float
    error: str = ""


def _source_cell(source_nb: Path, err) -> str:
    """Name the failing cell by its place in the source notebook (from 1).

    Papermill's index counts the "injected-parameters" cell it inserts right
    after the ``parameters`` cell (or at the top when there is none), so the
    number is shifted back to match the notebook the instructor has open.
    """
    try:
        cells = _read(source_nb).cells
        tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
        injected_at = tagged[0] + 1 if tagged else 0
    except ValueError:
        injected_at = 0
    index = err.cell_index - 1 if err.cell_index > injected_at else err.cell_index
    lines = (err.source or "").strip().splitlines()
    snippet = lines[0] if lines else ""
    snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
    return f"cell {index + 1} ({snippet!r})"


def run_notebook(path: Path, out_dir: Path, profile: str, timeout: int = 900) -> RunResult:
    """Execute one notebook with papermill into ``out_dir``; never raises on a cell error."""
    import papermill as pm

    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(path),
            str(Path(out_dir) / path.name),
            parameters={"PROFILE": profile},
            kernel_name="python3",
            cwd=str(path.parent),
            progress_bar=False,
            execution_timeout=timeout,
        )
    except pm.PapermillExecutionError as err:
        where = _source_cell(path, err)
        return RunResult(path.name, "FAILED", time.perf_counter() - start, f"{where}: {err.ename}: {err.evalue}")
    except Exception as err:  # kernel died, bad JSON, ...
        return RunResult(path.name, "FAILED", time.perf_counter() - start, f"{type(err).__name__}: {err}")
    return RunResult(path.name, "ok", time.perf_counter() - start)


def run_course(
    profile: str = "laptop",
    folder: Path = SOLUTIONS_DIR,
    out_dir: Path | None = None,
    notebooks: list[str] | None = None,
) -> list[RunResult]:
    """Run every notebook in ``folder`` headless, print a table, return its rows."""
    from lq_edu.profiles import get_profile

    get_profile(profile)  # unknown profile: ValueError listing the valid ones
    _kernel_env(profile)
    folder = Path(folder)
    out_dir = Path(out_dir or COURSE_OUT_DIR / profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.ipynb"))
    if notebooks:
        paths = [p for p in paths if p.name in notebooks or p.stem in notebooks]
    if not paths:
        raise FileNotFoundError(f"no notebooks to run in {folder}" + (f" matching {notebooks}" if notebooks else ""))
    rows = []
    print(f"Running {len(paths)} notebook(s) from {folder} in the {profile!r} profile; executed copies go to {out_dir}")
    for path in paths:
        row = run_notebook(path, out_dir, profile)
        print(f"  {row.notebook}: {row.status} in {row.seconds:.1f} s", flush=True)
        rows.append(row)
    print(format_table(rows))
    return rows


def format_table(rows: list[RunResult]) -> str:
    width = max(len("notebook"), *(len(r.notebook) for r in rows))
    lines = [f"{'notebook':<{width}}  {'status':<6}  {'seconds':>8}", f"{'-' * width}  ------  --------"]
    for r in rows:
        lines.append(f"{r.notebook:<{width}}  {r.status:<6}  {r.seconds:>8.1f}")
    lines.append(f"{'total':<{width}}  {'':<6}  {sum(r.seconds for r in rows):>8.1f}")
    for r in rows:
        if r.status != "ok":
            lines.append(f"FAILED: {r.notebook} at {r.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lq_edu.notebooks", description="lq-edu notebook machinery")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sync", help="regenerate notebooks/ from solutions/")
    sub.add_parser("check", help="fail if notebooks/ is out of sync with solutions/")
    c = sub.add_parser("course", help="run every solution notebook headless and print a table")
    c.add_argument("--profile", default=os.environ.get("LQ_PROFILE", "laptop"))
    c.add_argument("--folder", type=Path, default=SOLUTIONS_DIR)
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("notebooks", nargs="*", help="only these notebooks (names or stems)")
    e = sub.add_parser("execute", help="run solution notebooks in place to refresh their committed outputs")
    e.add_argument("--profile", default="ci")
    e.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "sync":
            changed = sync()
            print("\n".join(f"wrote notebooks/{c}" for c in changed) or "notebooks/ already in sync")
        elif args.cmd == "check":
            problems = sync(check=True)
            if problems:
                print("notebooks/ has drifted from solutions/; run `make notebooks`:\n  " + "\n  ".join(problems))
                return 1
            print("notebooks/ is in sync with solutions/")
        elif args.cmd == "course":
            rows = run_course(args.profile, args.folder, args.out, args.notebooks)
            return 0 if all(r.status == "ok" for r in rows) else 1
        elif args.cmd == "execute":
            for path in args.paths:
                print(f"{path}: {execute_in_place(path, args.profile):.1f} s")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
