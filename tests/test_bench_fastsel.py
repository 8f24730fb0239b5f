"""bench/bench_fastsel.py --quick runs and writes well-formed JSON."""

import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_fastsel.py")


def test_quick_benchmark_writes_json(tmp_path, capsys):
    pytest.importorskip("open_clip")
    spec = importlib.util.spec_from_file_location("bench_fastsel", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res" / "fastsel.json"
    mod.main(["--quick", "--out", str(out)])
    assert "(a) selection" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for key in ("machine", "versions", "settings", "selection", "indexing", "tokenize", "targets"):
        assert key in res
    assert res["settings"]["quick"] is True
    methods = {r["method"] for r in res["selection"]["rows"]}
    assert {
        "torch.sort(stable=True)",
        "torch.sort",
        "torch.topk",
        "fastsel.topk_desc",
        "fastsel topk + Tracker.record",
        "fastsel.topk_desc(k=0) (floor)",
    } <= methods
    assert all(r["median_us"] > 0 for r in res["selection"]["rows"])
    assert set(res["selection"]["ratios"]) == {"96", "160"}
    assert res["indexing"]["identical"] is True and res["indexing"]["image_files"] > 0
    assert res["tokenize"]["identical"] is True and res["tokenize"]["prompts"] == 800
