"""Command line surface: importing has no side effects; every constant is a flag with its default."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SCRIPT, cn
from capsnet import cli  # noqa: E402

BRIEF_FLAGS = ["--data-dir", "--device", "--epochs", "--batch-size", "--lr", "--lr-decay",
               "--routing-iterations", "--seed", "--train-size", "--test-size", "--run-dir", "--resume",
               "--eval-only", "--no-visdom", "--visdom-server", "--visdom-port", "--visdom-env"]


def config_of(args, ckpt=None):
    """The run's settings from parsed flags, as run_mode makes them."""
    resume = args.resume[0] if args.resume else None
    return cn.configure(cn.flags_given(args), ckpt, resume)[0]


def start_lines(argv):
    """The start-up lines that say where the settings not from the file came from."""
    cfg, origin = cn.configure(cn.flags_given(cn.build_parser().parse_args(argv)))
    return cn.settings_lines(cfg, origin, cn.file_constants())


def test_import_prints_nothing_and_creates_no_files(tmp_path):
    """`import capsule_network` in a fresh interpreter writes nothing to stdout/stderr and creates
    no file in the working directory."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", "import capsule_network"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert list(tmp_path.iterdir()) == []


def help_blocks():
    """--help output split into one text block per option."""
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run([sys.executable, SCRIPT, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    blocks, current = {}, None
    for line in done.stdout.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return done.stdout, blocks


def test_help_lists_every_constant_with_its_default():
    """--help lists a flag for every constant (FOO_BAR -> --foo-bar) with '(default: value)',
    plus the mode flags."""
    text, blocks = help_blocks()
    for name, _, _ in cli.constants_table(SCRIPT):
        flag = "--" + name.lower().replace("_", "-")
        assert flag in blocks, flag
        default = "the data set's" if getattr(cn, name) is None else getattr(cn, name)
        assert f"(default: {default})" in " ".join(blocks[flag].split()), blocks[flag]
    for flag in BRIEF_FLAGS:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), flag
    for flag in ("--resume", "--eval-only", "--visualize", "--predict", "--export-weights"):
        assert flag in blocks, flag
    assert "--benchmark" not in text and "bench.py" in text  # the benchmark is bench.py's alone
    for name, values in cn.PRESETS.items():  # the presets and what they set
        assert f"{name}: " + ", ".join(f"{k}=" for k in values) in re.sub(r"=[^,;]*", "=", " ".join(text.split()))


def test_every_constant_in_the_block_is_a_typed_flag():
    """Every assignment in the constants block is in the table, with its annotated type, and its
    value is of that type (an int is a float's valid value)."""
    with open(SCRIPT, encoding="utf-8") as f:
        block = f.read().split("# ---- constants", 1)[1].split("# ---- end of constants", 1)[0]
    assigned = re.findall(r"^([A-Z][A-Z0-9_]*)\b", block, re.M)
    table = cli.constants_table(SCRIPT)
    assert len(assigned) >= 35 and [name for name, _, _ in table] == assigned
    for name, kind, _ in table:  # None: the data set's, which every data set has (its own or the default)
        value = getattr(cn, name)
        if value is None:
            value = cn.DATASET_SETTINGS["default"][name]
        assert isinstance(value, kind) or (kind is float and type(value) is int), (name, kind, value)


@pytest.mark.parametrize("line, problem", [
    ("LR = 1e-3  # the learning rate", "write each constant as NAME: int|float|str|bool"),
    ("LR: float = 1e-3", "LR needs a '# what it is' comment"),
    ("LR: list = [1]  # rates", "write each constant as NAME: int|float|str|bool"),
])
def test_a_constant_that_would_lose_its_flag_is_an_error(tmp_path, line, problem):
    script = tmp_path / "script.py"
    script.write_text(f"# ---- constants\nEPOCHS: int = 3  # epochs\n{line}\n# ---- end of constants\n")
    with pytest.raises(ValueError, match=re.escape(problem)):
        cli.constants_table(str(script))


def test_a_float_constant_written_as_an_integer_takes_a_float(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("# ---- constants\nLR: float = 1  # the learning rate\nEPOCHS: int = 3  # epochs\n"
                      "# ---- end of constants\n")
    parser = cli.OneLineParser(prog="script.py")
    cli.add_constant_flags(parser, str(script), {"LR": 1, "EPOCHS": 3})
    args = parser.parse_args(["--lr", "0.5", "--epochs", "4"])
    assert args.LR == 0.5 and args.EPOCHS == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "2.5"])


def test_flags_parse_to_the_right_types():
    """Each flag sets its constant with the constant's type; unspecified ones keep the defaults."""
    parser = cn.build_parser()
    args = parser.parse_args(["--lr", "0.01", "--epochs", "7", "--no-amp", "--compile", "--visdom-env", "x",
                              "--max-shift", "0", "--test-size", "10"])
    cfg = config_of(args, None)
    assert cfg["LR"] == 0.01 and cfg["EPOCHS"] == 7 and cfg["AMP"] is False and cfg["COMPILE"] is True
    assert cfg["VISDOM_ENV"] == "x" and cfg["MAX_SHIFT"] == 0 and cfg["TEST_SIZE"] == 10
    untouched = {k: v for k, v in cfg.items() if k not in
                 ("LR", "EPOCHS", "AMP", "COMPILE", "VISDOM_ENV", "MAX_SHIFT", "TEST_SIZE")}
    assert untouched == {k: v for k, v in cn.default_config().items() if k in untouched}
    # every constant given explicitly at its default value gives the default config back
    argv = []
    for name, _, _ in cli.constants_table(SCRIPT):
        value = cn.default_config()[name]
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    assert config_of(parser.parse_args(argv), None) == cn.default_config()


def test_checkpoint_config_then_flags(tmp_path):
    """When resuming a training checkpoint: its config replaces the constants, flags given now
    replace both, and the run dir defaults to the checkpoint's directory."""
    parser = cn.build_parser()
    resume = str(tmp_path / "old" / "last.pt")
    ckpt = {"model": {}, "optimizer": {}, "config": dict(cn.default_config(), EPOCHS=3, CONV1_CHANNELS=16,
                                                         RUN_DIR="/elsewhere", NOT_A_CONSTANT=1)}
    cfg = config_of(parser.parse_args(["--resume", resume, "--epochs", "9"]), ckpt)
    assert cfg["EPOCHS"] == 9 and cfg["CONV1_CHANNELS"] == 16
    assert cfg["RUN_DIR"] == str(tmp_path / "old")
    assert "NOT_A_CONSTANT" not in cfg
    cfg = config_of(parser.parse_args(["--resume", resume, "--run-dir", "/chosen"]), ckpt)
    assert cfg["RUN_DIR"] == "/chosen" and cfg["EPOCHS"] == 3


def test_exported_weights_bring_only_the_model_constants(tmp_path):
    """Weights without an optimizer (an --export-weights file) restore the constants that define
    the model, but not paths, epochs or the run dir of the machine that trained them."""
    parser = cn.build_parser()
    ckpt = {"model": {}, "config": dict(cn.default_config(), CONV1_CHANNELS=16, ROUTING_ITERATIONS=2,
                                        DATA_DIR="/gpu/data", RUN_DIR="/gpu/run", EPOCHS=7)}
    cfg = config_of(parser.parse_args(["--resume", str(tmp_path / "w.pt"), "--eval-only"]), ckpt)
    assert cfg["CONV1_CHANNELS"] == 16 and cfg["ROUTING_ITERATIONS"] == 2
    assert (cfg["DATA_DIR"], cfg["RUN_DIR"], cfg["EPOCHS"]) == (cn.DATA_DIR, cn.RUN_DIR, cn.EPOCHS)


@pytest.mark.parametrize("name", ["DATA_DIR", "RUN_DIR", "SEED", "EPOCHS", "LR", "VISDOM_PORT"])
def test_documented_defaults(name):
    """A few defaults the README and the paper rely on."""
    expected = {"DATA_DIR": "data", "RUN_DIR": "runs/capsnet", "SEED": 0, "EPOCHS": 50, "LR": 1e-3,
                "VISDOM_PORT": 8097}
    assert cn.default_config()[name] == expected[name]


def test_preset_sets_its_constants_and_explicit_flags_win():
    """--preset mnist-2h sets EPOCHS and LR_DECAY; a flag given with it overrides one of them; the
    line printed at start says so; the rest stays at the defaults."""
    parser = cn.build_parser()
    cfg = config_of(parser.parse_args(["--preset", "mnist-2h"]), None)
    assert cfg["PRESET"] == "mnist-2h" and {k: cfg[k] for k in cn.PRESETS["mnist-2h"]} == cn.PRESETS["mnist-2h"]
    assert cfg["EPOCHS"] == 30 and cfg["LR_DECAY"] == 0.88
    assert {k: v for k, v in cfg.items() if k not in ("PRESET", "EPOCHS", "LR_DECAY")} == \
        {k: v for k, v in cn.default_config().items() if k not in ("PRESET", "EPOCHS", "LR_DECAY")}
    assert start_lines(["--preset", "mnist-2h"]) == ["preset mnist-2h: EPOCHS=30, LR_DECAY=0.88"]
    cfg = config_of(parser.parse_args(["--epochs", "3", "--preset", "mnist-2h"]), None)
    assert cfg["EPOCHS"] == 3 and cfg["LR_DECAY"] == 0.88
    assert start_lines(["--epochs", "3", "--preset", "mnist-2h"]) == ["preset mnist-2h: LR_DECAY=0.88"]
    assert start_lines([]) == []


def test_preset_is_kept_by_a_resumed_run_without_reapplying_it():
    """A checkpoint holds the constants in force: resuming keeps them (including a later change of
    --epochs made at an earlier resume) unless --preset is given again."""
    parser = cn.build_parser()
    saved = dict(config_of(parser.parse_args(["--preset", "mnist-2h"]), None), EPOCHS=40)
    ckpt = {"model": {}, "optimizer": {}, "config": saved}
    args = parser.parse_args(["--resume", "runs/x/last.pt"])
    cfg = config_of(args, ckpt)
    assert cfg["PRESET"] == "mnist-2h" and cfg["EPOCHS"] == 40 and cfg["LR_DECAY"] == 0.88


def test_unknown_preset_is_one_line(capsys, tmp_path):
    assert cn.main(["--preset", "fastest", "--data-dir", str(tmp_path / "none")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--preset must be one or more of mnist-2h, authors" in lines[0]
    assert not os.path.exists(tmp_path / "none")


def edited_copy(tmp_path, **values):
    """A copy of the script, beside a link to capsnet/, with the constants `values` edited at the
    top as a user would edit them (the line's value replaced, its comment kept)."""
    with open(SCRIPT, encoding="utf-8") as f:
        text = f.read()
    for name, value in values.items():
        text, n = re.subn(rf"^({name}: \w+ = )[^#\n]*?(  #)", rf"\g<1>{value!r}\g<2>", text, count=1, flags=re.M)
        assert n == 1, name
    path = tmp_path / "capsule_network.py"
    path.write_text(text, encoding="utf-8")
    os.symlink(os.path.join(ROOT, "capsnet"), tmp_path / "capsnet")
    return str(path)


def test_a_preset_written_at_the_top_is_applied_as_the_flag_is(tiny_mnist, tmp_path):
    """PRESET = "authors" edited in the file: the run trains the preset, the start-up line shows it
    in force, and the checkpoint holds its values, as --preset authors would."""
    script = edited_copy(tmp_path, PRESET="authors")
    run = str(tmp_path / "run")
    done = subprocess.run([sys.executable, script, "--data-dir", tiny_mnist["root"], "--run-dir", run, "--no-visdom",
                           "--epochs", "1", "--train-size", "40", "--test-size", "20", "--conv1-channels", "8",
                           "--primary-caps", "2", "--no-compile"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("preset authors: MARGIN_REDUCTION=half-mean, DIGIT_CAPS_BIAS=True, PRIMARY_SCALE=0.03125, INIT=authors"
            in done.stdout.splitlines())
    saved = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=True)
    flag = cn.default_config(PRESET="authors")
    assert {k: saved["config"][k] for k in cn.PRESETS["authors"]} == {k: flag[k] for k in cn.PRESETS["authors"]}
    assert "digit_bias" in saved["model"]


def test_a_constant_the_data_set_also_sets_runs_as_written(tmp_path):
    """PRIMARY_CAPS = 16 written at the top with DATASET = "cifar10": 16 types run, not the data
    set's 64; the constants left None take cifar10's values, and the start-up line names those
    alone. Given as flags, the same."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edited_script", edited_copy(tmp_path, DATASET="cifar10",
                                                                               PRIMARY_CAPS=16))
    edited = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edited)
    cfg, origin = edited.configure({})
    assert cfg["PRIMARY_CAPS"] == 16 and "PRIMARY_CAPS" not in origin
    assert (cfg["CROP_SIZE"], cfg["ROUTING_LEAKY"], cfg["STANDARDIZE"]) == (24, True, True)
    line = edited.settings_lines(cfg, origin, edited.file_constants())
    assert line == ["data set cifar10 (the paper's settings for it): CROP_SIZE=24, FLIP=True, DISTORT=True, "
                    "STANDARDIZE=True, MAX_SHIFT=0, ROUTING_LEAKY=True, RECON_DETACH=True"]
    assert cn.build_model(dict(cfg, DATA_DIR="unused")).primary_caps == 16
    assert cn.default_config(DATASET="cifar10", PRIMARY_CAPS=16) == dict(cfg, DATASET="cifar10")
    assert cn.default_config(DATASET="cifar10")["PRIMARY_CAPS"] == 64


def test_an_old_checkpoint_keeps_the_behaviour_of_settings_added_after_it(tmp_path):
    """A cifar10 checkpoint written before STANDARDIZE, DISTORT and RECON_DETACH existed resumes
    without them (what it was trained with), not with the data set's values of today."""
    old = dict(cn.default_config(DATASET="cifar10"))
    for key in ("STANDARDIZE", "DISTORT", "RECON_DETACH", "DECODER_BN"):
        del old[key]
    cfg, origin = cn.configure({}, {"model": {}, "optimizer": {}, "config": old}, str(tmp_path / "last.pt"))
    assert (cfg["STANDARDIZE"], cfg["DISTORT"], cfg["RECON_DETACH"], cfg["DECODER_BN"]) == (False,) * 4
    assert cfg["PRIMARY_CAPS"] == 64 and origin["PRIMARY_CAPS"] == "checkpoint"
