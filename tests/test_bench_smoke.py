"""Smoke test of the quality bench (bench/quality.py): digits-cnn, round to nearest and squash, bits 8 and 4."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_quality_bench_digits(tmp_path):
    pytest.importorskip("matplotlib")
    from quality import run_quality

    rows = run_quality("digits-cnn", methods=["fp32", "rtn", "squash"], bits_list=[8, 4], quick=True,
                       out_dir=tmp_path, show_progress=False)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"quality-digits-cnn.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "quality-digits-cnn.json").read_text())
    assert saved["meta"]["model"] == "digits-cnn" and len(saved["rows"]) == len(rows)

    by = {(r["method"], r["bits"]): r for r in rows}
    assert set(by) == {("fp32", 32), ("rtn", 8), ("rtn", 4), ("squash", 8), ("squash", 4)}
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    ref = by[("fp32", 32)]
    assert ref["bits_per_weight"] == pytest.approx(32)
    float_acc = ref["quality"]["accuracy"]
    assert float_acc > 0.9
    for method in ("rtn", "squash"):
        eight, four = by[(method, 8)], by[(method, 4)]
        assert 8.0 < eight["bits_per_weight"] < 9.0  # codes + per-channel scales + float biases
        assert 4.0 < four["bits_per_weight"] < 5.5  # groups of 64 on this small model's short rows
        assert abs(eight["quality"]["accuracy"] - float_acc) <= 0.02
        assert abs(four["quality"]["accuracy"] - float_acc) <= 0.05
        assert eight["quality"]["accuracy_float"] == float_acc  # every row scored against the same reference
        assert eight["compress_seconds"] >= 0 and eight["peak_rss_mb"] > 0
    assert by[("squash", 8)]["file_bytes"] > 0 and by[("rtn", 8)]["file_bytes"] is None
    table = (tmp_path / "quality-digits-cnn.md").read_text()
    assert "| rtn | 4 |" in table and "| squash | 8 | int8 |" in table
