"""Small interactive controls that degrade to a printed table.

A slider is the nicest way to feel "bits x parameters = bytes", but it needs a
live Jupyter front end. Headless runs (papermill, nbval, the ci profile) and
machines without ipywidgets get the same function evaluated over a fixed
grid and printed as a table instead, so a lesson never depends on widgets and
no widget state is ever saved into a notebook.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def widgets_available() -> bool:
    """True in a live Jupyter kernel with ipywidgets installed, outside the ci profile."""
    if os.environ.get("LQ_PROFILE", "").lower() == "ci" or os.environ.get("LQ_NO_WIDGETS"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _table_cases(controls: Mapping[str, Sequence[Any]], max_rows: int) -> list[dict[str, Any]]:
    """Every combination if there are few; else vary one control at a time around the first values."""
    names = list(controls)
    combos = list(itertools.product(*(controls[n] for n in names)))
    if len(combos) <= max_rows:
        return [dict(zip(names, c, strict=True)) for c in combos]
    base = {n: controls[n][0] for n in names}
    cases = [dict(base)]
    for n in names:
        for v in controls[n][1:]:
            cases.append({**base, n: v})
    return cases[:max_rows]


def interact_or_table(
    fn: Callable[..., str],
    controls: Mapping[str, Sequence[Any]],
    table: Sequence[Mapping[str, Any]] | None = None,
    max_rows: int = 24,
    force_table: bool = False,
) -> list[str] | None:
    """Show ``fn`` with one slider per control, or print it over a grid of values.

    fn: takes the controls as keyword arguments and returns one line of text.
    controls: name -> the values its slider offers (at least one each).
    table: the rows to print without widgets (default: a grid built from ``controls``).
    Returns the printed lines in table mode, ``None`` when a widget is shown.
    """
    if not controls:
        raise ValueError("controls is empty; give at least one name -> list of values")
    for name, values in controls.items():
        if isinstance(values, (str, bytes)) or len(values) == 0:
            raise ValueError(f"control {name!r} needs a non-empty list of values, got {values!r}")
    if widgets_available() and not force_table:
        import ipywidgets
        from IPython.display import display

        out = ipywidgets.Output()

        def update(**kwargs: Any) -> None:
            out.clear_output(wait=True)
            with out:
                print(fn(**kwargs))

        sliders = {
            name: ipywidgets.SelectionSlider(options=list(values), value=values[0], description=name, continuous_update=False)
            for name, values in controls.items()
        }
        ui = ipywidgets.VBox(list(sliders.values()))
        ipywidgets.interactive_output(update, sliders)
        display(ui, out)
        return None
    cases = list(table) if table is not None else _table_cases(controls, max_rows)
    lines = [fn(**case) for case in cases]
    print("\n".join(lines))
    return lines
