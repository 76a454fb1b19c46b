"""The benchmark report (python -m benchmarks): written, read back, and updated section by section."""

from __future__ import annotations

import pytest

from benchmark_scripts import loaded


@pytest.fixture(scope="module")
def suite():
    for module in loaded("__main__.py", "benchmarks_main"):
        module.versions = lambda: "python 3, torch 2, ray 2"  # not a fresh interpreter importing both per report
        yield module


def _section(suite, name: str, output: str, status: int | str = 0):
    bench = next(b for b in suite.SUITE if b.name == name)
    return suite.Section(bench, f"python benchmarks/{bench.script} --x 1", 12.0, status, output)


def test_a_written_report_reads_back_into_the_same_sections(suite):
    sections = [_section(suite, "steady steps/s", "ratio 0.98\n(pairs 0.9-1.1)"),
                _section(suite, "goodput", "goodput 0.91", status="timed out after 600 s")]
    report = suite.render("python -m benchmarks", sections, 30.0, quick=False, note="", skipped=[])
    header, parsed = suite.parse(report)
    assert header[2].startswith("Written by `python -m benchmarks` on ")
    assert list(parsed) == ["steady steps/s", "goodput"]
    assert parsed["steady steps/s"] == sections[0]
    assert parsed["goodput"].output == "goodput 0.91" and parsed["goodput"].status == "timed out after 600 s"


def test_an_update_replaces_the_sections_it_reran_and_keeps_the_others_as_they_were(suite):
    first = [_section(suite, "steady steps/s", "old steady"), _section(suite, "recovery", "old recovery",
                                                                         status=1)]
    report = suite.render("python -m benchmarks", first, 30.0, quick=False, note="", skipped=[])
    updated = suite.update(report, "python -m benchmarks --only recovery --update",
                           [_section(suite, "recovery", "new recovery")], 5.0)
    header, parsed = suite.parse(updated)
    assert parsed["steady steps/s"] == first[0]
    assert parsed["recovery"].output == "new recovery" and parsed["recovery"].status == 0
    assert header[2].startswith("Written by `python -m benchmarks` on ")  # the original run stays named
    assert header[-1].startswith("- re-run: recovery, by `python -m benchmarks --only recovery --update` on ")
    assert "| recovery | `recovery.py` | 12 s | ok |" in updated
    # the suite's order, whatever the order of the runs; a script never run is listed as such
    names = [line[3:] for line in updated.splitlines() if line.startswith("## ")]
    assert names == [b.name for b in suite.SUITE if b.name in ("steady steps/s", "recovery")]
    assert "| goodput | `goodput.py` | - | not run |" in updated

    # a section re-run again is named only by its latest run; a line left naming nothing goes
    again = suite.update(updated, "python -m benchmarks --only recovery fit_vs_ddp --update",
                         [_section(suite, "steady steps/s", "newer steady"), _section(suite, "recovery", "newest")], 5.0)
    header, parsed = suite.parse(again)
    reruns = [line for line in header if line.startswith("- re-run:")]
    assert len(reruns) == 1 and reruns[0].startswith("- re-run: steady steps/s, recovery, by `python -m benchmarks "
                                                     "--only recovery fit_vs_ddp --update` on ")
    assert parsed["recovery"].output == "newest" and parsed["steady steps/s"].output == "newer steady"


def test_update_without_only_or_without_a_report_is_refused_naming_what_to_give(suite, tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--update", "--out", str(tmp_path / "report.md")])
    assert "give --only NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--only", "goodput", "--update", "--out", str(tmp_path / "report.md")])
    assert "needs an existing report at --out" in capsys.readouterr().err
