"""The benchmarks' dependency-free SVG plot: well-formed, one line per series, points where the axes say."""

import xml.etree.ElementTree as ET

from afterburner.plugins.devtools.svg_plot import line_plot

NS = "{http://www.w3.org/2000/svg}"


def _lines(path):
    root = ET.parse(path).getroot()
    return root, [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
                  for line in root.iter(f"{NS}polyline")]


def test_a_linear_plot_puts_higher_values_higher_and_dashes_what_it_is_told(tmp_path):
    path = tmp_path / "p.svg"
    line_plot({"dense": [(1024, 1.0), (2048, 0.5)], "squeezed 1/4": [(1024, 0.25), (2048, 0.0)]}, path,
              x_label="context tokens", y_label="accuracy", y_max=1.0, dashed=("squeezed",))
    root, lines = _lines(path)
    assert len(lines) == 2
    (x0, y_one), (x1, y_half) = lines[0]
    assert x0 < x1 and y_one < y_half  # SVG y grows downwards
    assert lines[1][1][1] > y_half  # 0.0 sits below 0.5
    dashed = [line.get("stroke-dasharray") for line in root.iter(f"{NS}polyline")]
    assert dashed == [None, "6 3"]
    assert {t.text for t in root.iter(f"{NS}text")} >= {"context tokens", "accuracy", "dense", "squeezed 1/4"}


def test_a_log_plot_spaces_decades_evenly(tmp_path):
    path = tmp_path / "p.svg"
    line_plot({"op": [(1, 1.0), (2, 10.0), (4, 100.0)]}, path, x_label="x", y_label="ms", log_y=True)
    _, [points] = _lines(path)
    ys = [y for _, y in points]
    assert ys[0] > ys[1] > ys[2]
    assert abs((ys[0] - ys[1]) - (ys[1] - ys[2])) < 1e-6
