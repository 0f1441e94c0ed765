"""Issue 17 item 4, "say why": no_work/failure reasons and degraded-mode notes, grouped per
task with counts and example data IDs, in the end-of-run summary and in every report form."""

from __future__ import annotations

import json
import logging
import threading

import pandas as pd
import pytest

import toytasks as toy
from procsky.errors import AlgorithmError, NoWorkError
from procsky.notes import collect_notes, note_degraded
from procsky.pipeline import Pipeline, run_pipeline
from procsky.pipeline.report import format_table, group_outcomes, normalise_reason, run_report, write_html
from procsky.repo import Repo
from procsky.tasks.base import Input, Output, Task, register_task

_VD = ("instrument", "visit", "detector")


@register_task("reasons_toy")
class ReasonsToyTask(Task):
    """Per detector: 0 has no work (rows), 1 notes a degraded mode (visit 2 fails instead),
    2 has no work (patch), 3 notes two modes."""

    dimensions = _VD
    inputs = {"raw": Input("toy_raw", _VD)}
    outputs = {"stats": Output("toy_stats", _VD)}

    def run(self, raw, data_id):
        v, d = data_id["visit"], data_id["detector"]
        if d == 0:
            raise NoWorkError(f"only {len(raw) - 30 - v} rows (< min_rows={20 + v})")
        if d == 2:
            raise NoWorkError(f"no calexp overlaps patch {{'tract': 0, 'patch': {v * 7}}}")
        if d == 1 and v == 2:
            raise AlgorithmError(f"kernel fit failed with {v + 1} stamps")
        note_degraded("few_rows", f"only {len(raw)} rows on detector {d}: mean kept", n_rows=len(raw))
        if d == 3:
            note_degraded("header_kept", f"header value {v}.5 kept", severity="info")
            note_degraded("few_rows", "noted twice: counted once")
        return {"stats": pd.DataFrame({"row": [0], "flux": [100.0 * d], "peak": [1.0]})}


@pytest.fixture
def toy_run(tmp_path):
    repo = Repo.create(tmp_path / "repo")
    toy.make_toy_inputs(repo, detectors=(0, 1, 2, 3))
    pipe = Pipeline.from_tasks([("measure", ReasonsToyTask), ("gather", toy.ToyGatherTask)])
    summary = run_pipeline(repo, pipe, output="why")  # client=None: SyncExecutor
    return repo, summary


def test_normalise_reason_groups_numbers_ids_and_paths():
    a = normalise_reason("no calexp overlaps patch {'tract': 0, 'patch': 5}")
    assert (
        a == normalise_reason("no calexp overlaps patch {'tract': 3, 'patch': 66}") == "no calexp overlaps patch {...}"
    )
    assert normalise_reason("only 3 rows (< min_rows=5)") == "only N rows (< min_rows=N)"
    assert normalise_reason("only 1.5e-3 of 512x512 pixels at [1, 2, 3]") == "only N of NxN pixels at [N, ...]"
    assert normalise_reason("cannot read /data/repo/x/1.fits: bad") == "cannot read <path>: bad"
    assert normalise_reason("psf_order2 kept") == "psf_order2 kept"  # names keep their digits


def test_note_outside_a_quantum_logs(caplog):
    with caplog.at_level(logging.WARNING, logger="procsky.notes"):
        note = note_degraded("header_wcs_kept", "header WCS kept (3 matches)", n=3)
    assert note["details"] == {"n": 3} and "header_wcs_kept" in caplog.text
    with pytest.raises(ValueError, match="snake_case"):
        note_degraded("Bad Code", "x")


def test_notes_are_per_thread_and_nested():
    seen = {}

    def worker(i):
        with collect_notes() as notes:
            note_degraded("thread_note", f"thread {i}")
            seen[i] = [n["message"] for n in notes]

    with collect_notes() as outer:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with collect_notes() as inner:
            note_degraded("inner", "inner")
        note_degraded("outer", "outer")
    assert seen == {i: [f"thread {i}"] for i in range(3)}
    assert [n["code"] for n in inner] == ["inner"] and [n["code"] for n in outer] == ["outer"]


def test_run_summary_groups_reasons_and_notes(toy_run):
    repo, s = toy_run
    assert s.counts["measure"] == {"pending": 0, "succeeded": 3, "failed": 1, "no_work": 4, "blocked": 0}
    m = s.outcomes["measure"]
    reasons = {(g["state"], g["reason"]): g for g in m["reasons"]}
    rows = reasons[("no_work", "only N rows (< min_rows=N)")]
    assert rows["count"] == 2 and rows["example"] == "only 9 rows (< min_rows=21)"
    assert [d["visit"] for d in rows["data_ids"]] == [1, 2] and rows["error_class"] == "NoWorkError"
    patch = reasons[("no_work", "no calexp overlaps patch {...}")]
    assert patch["count"] == 2 and patch["example"] == "no calexp overlaps patch {'tract': 0, 'patch': 7}"
    failed = m["reasons"][0]  # failures first
    assert failed["state"] == "failed" and failed["count"] == 1 and failed["error_class"] == "AlgorithmError"
    assert failed["data_ids"] == [{"instrument": "toycam", "visit": 2, "detector": 1}]
    deg = {g["code"]: g for g in m["degraded"]}
    assert deg["few_rows"]["count"] == 3 and deg["few_rows"]["severity"] == "warning"
    assert deg["few_rows"]["example"] == "only 40 rows on detector 1: mean kept"
    assert [(d["visit"], d["detector"]) for d in deg["few_rows"]["data_ids"]] == [(1, 1), (1, 3), (2, 3)]
    assert deg["header_kept"]["count"] == 2 and deg["header_kept"]["severity"] == "info"
    # the blocked gather of visit 2 names its failed input
    assert [g["state"] for g in s.outcomes["gather"]["reasons"]] == ["blocked"]
    text = str(s)
    print(text)
    assert "measure: succeeded 3, failed 1, no_work 4" in text
    assert (
        "no_work 2 x NoWorkError: only 9 rows (< min_rows=21)  [detector=0 instrument=toycam visit=1; "
        "detector=0 instrument=toycam visit=2]" in text
    )
    assert "no_work 2 x NoWorkError: no calexp overlaps patch {'tract': 0, 'patch': 7}" in text
    assert "failed 1 x AlgorithmError: task 'measure' on" in text
    assert (
        "degraded 3 x few_rows (warning): only 40 rows on detector 1: mean kept  ["
        "detector=1 instrument=toycam visit=1; detector=3 instrument=toycam visit=1; "
        "detector=3 instrument=toycam visit=2; ...]" not in text
    )  # exactly 3 quanta: no "..."
    assert (
        "degraded 3 x few_rows (warning): only 40 rows on detector 1: mean kept  ["
        "detector=1 instrument=toycam visit=1; detector=3 instrument=toycam visit=1; "
        "detector=3 instrument=toycam visit=2]" in text
    )
    assert "degraded 2 x header_kept (info): header value 1.5 kept" in text
    assert "gather: succeeded 1, blocked 1" in text and "blocked 1 x Blocked: input quantum measure" in text
    # the notes are in the registry's provenance and in the result of each quantum
    prov = [json.loads(r["provenance"]) for r in _rows(repo) if r["task"] == "measure" and r["state"] == "succeeded"]
    assert sorted(len(p.get("notes", [])) for p in prov) == [1, 3, 3]


def _rows(repo):
    from procsky.pipeline.graph import load_states

    return load_states(repo, "why")


def test_summary_text_is_capped():
    rows = [
        {
            "task": "t",
            "data_id": {"i": i},
            "state": "no_work",
            "error_class": "NoWorkError",
            "error_message": f"reason {chr(97 + i)} for {i}",
            "provenance": None,
        }
        for i in range(9)
    ]
    from procsky.pipeline.executor import RunSummary

    s = RunSummary("r", {"t": {"no_work": 9}}, 1.0, group_outcomes(rows))
    lines = str(s).splitlines()
    assert sum("no_work 1 x" in ln for ln in lines) == 5 and "    ... and 4 more" in lines
    assert len(lines) == 1 + 1 + 5 + 1 + 1


def test_report_json_table_and_html_show_reasons(toy_run, tmp_path):
    repo, _ = toy_run
    rep = run_report(repo, "why")
    json.dumps(rep)  # JSON-able
    assert rep["schema"] == "procsky.report/1"
    measure, gather = rep["tasks"]
    assert {(g["state"], g["reason"], g["count"]) for g in measure["reasons"]} == {
        ("failed", "task 'measure' on {...}: kernel fit failed with N stamps", 1),
        ("no_work", "only N rows (< min_rows=N)", 2),
        ("no_work", "no calexp overlaps patch {...}", 2),
    }
    assert set(measure["reasons"][0]) == {"state", "error_class", "reason", "count", "data_ids", "example"}
    assert [(g["code"], g["severity"], g["count"]) for g in measure["degraded"]] == [
        ("few_rows", "warning", 3),
        ("header_kept", "info", 2),
    ]
    assert set(measure["degraded"][0]) == {"code", "severity", "count", "data_ids", "example"}
    assert measure["degraded"][0]["data_ids"][0] == {"instrument": "toycam", "visit": 1, "detector": 1}
    assert "degraded" not in gather and gather["reasons"][0]["state"] == "blocked"
    table = format_table(rep)
    print(table)
    assert "why (quanta grouped by reason and by degraded mode" in table
    assert "  measure:\n    failed 1 x AlgorithmError: task 'measure' on" in table
    assert "    no_work 2 x NoWorkError: only 9 rows (< min_rows=21)  [detector=0 instrument=toycam visit=1;" in table
    assert "    degraded 2 x header_kept (info): header value 1.5 kept  [detector=3 instrument=toycam visit=1;" in table
    html = write_html(rep, tmp_path / "r.html").read_text()
    assert "<h2>Why: reasons and degraded modes</h2>" in html
    assert "<code>few_rows</code></td><td class='l'>only 40 rows on detector 1: mean kept</td>" in html
    assert "NoWorkError: no calexp overlaps patch {...}</td>" in html
    assert "<td>2</td>" in html and "detector=0 instrument=toycam visit=2" in html


def test_cli_report_json_has_reasons(toy_run):
    from click.testing import CliRunner

    from procsky.cli import main

    repo, _ = toy_run
    res = CliRunner().invoke(main, ["report", str(repo.root), "--run", "why", "--format", "json"])
    assert res.exit_code == 0, res.output
    measure = json.loads(res.output)["tasks"][0]
    assert measure["degraded"][0]["code"] == "few_rows" and len(measure["reasons"]) == 3


def test_tolerated_missing_inputs_are_noted(tmp_path):
    repo = Repo.create(tmp_path / "repo")
    toy.make_toy_inputs(repo, detectors=(0, 1, 2, 3))
    pipe = Pipeline.from_tasks([("measure", ReasonsToyTask), ("gather", toy.ToyGatherTolerantTask)])
    s = run_pipeline(repo, pipe, output="why")
    deg = s.outcomes["gather"]["degraded"]
    assert [(g["code"], g["count"]) for g in deg] == [("inputs_missing", 1)]
    assert deg[0]["data_ids"] == [{"instrument": "toycam", "visit": 2}]
    assert "ran without 1 input(s) of ['stats'] whose quanta failed" in deg[0]["example"]


# -- a real stage ---------------------------------------------------------------------------


def test_calibrate_without_refcat_notes_header_wcs(tmp_path):
    """calibrate on one tiny simulated detector, no reference catalogue ingested: the quantum
    succeeds and says it kept the header WCS and zero point (code ``no_refcat``)."""
    pytest.importorskip("galsim")
    import glob

    import procsky.sim as sim
    from procsky.instruments import ingest_files
    from procsky.pipeline.executor import RunSummary

    out = tmp_path / "tiny"
    sim.simulate("tiny", out, mode="calibrated", scheduler="sync", visits=[1], detectors=[0], progress=False)
    repo = Repo.create(tmp_path / "repo")
    ingest_files(repo, sorted(glob.glob(str(out / "images/*.fits"))), "simcam", run="simcam/raw")
    (tmp_path / "p.yaml").write_text("tasks:\n  - label: calibrate\n    task: calibrate\n")
    s = run_pipeline(repo, str(tmp_path / "p.yaml"), output="cal")
    assert isinstance(s, RunSummary) and s.ok, str(s)
    deg = {g["code"]: g for g in s.outcomes["calibrate"]["degraded"]}
    note = deg["no_refcat"]
    assert note["count"] == 1 and note["severity"] == "warning"
    assert note["data_ids"] == [{"detector": 0, "instrument": "simcam", "visit": 1}]
    assert note["example"] == "no reference catalogue: header WCS and header zero point kept"
    assert "degraded 1 x no_refcat (warning): no reference catalogue: header WCS and header zero point kept" in str(s)
    rep = run_report(repo, "cal")
    assert "no_refcat" in [g["code"] for g in rep["tasks"][0]["degraded"]]
    assert "no_refcat" in format_table(rep)
    # the calibrate summary says the same (the note adds no behaviour)
    stats = repo.get("calibrate_summary", {"instrument": "simcam", "visit": 1, "detector": 0}, run="cal")
    assert stats["astrometry_status"] == "header WCS (no reference catalogue)"
