"""bench/_report.py: each bench script rewrites only its own section of docs/benchmarks.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _report import HEADER, machine_line, write_section  # noqa: E402


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    write_section(doc, "Quality", "q1")
    write_section(doc, "Speed (bench/speed.py)", "s1")
    write_section(doc, "Quality", "q2\n\n| a | b |")
    text = doc.read_text()
    assert text.startswith(HEADER)
    assert "q1" not in text and "q2" in text and "s1" in text
    assert text.index("## Quality") < text.index("## Speed (bench/speed.py)")
    assert text.count("## Quality") == 1


def test_machine_line_names_cores_and_torch():
    line = machine_line()
    assert "cores" in line and "torch" in line
