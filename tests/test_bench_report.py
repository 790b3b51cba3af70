"""bench/_report.py: each bench script rewrites only its own section of docs/benchmarks.md; the shared
--model NAME=PATH[@OPTIONS] parser, and the bench scripts that use it."""

import argparse
from pathlib import Path

import pytest
import torch

from bench import latency, speed
from bench._report import HEADER, machine_line, model_option, write_section


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


def test_model_option_parses_precision_and_flips():
    assert model_option("a=x.pt") == ("a", Path("x.pt"), {})
    assert model_option("a=dir@1/x.pt@bf16+flips") == ("a", Path("dir@1/x.pt"), {"precision": "bf16", "flips": True})
    assert model_option("a=x.pt@dejitter0") == ("a", Path("x.pt"), {"dejitter": 0})
    assert model_option("a=x.pt@noplanar+bf16") == ("a", Path("x.pt"), {"planar": False, "precision": "bf16"})
    for bad in ("no-equals", "=x.pt", "a=", "a=x.pt@half", "a=x.pt@bf16+mirror", "a=x.pt@dejitter11", "a=x.pt@dejitter", "a=x.pt@planar"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
            model_option(bad)


def test_latency_runs_each_models_options_in_the_daemon(tmp_path):
    from stemd.convnet import ConvDenoiser
    from stemd.model import save_checkpoint

    path = tmp_path / "c.pt"
    save_checkpoint(path, ConvDenoiser([4, 4]), {})
    args = argparse.Namespace(models=[model_option(f"c={path}@bf16+flips"), model_option(f"d={path}"),
                                      model_option(f"d={path}@dejitter0")], device="cpu", steps=None)
    assert latency.variants(args) == [("c, bf16, flips", {"device": "cpu", "path": str(path), "precision": "bf16",
                                                          "flips": True}),
                                      ("d", {"device": "cpu", "path": str(path)}),
                                      ("d, dejitter 0", {"device": "cpu", "path": str(path), "dejitter": 0})]


def test_speed_refuses_options_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as exc:
        speed.main(["--model", "a=x.pt@bf16", "--no-write"])
    assert exc.value.code == 2 and "without @options" in capsys.readouterr().err
