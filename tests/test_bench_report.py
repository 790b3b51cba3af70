"""bench/_report.py: each bench script rewrites only its own section of docs/benchmarks.md; the shared
--model NAME=PATH[@OPTIONS] parser, and the bench scripts that use it."""

import argparse
from pathlib import Path

import pytest

from bench import latency, speed
from bench._report import BENCHMARKS, HEADER, SUMMARY, machine_line, model_option, write_section


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


def test_a_bench_rerun_keeps_the_summary_first(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(HEADER + "\n## Summary\n\n| a | b |\n\n## Quality\n\nq1\n\n## Notes by hand\n\nn\n")
    write_section(doc, "Quality", "q2")  # replaced in place
    write_section(doc, "Latency (bench/latency.py)", "l1")  # new: appended at the end
    write_section(doc, "Speed (bench/speed.py)", "s1")
    text = doc.read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Summary", "## Quality", "## Notes by hand", "## Latency (bench/latency.py)",
                      "## Speed (bench/speed.py)"]
    assert "| a | b |" in text and "q1" not in text and "q2" in text
    with pytest.raises(ValueError, match="by hand"):
        write_section(doc, SUMMARY, "pushed")
    assert doc.read_text() == text


def test_the_real_benchmarks_doc_opens_with_a_short_summary():
    """docs/benchmarks.md: the Summary is its first section and fits a screen; every script's section is there
    once, so a rerun replaces it in place rather than appending a second copy."""
    text = BENCHMARKS.read_text()
    assert text.startswith(HEADER)
    titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert titles[0] == SUMMARY
    summary = text.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert len(summary.strip().splitlines()) <= 55
    for command in ("python -m bench.quality", "python -m bench.faithfulness", "python -m bench.speed",
                    "python -m bench.latency", "conv.pt"):
        assert command in summary
    for title in ("Quality", "Faithfulness", "Speed (bench/speed.py)", "Latency (bench/latency.py)", "Sampling"):
        assert titles.count(title) == 1, title
    assert "python bench/" not in text


def test_machine_line_names_cores_and_torch():
    line = machine_line()
    assert "cores" in line and "torch" in line


def test_model_option_parses_precision_and_flips():
    assert model_option("a=x.pt") == ("a", Path("x.pt"), {})
    assert model_option("a=dir@1/x.pt@bf16+flips") == ("a", Path("dir@1/x.pt"), {"precision": "bf16", "flips": True})
    assert model_option("a=x.pt@dejitter0") == ("a", Path("x.pt"), {"dejitter": 0})
    assert model_option("a=x.pt@noplanar+bf16") == ("a", Path("x.pt"), {"planar": False, "precision": "bf16"})
    for bad in (
        "no-equals",
        "=x.pt",
        "a=",
        "a=x.pt@half",
        "a=x.pt@bf16+mirror",
        "a=x.pt@dejitter11",
        "a=x.pt@dejitter",
        "a=x.pt@planar",
    ):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
            model_option(bad)


def test_latency_runs_each_models_options_in_the_daemon(tmp_path):
    from stemd.models.checkpoint import save_checkpoint
    from stemd.models.conv_unet import ConvDenoiser

    path = tmp_path / "c.pt"
    save_checkpoint(path, ConvDenoiser([4, 4]), {})
    args = argparse.Namespace(models=[model_option(f"c={path}@bf16+flips"), model_option(f"d={path}"),
                                      model_option(f"d={path}@dejitter0")], device="cpu", steps=None, threads=0)
    assert latency.variants(args) == [("c, bf16, flips", {"device": "cpu", "path": str(path), "precision": "bf16",
                                                          "flips": True}),
                                      ("d", {"device": "cpu", "path": str(path)}),
                                      ("d, dejitter 0", {"device": "cpu", "path": str(path), "dejitter": 0})]


def test_speed_refuses_options_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as exc:
        speed.main(["--model", "a=x.pt@bf16", "--no-write"])
    assert exc.value.code == 2 and "without @options" in capsys.readouterr().err
