"""The object-catalogue benchmark's smallest mode runs end to end (so that it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(shutil.which("source-extractor") is None, reason="needs SExtractor (Debian source-extractor)")
def test_bench_objects_smallest(tmp_path, monkeypatch):
    # Loaded by path: the benchmark is a script, not a module of the package.
    spec = importlib.util.spec_from_file_location("bench_objects", BENCH / "bench_objects.py")
    assert spec is not None and spec.loader is not None
    bench_objects = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_objects", bench_objects)
    spec.loader.exec_module(bench_objects)

    out = tmp_path / "res.json"
    bench_objects.main(
        ["--size", "256", "--bands", "g,r", "--density", "60", "--no-warmup"]
        + ["--workdir", str(tmp_path), "--json", str(out)]
    )
    res = json.loads(out.read_text())
    ev = res["eval"]
    assert ev["n_truth_snr10"] >= 10
    for tool in ("procsky", "sextractor"):
        # both tools find most of the bright truth objects of the tiny scene, none far from truth
        assert ev["tools"][tool]["completeness_snr10"] > 0.5
        assert ev["tools"][tool]["spurious"] < 0.1
        assert res["runs"][tool]["cpu_s"][0] > 0 and res["runs"][tool]["peak_rss_mib"][0] > 0
    iso = ev["isolated_snr10"]
    assert iso["n_common"] >= 5
    assert iso["flux_mad[procsky:truth-kind]"] < 0.1 and iso["flux_mad[sextractor:auto]"] < 0.2
    assert set(ev["pairs"]) == {"1-1.5", "1.5-2", "2-3"}
    assert set(res["sky_object_pulls"]) == {"g", "r"}
