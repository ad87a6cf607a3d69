"""Training's command lines: every mistake is one line on stderr and exit status 2, found before any
slow work; a good run ends by saying where its outputs went."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from training import evaluate, tables
from training import train as train_cli
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny-test.toml"
PRESET_LINE = TINY.read_text().splitlines().index('preset = "lite"') + 1
PRESET_LIST = "valid presets: facecompressor, facecompressor-48, facecompressor-96, lite, lite-v1"


def outputs(tmp: Path) -> list[str]:
    """--set items that keep a run's outputs (and cache) under tmp."""
    return ["--set", f'out_dir="{(tmp / "run").as_posix()}"', "--set", f'log_dir="{(tmp / "runs").as_posix()}"',
            "--set", f'data.cache_dir="{(tmp / "cache").as_posix()}"']


def tiny(tmp: Path, *sets: str) -> list[str]:
    """The tiny config with its outputs under tmp and `sets` as --set items."""
    argv = ["--config", str(TINY), *outputs(tmp)]
    for item in sets:
        argv += ["--set", item]
    return argv


def config_file(tmp: Path, text: str, name: str = "bad.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def tiny_with(tmp: Path, section: str, line: str) -> tuple[list[str], int]:
    """The tiny config's text with `line` added under [section] (or at the top): (argv, its line number)."""
    lines = TINY.read_text().splitlines()
    at = lines.index(f"[{section}]") + 1 if section else 0
    lines.insert(at, line)
    return ["--config", str(config_file(tmp, "\n".join(lines) + "\n")), *outputs(tmp)], at + 1


def folder(tmp: Path, files: dict[str, bytes]) -> Path:
    d = tmp / "media"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def with_data(tmp: Path, files: dict[str, bytes]) -> list[str]:
    d = folder(tmp, files).as_posix()
    return tiny(tmp, "data.synthetic=0", f'data.train="{d}"', f'data.val="{d}"')


def a_png(tmp: Path) -> Path:
    from PIL import Image

    d = tmp / "stills"
    d.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(d / "grey.png")
    return d


def stderr_lines(err: str) -> list[str]:
    """Lines of stderr as a terminal shows them: a progress bar erased with \\r is not a line."""
    return [s.rsplit("\r", 1)[-1] for s in err.split("\n") if s.rsplit("\r", 1)[-1].strip()]


# (id, argv from tmp_path, what the one line must say)
CASES: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    ("malformed TOML", lambda t: ["--config", str(config_file(t, 'name = "x"\nseed = \n'))],
     ["bad.toml:2:", "invalid TOML"]),
    ("missing config file", lambda t: ["--config", str(t / "missing.toml")], ["no config file at", "missing.toml"]),
    ("missing data folder", lambda t: tiny(t, "data.synthetic=0", f'data.train="{t}/nope"', f'data.val="{t}/nope"'),
     ["[data] train", "no data folder at", "nope"]),
    ("data folder without videos or images", lambda t: with_data(t, {"notes.txt": b"hello"}),
     ["[data] train", "no video or image file under"]),
    ("data folder with only unreadable files", lambda t: with_data(t, {"broken.mp4": b"not a video"}),
     ["[data] train", "none of the 1 file(s) could be read"]),
    ("unknown preset in the file",
     lambda t: ["--config", str(config_file(t, TINY.read_text().replace('preset = "lite"', 'preset = "lit"')))],
     [f"bad.toml:{PRESET_LINE}:", "unknown model preset 'lit'", "did you mean 'lite'?", PRESET_LIST]),
    ("unknown preset by --set", lambda t: tiny(t, "model.preset=big"),
     ["--set model.preset=big", "unknown model preset 'big'", PRESET_LIST]),
    ("string where a number goes", lambda t: tiny_with(t, "stage1", 'min_lr = "fast"')[0],
     ["bad.toml:", "[stage1] min_lr must be a number, got 'fast' (a string)"]),
    ("list where an integer goes", lambda t: tiny(t, "stage1.batch_size=[16]"),
     ["--set stage1.batch_size=[16]", "[stage1] batch_size must be an integer, got [16] (a list)"]),
    ("float where an integer goes", lambda t: tiny(t, "stage2.max_steps=1.5"),
     ["[stage2] max_steps must be an integer, got 1.5"]),
    ("integer where a list goes", lambda t: tiny(t, "stages=1"), ["stages must be a list of integers, got 1"]),
    ("string where true/false goes", lambda t: tiny(t, 'stage2.freeze_bn="yes"'),
     ["[stage2] freeze_bn must be true or false, got 'yes' (a string)"]),
    ("--set without =", lambda t: tiny(t, "stage1.max_steps"),
     ["--set 'stage1.max_steps'", "expected SECTION.KEY=VALUE"]),
    ("--set unknown section", lambda t: tiny(t, "stage3.lr=1"),
     ["--set stage3.lr=1", "unknown section [stage3]", "valid sections: model, quantizer, data, stage1, stage2"]),
    ("--set unknown key", lambda t: tiny(t, "stage2.batchsize=4"),
     ["--set stage2.batchsize=4", "unknown key 'batchsize' in [stage2]", "did you mean 'batch_size'?", "valid keys:"]),
    ("--set unparsable value", lambda t: tiny(t, "stage1.lr=fast"),
     ["--set stage1.lr=fast", "cannot read 'fast' as a number"]),
    ("--set unparsable list", lambda t: tiny(t, "quantizer.steps=[0.1,"), ["cannot read '[0.1,' as a list of numbers"]),
    ("--set a section as a value", lambda t: tiny(t, "model=3"), ["[model] is a section"]),
    ("stages outside 1, 2", lambda t: tiny(t, "stages=[3]"), ["stages must be [1], [2] or [1, 2], got [3]"]),
    ("quantizer level out of range",
     lambda t: tiny(t, 'quantizer.mode="step"', "quantizer.bits=8", "quantizer.steps=[0.1]", "quantizer.level=3"),
     ["--set quantizer.level=3", "[quantizer]", "level 3 outside 0..0"]),
    ("model field out of range", lambda t: tiny(t, "model.latent_channels=0"),
     ["--set model.latent_channels=0", "[model]", "latent_channels"]),
    ("crop larger than the cache", lambda t: tiny(t, "stage1.crop=64"),
     ["[stage1] crop must be a multiple of 8 no larger than [data] cache_size 32, got 64"]),
    ("unknown data layout", lambda t: tiny(t, "data.layout=vox"), ["[data] layout must be 'folder' or 'voxceleb'"]),
    ("missing init_from", lambda t: tiny(t, f"init_from={t}/none/best-stage1.json"),
     ["init_from: no codec weights at"]),
]
# a misspelt key in every section (and at the top level), written in the file
MISSPELT = [("", "sed", "seed"), ("model", "latent_channel", "latent_channels"), ("quantizer", "bit", "bits"),
            ("data", "cachesize", "cache_size"), ("stage1", "batchsize", "batch_size"),
            ("stage2", "max_step", "max_steps")]


def assert_one_line_error(rc: int, err: str, prog: str, expected: list[str]) -> str:
    lines = stderr_lines(err)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.mark.parametrize("make_argv, expected", [pytest.param(m, e, id=i) for i, m, e in CASES])
def test_train_mistake_is_one_line_and_exit_2(tmp_path, capsys, make_argv, expected):
    rc = train_cli.main(make_argv(tmp_path))
    assert_one_line_error(rc, capsys.readouterr().err, "train", expected)
    assert not (tmp_path / "run" / "ckpt.json").exists()  # nothing trained


@pytest.mark.parametrize("section, wrong, right", MISSPELT, ids=[s or "top level" for s, _, _ in MISSPELT])
def test_train_misspelt_key_names_its_file_line_section_and_the_closest(tmp_path, capsys, section, wrong, right):
    argv, line = tiny_with(tmp_path, section, f"{wrong} = 1")
    rc = train_cli.main(argv)
    where = f"in [{section}]" if section else "unknown top-level key"
    assert_one_line_error(rc, capsys.readouterr().err, "train",
                          [f"bad.toml:{line}:", f"'{wrong}'", where, f"did you mean '{right}'?", "valid keys:", right])


def test_train_cli_mistake_has_no_traceback_in_a_real_process(tmp_path):
    """The real command line (python -m training.train), not main() in this process."""
    p = subprocess.run([sys.executable, "-m", "training.train", *tiny(tmp_path, "stage1.batchsize=4")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "train", ["unknown key 'batchsize' in [stage1]"])


def test_train_without_tensorboard_names_the_extra(tmp_path):
    """Without the [train] extra: tensorboard blocked from importing (sys.modules[...] = None)."""
    code = ("import sys; sys.modules['tensorboard'] = None; from training.train import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, *tiny(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_one_line_error(p.returncode, p.stderr, "train",
                          ["tensorboard is not installed", "[train] extra", "pip install 'neural-video-call[train]'"])
    assert not (tmp_path / "run").exists()


def test_train_without_tqdm_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    rc = train_cli.main(tiny(tmp_path))
    assert_one_line_error(rc, capsys.readouterr().err, "train",
                          ["tqdm is not installed", "pip install 'neural-video-call[train]'"])


def test_train_run_ends_by_saying_where_its_outputs_went(tmp_path, capsys):
    assert train_cli.main(tiny(tmp_path, "stage1.max_steps=4", "stage2.max_steps=2")) == 0
    out = capsys.readouterr().out
    tail = out[out.index("outputs:"):].splitlines()
    run = (tmp_path / "run").as_posix()
    assert any(s.split()[:2] == ["codec", "weights:"] and s.split()[2] == f"{run}/best.json" for s in tail), tail
    assert any(s.split()[:2] == ["checkpoint:", f"{run}/ckpt.json"] and "--resume" in s for s in tail), tail
    assert any(s.split()[:2] == ["TensorBoard:", (tmp_path / "runs").as_posix()] for s in tail), tail


def test_every_shipped_config_passes_the_checks():
    """No false alarms: the shipped configs load (data folders and init_from left out)."""
    for path in sorted((ROOT / "training" / "configs").glob("*.toml")):
        cfg = load_config(path, ["data.synthetic=8", 'init_from=""', "quantizer.keep_init=false"])
        assert cfg["name"] == path.stem and cfg["stages"]


def test_set_takes_toml_values_and_bare_strings_where_strings_go(tmp_path):
    cfg = load_config(TINY, ["data.cache_dir=/tmp/frames", 'name="a b"', "stage1.lr=1", "stages=[1]",
                             "stage2.freeze_bn=true", "quantizer.coverage=1"])
    assert cfg["data"]["cache_dir"] == "/tmp/frames" and cfg["name"] == "a b" and cfg["stages"] == [1]
    assert cfg["stage1"]["lr"] == 1.0 and isinstance(cfg["stage1"]["lr"], float)  # an int where a float goes
    assert cfg["stage2"]["freeze_bn"] is True and cfg["stage1"]["batch_size"] == 8  # the file's value


# -- evaluate and tables ---------------------------------------------------------------------------

def test_evaluate_missing_data_folder(tmp_path, capsys):
    rc = evaluate.main(["--data", str(tmp_path / "nope")])
    assert_one_line_error(rc, capsys.readouterr().err, "evaluate", ["--data: no data folder at"])


def test_evaluate_data_folder_without_media(tmp_path, capsys):
    rc = evaluate.main(["--data", str(folder(tmp_path, {"notes.txt": b"x"}))])
    assert_one_line_error(rc, capsys.readouterr().err, "evaluate", ["--data: no video or image file under"])


def test_evaluate_missing_weights(tmp_path, capsys):
    rc = evaluate.main(["--weights", str(tmp_path / "none.json"), "--data", str(a_png(tmp_path))])
    assert_one_line_error(rc, capsys.readouterr().err, "evaluate", ["no weights at"])


def test_evaluate_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = evaluate.main(["--data", str(a_png(tmp_path)), "--out", str(tmp_path / "out")])
    assert_one_line_error(rc, capsys.readouterr().err, "evaluate",
                          ["matplotlib is not installed", "pip install 'neural-video-call[train]'"])


def test_tables_missing_training_folder(tmp_path, capsys):
    rc = tables.main(["--weights", "default", "--train", str(tmp_path / "nope"), "--out", str(tmp_path / "w")])
    assert_one_line_error(rc, capsys.readouterr().err, "tables", ["--train: no data folder at"])


def test_tables_missing_weights(tmp_path, capsys):
    rc = tables.main(["--weights", str(tmp_path / "none"), "--train", str(a_png(tmp_path)), "--out", str(tmp_path / "w")])
    assert_one_line_error(rc, capsys.readouterr().err, "tables", ["no weights at"])
