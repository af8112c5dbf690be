"""The dashboard picture: every panel of the Grafana dashboard rendered from a real Prometheus
that scraped a real run (``infra/render_dashboard.py --run``), without Grafana."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from .conftest import REPO

spec = importlib.util.spec_from_file_location("render_dashboard", REPO / "infra" / "render_dashboard.py")
assert spec and spec.loader
render_dashboard = importlib.util.module_from_spec(spec)
sys.modules["render_dashboard"] = render_dashboard  # dataclasses look their module up there
spec.loader.exec_module(render_dashboard)


def test_durations_and_legends_read_as_grafana_writes_them():
    assert [render_dashboard.seconds(t) for t in ("90s", "15m", "1h", "30")] == [90, 900, 3600, 30]
    with pytest.raises(ValueError, match="not a duration"):
        render_dashboard.seconds("soon")
    labels = {"flow_type": "parametric", "freecad_version": "0.20.2", "occt_version": "7.6.3"}
    legend = "{{flow_type}} FreeCAD {{freecad_version}} / OCCT {{ occt_version }}"
    assert render_dashboard._legend(legend, labels) == "parametric FreeCAD 0.20.2 / OCCT 7.6.3"
    expr = 'rate(x{freecad_version=~"$freecad_version", flow_type=~"$flow_type"}[$__rate_interval]) [$__range]'
    assert render_dashboard._expr(expr, "1m", 600) == 'rate(x{freecad_version=~".*", flow_type=~".*"}[1m]) [600s]'


@pytest.mark.slow
def test_every_panel_is_drawn_with_data_from_a_real_run(tmp_path, engines):
    url, start, end, stop = render_dashboard.record_run(tmp_path / "run", jobs=14)
    try:
        panels = render_dashboard.query_panels(url, start, end)
    finally:
        stop()
    board = json.loads(render_dashboard.BOARD.read_text())
    assert [p.title for p in panels] == [p["title"] for p in board["panels"]]
    assert [p.title for p in panels if not p.has_data] == []
    # A heatmap of increases shows cells only where something happened within the window.
    heatmaps = [p for p in panels if p.kind == "heatmap"]
    assert heatmaps and all(any(v > 0 for _, _, values in p.series for v in values) for p in heatmaps)
    # Both version pairs on the version-split panels, as Grafana's legend would show them.
    legends = " ".join(legend for p in panels for legend, _, _ in p.series)
    assert "FreeCAD 0.20.2 / OCCT 7.6.3" in legends and "FreeCAD none / OCCT 8.0" in legends
    out = tmp_path / "dashboard.png"
    render_dashboard.draw(panels, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 300 * 1024
