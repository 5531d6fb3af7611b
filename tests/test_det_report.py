"""qcap report's detection columns: box and mask AP for every backbone and random init, shown only
when the demo holds det metrics (hand-made metrics files, the real report command)."""

from __future__ import annotations

import json

from test_demo_report import FINETUNE, make_demo, run_report, table_rows, write_json

from demo.report import ROWS


def test_det_columns_appear_with_det_metrics_and_name_their_sources(tmp_path):
    plain = make_demo(tmp_path / "plain", seeds=(0,))
    assert run_report([str(plain)]) == 0
    text = (plain / "report.md").read_text()
    assert "det box AP" not in text
    assert "box_ap" not in {c["key"] for c in json.loads((plain / "report.json").read_text())["columns"]}

    demo = make_demo(tmp_path / "demo", seeds=(0,))
    box = {backbone: 0.1 + 0.05 * k for k, backbone in enumerate(FINETUNE)}
    for backbone, value in box.items():
        write_json(demo / f"finetune/{backbone}-s0/det/metrics.json",
                   {"task": "det", "metrics": {"bbox_AP": value, "segm_AP": value / 2, "bbox_APl": None}})
    assert run_report([str(demo)]) == 0
    text = (demo / "report.md").read_text()
    header = text.split("## Result", 1)[1]
    assert "det box AP ↑" in header and "det mask AP ↑" in header
    rows = table_rows(text)
    report = json.loads((demo / "report.json").read_text())
    titles = [c["title"] for c in report["columns"]]
    for row in ROWS:
        cells = rows[row.label]
        assert cells[titles.index("det box AP ↑")].startswith(f"{box[row.key]:.3f}"[:4])
        cell = report["table"][row.key]["mask_ap"]
        assert cell["sources"][0]["file"] == f"finetune/{row.key}-s0/det/metrics.json"
        assert cell["sources"][0]["key"] == "metrics.segm_AP" and cell["values"] == [box[row.key] / 2]
