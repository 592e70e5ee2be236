"""Loss curves as Vega-Lite charts, shown by a gr.Plot.

gr.LinePlot draws lines only: a validation loss, measured at step 0 and then every eval_interval steps, was
invisible while it had one point (a line needs two) and hard to make out after. Gradio's frontend draws a
Vega-Lite spec itself (with vega-embed, as for Altair charts), so a spec written here adds no dependency and
can put a dot on each measured point. Every update sends the whole chart (data, title, axis range) at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd
from gradio.components.plot import PlotData

# Readable on the light and the dark theme; the text takes the theme's font and colour (.curve-chart in ui/app.py).
GRID_COLOUR = "rgba(128, 128, 128, 0.25)"
# the y axis' labels take at least this width: the loss and learning-rate charts, one above the other, start
# their steps at the same x (0.0001 is wider than 7.25)
Y_LABELS_PX = 56
POINT_SIZE = 45   # the area of a measured point's dot, in square pixels (the lines are 2 px wide)

# What a curve can be plotted against: {frame column: (axis title, Vega-Lite axis, the tooltip's number format)}
X_AXES = {
    "step": ("step", {"format": "d", "tickMinStep": 1}, "d"),   # whole steps, also on a short curve
    # 250k, 1.5M; a tick every 40 px (Vega's default) crowded the axis with "0.5k 1k 1.5k ..."
    "tokens_seen": ("tokens seen", {"format": "~s", "tickCount": 10}, ",d"),
    "train_min": ("training time (minutes)", {"format": "~g", "tickCount": 10}, ".2f"),
    "train_s": ("training time (seconds)", {"format": "~g", "tickCount": 10}, ".1f"),   # runs of under 2 minutes
}


def curve_chart(frame: pd.DataFrame, *, y: str, series: str, colours: dict[str, str], title: str, height: int,
                x: str = "step", x_domain: list[int] | None = None, dotted: Iterable[str] = (),
                legend: bool = True) -> PlotData:
    """A line per `series` value of `frame` (columns `x`, `y`, `series`) in its colour of `colours`; the series in
    `dotted` also have a dot on each point (a single point is a dot alone). The others get invisible dots, which
    give the hover tooltip of the point nearest to the mouse. `x`: a key of X_AXES; `x_domain`: its range (None:
    the data's); `legend`: False for a single curve the title names."""
    x_title, x_axis, x_format = X_AXES[x]
    present = set(frame[series])
    shown = [name for name in colours if name in present]   # the legend names only the curves drawn
    dotted = [name for name in shown if name in set(dotted)]

    def layer(names: list[str], point: dict | str) -> dict:
        return {"transform": [{"filter": {"field": series, "oneOf": names}}],
                "mark": {"type": "line", "point": point}}

    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        # svg: the text is in the page, where the app's CSS styles it (and tests read it); no export menu
        "usermeta": {"embedOptions": {"renderer": "svg", "actions": False}},
        "title": title,
        "width": "container",
        "height": height,
        "autosize": {"type": "fit", "contains": "padding"},
        "background": "transparent",
        "config": {"axis": {"gridColor": GRID_COLOUR, "tickColor": GRID_COLOUR, "domain": False,
                            "titleFontWeight": "normal"},
                   "view": {"stroke": GRID_COLOUR}},
        "data": {"values": frame.to_dict(orient="records")},
        "encoding": {
            "x": {"field": x, "type": "quantitative", "title": x_title, "axis": x_axis,
                  "scale": {"zero": False, **({"domain": x_domain} if x_domain else {})}},
            # no axis title: the chart's title names the quantity (and the page's font, wider than the one Vega
            # lays out with, pushed a title into the tick labels)
            # format: 5.5, not 5.500000 on a one-point curve's axis
            "y": {"field": y, "type": "quantitative", "title": None, "scale": {"zero": False},
                  "axis": {"format": "~g", "minExtent": Y_LABELS_PX}},
            "color": {"field": series, "type": "nominal", "title": None,
                      "legend": {"orient": "bottom"} if legend and shown else None,   # an empty one collapses it
                      "scale": {"domain": shown, "range": [colours[name] for name in shown]}},
            "tooltip": [{"field": series, "type": "nominal"}, {"field": x, "type": "quantitative", "title": x_title,
                         "format": x_format},
                        {"field": y, "type": "quantitative", "format": ".4g"}],
        },
        "layer": [layer([name for name in shown if name not in dotted], "transparent"),
                  layer(dotted, {"filled": True, "size": POINT_SIZE, "opacity": 1})],
    }
    return PlotData(type="altair", plot=json.dumps(spec))
