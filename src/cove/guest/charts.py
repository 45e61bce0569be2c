"""Chart and table data for code contexts: what a matplotlib figure shows, and a DataFrame's columns,
as JSON beside the PNG and HTML, so that a client can draw its own interactive chart or read the
numbers without parsing pixels (e2b's `result.chart` and `result.data`).

Loaded into each Python context's kernel by the kernel bridge (`register`), it adds two IPython
display formatters:

* `application/vnd.cove.chart+json` for a `Figure`: `{"type": "line"|"scatter"|"bar"|"pie"|
  "box_and_whisker"|"superchart"|"unknown", "title", "elements": [...]}`, plus for 2-D charts
  `x_label`, `y_label`, `x_unit`, `y_unit` (from a label's "(unit)" or "[unit]"), and for line and
  scatter charts `x_ticks`, `x_tick_labels`, `x_scale`, the same for y, and elements
  `{"label", "points": [[x, y], ...]}` (dates as ISO strings, categories as their names). Bars are
  `{"label", "group", "value"}`, pie wedges `{"label", "angle", "radius"}`, boxes `{"label", "min",
  "first_quartile", "median", "third_quartile", "max", "outliers"}`; a figure of several axes is a
  superchart whose elements are the charts of its axes.
* `application/vnd.cove.data+json` for a pandas `DataFrame`: its columns, `{name: [values]}`.

Runs in the kernel's interpreter (matplotlib is there; pandas only if the user imported it). A figure
it cannot read gives no chart rather than an error: the PNG is still there.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
from typing import Any

CHART_MIME = "application/vnd.cove.chart+json"
DATA_MIME = "application/vnd.cove.data+json"
_UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")


def _num(v: Any) -> Any:
    """A JSON-safe number (NaN and infinities have no JSON form); a Python int stays one."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return None if math.isnan(f) or math.isinf(f) else f


def _label(artist: Any) -> str:
    text = str(artist.get_label() or "")
    return "" if text.startswith("_") else text  # matplotlib's "_child0": no label given


def _unit(label: str | None) -> str | None:
    m = _UNIT.search(label or "")
    return (m.group(1) or m.group(2)) if m else None


def _scale(axis: Any) -> str:
    """linear, log, …; or datetime / categorical, which matplotlib keeps in the axis' units."""
    from matplotlib import category, dates

    if isinstance(
        axis.get_converter() if hasattr(axis, "get_converter") else axis.converter, dates.DateConverter
    ):
        return "datetime"
    if isinstance(getattr(axis, "units", None), category.UnitData):
        return "categorical"
    if isinstance(
        axis.get_major_formatter(), dates.DateFormatter | dates.AutoDateFormatter | dates.ConciseDateFormatter
    ):
        return "datetime"
    return str(axis.get_scale())


def _value(axis: Any, scale: str, v: Any) -> Any:
    """A data value as the reader knows it: a date, a category's name, or the number."""
    if scale == "datetime":
        from matplotlib import dates

        try:
            return dates.num2date(float(v)).replace(tzinfo=None).isoformat()
        except (TypeError, ValueError, OverflowError):
            return _num(v)
    if scale == "categorical":
        names = {int(i): str(name) for name, i in axis.units._mapping.items()}
        try:
            return names.get(round(float(v)), _num(v))
        except (TypeError, ValueError):
            return str(v)
    return _num(v)


def _two_d(ax: Any, kind: str) -> dict[str, Any]:
    x_label, y_label = ax.get_xlabel() or None, ax.get_ylabel() or None
    return {
        "type": kind,
        "title": ax.get_title() or None,
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
        "elements": [],
    }


def _points(ax: Any, kind: str, series: list[tuple[str, list[tuple[Any, Any]]]]) -> dict[str, Any]:
    chart = _two_d(ax, kind)
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        scale = _scale(axis)
        chart[f"{name}_scale"] = scale
        chart[f"{name}_ticks"] = [_value(axis, scale, t) for t in axis.get_ticklocs()]
        chart[f"{name}_tick_labels"] = [t.get_text() for t in axis.get_ticklabels()]
    xs, ys = chart["x_scale"], chart["y_scale"]
    chart["elements"] = [
        {"label": label, "points": [[_value(ax.xaxis, xs, x), _value(ax.yaxis, ys, y)] for x, y in pts]}
        for label, pts in series
    ]
    return chart


def _tick_name(axis: Any, at: float) -> str:
    """The tick label nearest to `at` (a bar's or box's position), else the position itself."""
    best, name = None, ""
    for loc, text in zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=False):
        if best is None or abs(loc - at) < best:
            best, name = abs(loc - at), text.get_text()
    return name if best is not None and best < 0.5 else f"{at:g}"


def _bars(ax: Any) -> dict[str, Any]:
    from matplotlib.container import BarContainer

    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    vertical = all(getattr(c, "orientation", "vertical") == "vertical" for c in containers)
    chart = _two_d(ax, "bar")
    if not vertical:  # horizontal bars: the categories are on y, the values on x
        chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
        chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]
    for i, container in enumerate(containers):
        group = _label(container) or str(i)
        for rect in container:
            if vertical:
                where, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
                label = _tick_name(ax.xaxis, where)
            else:
                where, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
                label = _tick_name(ax.yaxis, where)
            chart["elements"].append({"label": label, "group": group, "value": _num(value)})
    return chart


def _pie(ax: Any) -> dict[str, Any]:
    return {
        "type": "pie",
        "title": ax.get_title() or None,
        "elements": [
            {"label": _label(w), "angle": round(abs(w.theta2 - w.theta1), 4), "radius": _num(w.r)}
            for w in ax.patches
        ],
    }


def _box_frames(ax: Any) -> list[tuple[float, float, float, float]]:
    """The boxes of a box plot as (x0, x1, y0, y1): PathPatches (patch_artist=True) or closed
    five-point lines (the default)."""
    from matplotlib.patches import PathPatch

    frames = []
    shapes = [p.get_path().vertices for p in ax.patches if isinstance(p, PathPatch)]
    shapes += [line.get_xydata() for line in ax.lines if len(line.get_xdata()) == 5]
    for v in shapes:
        xs, ys = [float(p[0]) for p in v], [float(p[1]) for p in v]
        frames.append((min(xs), max(xs), min(ys), max(ys)))
    return frames


def _boxes(ax: Any) -> dict[str, Any] | None:
    """A box-and-whisker chart if the axes hold boxes with medians, whiskers and fliers, else None."""
    frames = _box_frames(ax)
    if not frames:
        return None
    segments = [line for line in ax.lines if len(line.get_xdata()) == 2]
    fliers = [
        line for line in ax.lines if line.get_linestyle() in ("None", "") and len(line.get_xdata()) != 2
    ]
    # Vertical boxes: whiskers are vertical segments (equal x); horizontal: equal y.
    vertical = any(s.get_xdata()[0] == s.get_xdata()[1] for s in segments) or not segments
    chart = _two_d(ax, "box_and_whisker")
    if not vertical:
        chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
        chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]
    for x0, x1, y0, y1 in sorted(frames):
        if not vertical:  # work in the box's own terms: position across, values along
            x0, x1, y0, y1 = y0, y1, x0, x1
        mid = (x0 + x1) / 2
        low, high, median = y0, y1, None
        outliers: list[Any] = []
        for s in segments:
            a, b = (s.get_xdata(), s.get_ydata()) if vertical else (s.get_ydata(), s.get_xdata())
            a0, a1, b0, b1 = float(a[0]), float(a[1]), float(b[0]), float(b[1])
            if b0 == b1 and x0 - 1e-9 <= min(a0, a1) and max(a0, a1) <= x1 + 1e-9 and y0 <= b0 <= y1:
                median = b0  # a horizontal segment across the box
            elif a0 == a1 and abs(a0 - mid) < 1e-9:  # a whisker, from the box outward
                low, high = min(low, b0, b1), max(high, b0, b1)
        for f in fliers:
            a, b = (f.get_xdata(), f.get_ydata()) if vertical else (f.get_ydata(), f.get_xdata())
            outliers += [_num(v) for p, v in zip(a, b, strict=False) if abs(float(p) - mid) < (x1 - x0)]
        if median is None:
            return None
        axis = ax.xaxis if vertical else ax.yaxis
        chart["elements"].append(
            {
                "label": _tick_name(axis, mid),
                "min": _num(low),
                "first_quartile": _num(y0),
                "median": _num(median),
                "third_quartile": _num(y1),
                "max": _num(high),
                "outliers": outliers,
            }
        )
    return chart


def axes_chart(ax: Any) -> dict[str, Any]:
    """The chart of one Axes, by what it holds."""
    from matplotlib.collections import PathCollection
    from matplotlib.patches import PathPatch, Rectangle, Wedge

    lines = [line for line in ax.lines if line.get_visible()]
    patches = list(ax.patches)
    collections = list(ax.collections)
    if patches and all(isinstance(p, Wedge) for p in patches) and not lines and not collections:
        return _pie(ax)
    if (any(isinstance(p, PathPatch) for p in patches) or any(len(li.get_xdata()) == 5 for li in lines)) and (
        box := _boxes(ax)
    ):
        return box
    if ax.containers and patches and all(isinstance(p, Rectangle) for p in patches) and not collections:
        return _bars(ax)
    if collections and all(isinstance(c, PathCollection) for c in collections) and not lines and not patches:
        series = [(_label(c), [tuple(p) for p in c.get_offsets()]) for c in collections]
        return _points(ax, "scatter", series)
    if lines and not patches and not collections:
        return _points(
            ax,
            "line",
            [(_label(li), list(zip(li.get_xdata(), li.get_ydata(), strict=False))) for li in lines],
        )
    return {"type": "unknown", "title": ax.get_title() or None, "elements": []}


def figure_chart(fig: Any) -> dict[str, Any]:
    axes = fig.get_axes()
    if not axes:
        return {}
    if len(axes) == 1:
        return axes_chart(axes[0])
    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else None
    return {"type": "superchart", "title": title or None, "elements": [axes_chart(ax) for ax in axes]}


def frame_data(df: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, values in df.to_dict(orient="list").items():
        out[str(name)] = [
            v.isoformat() if isinstance(v, datetime.date | datetime.datetime) else _json_value(v)
            for v in values
        ]
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, bool | str) or v is None:
        return v
    if isinstance(v, int | float):
        return _num(v)
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        return _json_value(item())
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def register(shell: Any) -> None:
    """Add the two formatters to an IPython shell."""
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_cove_chart_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            figure = sys.modules.get("matplotlib.figure")
            if figure is not None and isinstance(obj, figure.Figure):
                try:
                    return figure_chart(obj) or None
                except Exception:  # an odd figure: its PNG is still shown
                    return None
            return super().__call__(obj)

    class DataFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode(DATA_MIME)
        print_method = ObjectName("_repr_cove_data_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            pandas = sys.modules.get("pandas")  # a DataFrame exists only if the user imported pandas
            if pandas is not None and isinstance(obj, pandas.DataFrame):
                try:
                    return frame_data(obj)
                except Exception:
                    return None
            return super().__call__(obj)

    formatters = shell.display_formatter.formatters
    formatters[CHART_MIME] = ChartFormatter(parent=shell.display_formatter)
    formatters[DATA_MIME] = DataFormatter(parent=shell.display_formatter)
