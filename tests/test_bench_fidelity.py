"""bench/fidelity.py: a quick run on simulated series (no download, no daemon): the table, the agreement of the
estimate with the truth, the wrong model flagged and the right one not, the figure."""

from __future__ import annotations

from bench import fidelity


def test_quick_run_flags_the_wrong_model_only_and_writes_its_section(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Speed\n\nkept\n")
    assert fidelity.main(["--quick", "--no-real", "--no-latency", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Speed\n\nkept" in text and f"## {fidelity.TITLE}" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith(("| conv |", "| paper AE, as is |"))]
    assert len(rows) == 6  # 2 structures x 2 doses with conv, the 25 px lattice at 2 doses with the wrong model
    for cells in rows:
        wrong = cells[1].strip() == "paper AE, as is"
        assert ("yes" in cells[11]) is wrong, cells
        assert (float(cells[9].split("±")[0]) < 0) is wrong  # the estimate over the reference says so too
    agreement = [line.split("|") for line in text.splitlines() if line.startswith("| gain over the reference")]
    assert float(agreement[0][2]) > 0.9  # Pearson r of estimate and truth across the series
    assert (tmp_path / "fidelity.png").stat().st_size > 0
