"""The command line: one flag per constant of a script's constants block."""

import argparse
import ast
import io
import os
import tokenize

from capsnet.data import MULTIMNIST_CANVAS
from capsnet.runtime import DEVICES, UsageError


TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def constants_table(path):
    """(name, type, help) of every constant in the constants block of the script at `path` (between
    "# ---- constants" and "# ---- end of constants"). Each must be written `NAME: type = value  # help`
    with type int, float, str or bool: anything else in the block raises ValueError, so that no
    constant silently lacks its flag, and a float constant's flag takes a float even where its value
    is written as an integer."""
    with open(os.path.abspath(path), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("# ---- constants"))
    last = next(i for i, line in enumerate(lines) if line.startswith("# ---- end of constants"))
    block = "".join(lines[first + 1:last])
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(block).readline) if tok.type == tokenize.COMMENT}
    table = []
    for node in ast.parse(block).body:
        where = f"{os.path.basename(path)}, line {first + 1 + node.lineno}"
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(node.annotation, ast.Name) and node.annotation.id in TYPES):
            raise ValueError(f"{where}: write each constant as NAME: int|float|str|bool = value  # what it is")
        if node.end_lineno not in comments or node.lineno not in comments:
            raise ValueError(f"{where}: {node.target.id} needs a '# what it is' comment on its line (its --help)")
        table.append((node.target.id, TYPES[node.annotation.id], comments[node.lineno]))
    return table


def compile_setting(text):
    """--compile's value: auto, step, or on/off (also true/false, yes/no, 1/0) -> "auto", "step",
    True or False."""
    value = {"auto": "auto", "step": "step", "on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be auto, on, off or step, not {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_constant_flags(parser, path, values):
    """One flag per constant of the script at `path` (values: its globals): FOO_BAR -> --foo-bar,
    typed as the constant is annotated."""
    for name, kind, help_text in constants_table(path):
        default = values[name]
        flag = "--" + name.lower().replace("_", "-")
        text = f"{help_text} (default: {'the data set' + chr(39) + 's' if default is None else default})"
        if name == "COMPILE":  # --compile [auto|on|off|step], --no-compile
            parser.add_argument(flag, dest=name, nargs="?", const=True, type=compile_setting, default=None,
                                metavar="auto|on|off|step", help=text)
            parser.add_argument("--no-compile", dest=name, action="store_const", const=False,
                                help="the same as --compile off")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=text, metavar=name)


def validate_config(cfg, datasets):
    """Raise UsageError naming the first constant of the configuration `cfg` with an impossible
    value (`datasets`: the data sets' names)."""
    checks = [
        (cfg["DATASET"] in datasets, f"--dataset must be one of {', '.join(datasets)}, not {cfg['DATASET']!r}"),
        (cfg["DEVICE"] in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
        (cfg["COMPILE"] in ("auto", "step", True, False), "--compile must be auto, on, off or step"),
        (cfg["EPOCHS"] >= 0, "--epochs must be >= 0"),
        (cfg["BATCH_SIZE"] >= 1, "--batch-size must be >= 1"),
        (cfg["EVAL_BATCH_SIZE"] >= 1, "--eval-batch-size must be >= 1"),
        (cfg["LR"] > 0, "--lr must be > 0"),
        (0 < cfg["LR_DECAY"] <= 1, "--lr-decay must be in (0, 1]"),
        (0 <= cfg["LR_MIN"] <= cfg["LR"], "--lr-min must be in [0, --lr]"),
        (cfg["TRAIN_SIZE"] >= 0, "--train-size must be >= 0 (0 = all)"),
        (cfg["TEST_SIZE"] >= 0, "--test-size must be >= 0 (0 = all)"),
        (0 <= cfg["MAX_SHIFT"] < 14, "--max-shift must be in [0, 13]"),
        (cfg["DATASET"] != "multimnist" or cfg["MAX_SHIFT"] == 0,
         "--max-shift does not apply to multimnist (its digits are shifted by --multimnist-shift): leave it 0"),
        (0 <= cfg["MULTIMNIST_SHIFT"] <= (MULTIMNIST_CANVAS - 28) // 2,
         f"--multimnist-shift must be in [0, {(MULTIMNIST_CANVAS - 28) // 2}] (a 28x28 digit in a 36x36 image)"),
        (cfg["MULTIMNIST_TEST_PAIRS"] >= 1, "--multimnist-test-pairs must be >= 1"),
        (cfg["ROUTING_ITERATIONS"] >= 1, "--routing-iterations must be >= 1"),
        (cfg["ROUTING_IMPL"] in ("factored", "reference"),
         f"--routing-impl must be factored or reference, not {cfg['ROUTING_IMPL']!r}"),
        (not cfg["ROUTING_BF16"] or (cfg["MODEL"] == "capsnet" and cfg["ROUTING_IMPL"] == "factored"),
         "--routing-bf16 is an option of the paper's CapsNet with the factored routing (--model capsnet, "
         "--routing-impl factored)"),
        (min(cfg["CONV1_CHANNELS"], cfg["PRIMARY_CAPS"], cfg["PRIMARY_DIM"], cfg["DIGIT_DIM"],
             cfg["DECODER_HIDDEN1"], cfg["DECODER_HIDDEN2"]) >= 1, "layer sizes must be >= 1"),
        (cfg["NUM_CLASSES"] >= 0, "--num-classes must be >= 0 (0 = the data set's)"),
        (cfg["KERNEL_SIZE"] >= 1, "--kernel-size must be >= 1"),
        (cfg["IMAGE_SIZE"] >= 0, "--image-size must be >= 0 (0 = as stored)"),
        (cfg["IMAGE_CHANNELS"] in (0, 1, 2, 3), "--image-channels must be 1 or 3 (0 = the data set's)"),
        (cfg["CROP_SIZE"] >= 0, "--crop-size must be >= 0 (0 = no crops)"),
        (cfg["DATASET"] != "multimnist" or (cfg["CROP_SIZE"] == 0 and cfg["IMAGE_SIZE"] in (0, MULTIMNIST_CANVAS)),
         "multimnist images are 36x36: leave --image-size and --crop-size 0"),
        (cfg["W_INIT_STD"] > 0, "--w-init-std must be > 0"),
        (cfg["INIT"] in ("torch", "authors"), f"--init must be torch or authors, not {cfg['INIT']!r}"),
        (cfg["PRIMARY_SCALE"] > 0, "--primary-scale must be > 0"),
        (cfg["MODEL"] in ("capsnet", "efficient-capsnet", "baseline-cnn"),
         f"--model must be capsnet, efficient-capsnet or baseline-cnn, not {cfg['MODEL']!r}"),
        (cfg["BASELINE_LAYERS"] in ("auto", "sec5", "conv-model"),
         f"--baseline-layers must be auto, sec5 or conv-model, not {cfg['BASELINE_LAYERS']!r}"),
        (0 <= cfg["BASELINE_DROPOUT"] < 1, "--baseline-dropout must be in [0, 1)"),
        (cfg["MODEL"] != "baseline-cnn" or cfg["COMPILE"] in ("auto", False),
         "--compile compiles the capsule layer; --model baseline-cnn has none: leave it auto or off"),
        (cfg["AUGMENT"] in ("none", "efficient"), f"--augment must be none or efficient, not {cfg['AUGMENT']!r}"),
        (cfg["DATASET"] != "multimnist" or cfg["AUGMENT"] == "none",
         "--augment efficient is for single-object images, not multimnist (its pairs are shifted already)"),
        (cfg["DECODER"] in ("fc", "deconv"), f"--decoder must be fc or deconv, not {cfg['DECODER']!r}"),
        (cfg["CONV1_LEAKY"] >= 0, "--conv1-leaky must be >= 0"),
        (cfg["MARGIN_REDUCTION"] in ("sum", "half-mean"),
         f"--margin-reduction must be sum or half-mean, not {cfg['MARGIN_REDUCTION']!r}"),
        (0 <= cfg["M_MINUS"] < cfg["M_PLUS"] <= 1, "need 0 <= --m-minus < --m-plus <= 1"),
        (cfg["LAMBDA_ABSENT"] >= 0, "--lambda-absent must be >= 0"),
        (cfg["RECON_WEIGHT"] >= 0, "--recon-weight must be >= 0"),
        (cfg["PROGRESS_EVERY"] >= 1, "--progress-every must be >= 1"),
        (cfg["RECON_IMAGES"] >= 1, "--recon-images must be >= 1"),
        (1 <= cfg["VISDOM_PORT"] <= 65535, "--visdom-port must be in 1..65535"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
