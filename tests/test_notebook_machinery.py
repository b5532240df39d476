"""Student copies, the sync check, marker rules and the course runner."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lq_edu.notebooks import (
    NOTEBOOKS_DIR,
    SOLUTIONS_DIR,
    WIDGET_MIME,
    MarkerError,
    check_markers,
    run_course,
    strip_solutions,
    student_notebook,
    sync,
)

SOLVED = '''def f(x):
    "Double x."
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION
'''


def _notebook(*sources: str):
    nb = new_notebook(cells=[new_code_cell('import os\nPROFILE = os.environ.get("LQ_PROFILE", "laptop")')])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.cells.extend(new_code_cell(s) for s in sources)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _write(folder, name, nb):
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(folder / name))


# ---- markers ---------------------------------------------------------------


def test_strip_solutions_leaves_a_stub_that_raises():
    stub = strip_solutions(SOLVED)
    assert "return 2 * x" not in stub
    assert '    raise NotImplementedError("exercise not solved yet")' in stub
    namespace: dict = {}
    exec(compile(stub, "stub", "exec"), namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without a matching"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside the region"),
        ("x = 1  ### BEGIN SOLUTION\n### END SOLUTION\n", "stand alone"),
    ],
)
def test_unbalanced_markers_fail(source, message):
    with pytest.raises(MarkerError, match=message):
        strip_solutions(source, "fixture.ipynb, cell 1")


def test_marker_in_markdown_fails():
    nb = _notebook()
    nb.cells.append(new_markdown_cell("### BEGIN SOLUTION\nanswer\n### END SOLUTION"))
    with pytest.raises(MarkerError, match="markdown cell"):
        check_markers(nb, "fixture.ipynb")


def test_student_copy_has_no_outputs_and_no_answers():
    nb = _notebook(SOLVED)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hi")]
    nb.cells[1].execution_count = 3
    nb.metadata["widgets"] = {"state": {}}
    student = student_notebook(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in student.cells if c.cell_type == "code")
    assert "widgets" not in student.metadata
    assert "return 2 * x" not in student.cells[1].source
    assert "return 2 * x" in nb.cells[1].source  # the solution itself is untouched


# ---- sync check, on broken fixtures -----------------------------------------


def test_sync_check_catches_drift(tmp_path):
    sol, stu = tmp_path / "solutions", tmp_path / "notebooks"
    _write(sol, "01_x.ipynb", _notebook(SOLVED))
    assert sync(sol, stu, check=True) == ["01_x.ipynb: missing, no student copy of solutions/01_x.ipynb"]
    assert sync(sol, stu) == ["01_x.ipynb"]
    assert sync(sol, stu, check=True) == []
    # someone edits the solution but forgets to regenerate
    _write(sol, "01_x.ipynb", _notebook(SOLVED.replace("Double", "Twice")))
    assert sync(sol, stu, check=True) == ["01_x.ipynb: out of sync with solutions/01_x.ipynb"]
    # a student copy without a solution
    sync(sol, stu)
    _write(stu, "99_orphan.ipynb", _notebook())
    problems = sync(sol, stu, check=True)
    assert len(problems) == 1 and "99_orphan.ipynb" in problems[0]


def test_sync_refuses_unbalanced_solutions(tmp_path):
    sol = tmp_path / "solutions"
    _write(sol, "02_bad.ipynb", _notebook("def g():\n    ### BEGIN SOLUTION\n    return 1\n"))
    with pytest.raises(MarkerError, match="02_bad.ipynb, cell 1"):
        sync(sol, tmp_path / "notebooks", check=True)


# ---- the real course ----------------------------------------------------------


def _lessons():
    return sorted(SOLUTIONS_DIR.glob("*.ipynb"))


def test_there_are_lessons_in_both_folders():
    assert _lessons(), "solutions/ is empty"
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == [p.name for p in _lessons()]


def test_notebooks_are_in_sync_with_solutions():
    problems = sync(check=True)
    assert not problems, "run `make notebooks`:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", _lessons(), ids=lambda p: p.name)
def test_lesson_conventions(path):
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged `parameters`"
    assert "LQ_PROFILE" in code[0].source
    assert check_markers(nb, path.name) >= 1, "each lesson has exercises"
    assert "widgets" not in nb.metadata, "no committed widget state"
    widget_views = [i for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if WIDGET_MIME in o.get("data", {})]
    assert not widget_views, f"cells {widget_views} hold widget views without state; run `make outputs`"
    assert any(c.outputs for c in code), "solutions are committed with outputs from a ci run"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in code:
        assert '.to("cuda")' not in cell.source and ".cuda()" not in cell.source, "use lq.pick_device()"
    # the student copy compiles: every stub is valid Python
    for i, cell in enumerate(student_notebook(nb, path.name).cells):
        if cell.cell_type == "code":
            source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            compile(source, f"{path.name} cell {i}", "exec")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_student_copies_have_no_outputs(path):
    nb = json.loads(path.read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


# ---- the course runner -----------------------------------------------------------


def test_course_runner_names_the_failing_notebook_and_cell(tmp_path, capsys):
    folder = tmp_path / "lessons"
    _write(folder, "01_fine.ipynb", _notebook("print(PROFILE)"))
    _write(folder, "02_broken.ipynb", _notebook("x = 1", "raise RuntimeError('deliberately broken')"))
    rows = run_course("ci", folder, tmp_path / "out")
    assert [(r.notebook, r.status) for r in rows] == [("01_fine.ipynb", "ok"), ("02_broken.ipynb", "FAILED")]
    assert "cell 3 (\"raise RuntimeError('deliberately broken')\")" in rows[1].error
    assert "RuntimeError: deliberately broken" in rows[1].error
    out = capsys.readouterr().out
    assert "FAILED: 02_broken.ipynb at cell 3" in out
    # the executed copy got the profile through papermill
    executed = nbformat.read(str(tmp_path / "out" / "01_fine.ipynb"), as_version=4)
    assert any("ci" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


def test_course_cli_exit_codes(tmp_path):
    folder = tmp_path / "lessons"
    _write(folder, "02_broken.ipynb", _notebook("1 / 0"))
    cmd = [sys.executable, "-m", "lq_edu.notebooks", "course", "--folder", str(folder), "--out", str(tmp_path / "o")]
    failed = subprocess.run([*cmd, "--profile", "ci"], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "FAILED: 02_broken.ipynb at cell 2 ('1 / 0')" in failed.stdout and "ZeroDivisionError" in failed.stdout
    unknown = subprocess.run([*cmd, "--profile", "huge"], capture_output=True, text=True)
    assert unknown.returncode == 2
    assert "use one of: ci, laptop, gpu" in unknown.stderr
