"""The configuration of a run, made in one place for capsule_network.py and bench.py.

A setting takes its value from the first of these sources that has one:
  1. a flag given on the command line;
  2. the presets named by PRESET (the flag's names, or else, for a new run, the file's constant;
     a resumed run's checkpoint already holds its preset's values), later names winning;
  3. when resuming, the checkpoint's value (a training checkpoint: every setting, and its run
     directory; exported weights: the model's, MODEL_KEYS);
  4. the constant at the top of capsule_network.py, as written there;
  5. for a constant written None there ("the data set's"): the data set's row of the script's
     DATASET_SETTINGS (the paper's settings for that data set), else its "default" row (the
     paper's MNIST set-up).
Then the data decides what only it can (classes, channels, image size, class names:
capsnet/data.py, resolve_data_settings), and validate_config checks every value. `origin` says
where each value that is not the file's came from; the start-up lines print it (settings_lines).
"""

import os

from capsnet.cli import validate_config
from capsnet.runtime import UsageError

# What exported weights carry (--export-weights): the constants that define the model, its input
# and its loss; the paths and the training schedule stay behind.
MODEL_KEYS = ("MODEL", "DATASET", "IMAGE_SIZE", "IMAGE_CHANNELS", "CROP_SIZE", "CLASS_NAMES", "NUM_CLASSES",
              "CONV1_CHANNELS", "PRIMARY_CAPS", "PRIMARY_DIM", "DIGIT_DIM", "KERNEL_SIZE", "ROUTING_ITERATIONS",
              "ROUTING_LEAKY", "W_INIT_STD", "INIT", "PRIMARY_SCALE", "DIGIT_CAPS_BIAS", "CONV1_LEAKY", "STANDARDIZE",
              "DECODER", "DECODER_HIDDEN1", "DECODER_HIDDEN2", "DECODER_BN", "BASELINE_LAYERS", "BASELINE_DROPOUT",
              "M_PLUS", "M_MINUS", "LAMBDA_ABSENT", "RECON_WEIGHT", "MARGIN_REDUCTION")

DATA_DECIDED = {"CLASS_NAMES": []}  # set from the data (data.load_data), saved in checkpoints; no flags

# Settings added after checkpoints were first written: an older checkpoint that lacks one ran as
# the code did before the setting existed, whatever the data set's value now is.
ADDED_LATER = {"DISTORT": False, "STANDARDIZE": False, "RECON_DETACH": False, "DECODER_BN": False}


def preset_values(text, presets):
    """[(name, its values)] for PRESET text "NAME[,NAME...]" ("" -> [])."""
    named = []
    for name in filter(None, text.split(",")):
        if name not in presets:
            raise UsageError(f"--preset must be one or more of {', '.join(presets)} (comma-separated), not {name!r}")
        named.append((name, presets[name]))
    return named


def make_config(constants, dataset_settings, presets, explicit, ckpt=None, resume_path=None, model_keys=()):
    """The run's settings -> (cfg, origin), in the order of this module's docstring.

    constants: the script's constants as written (None: the data set's); dataset_settings: the
    script's DATASET_SETTINGS; presets: its PRESETS; explicit: the flags given, {NAME: value};
    ckpt: the checkpoint being resumed, evaluated or exported (its file at resume_path);
    model_keys: what exported weights carry. origin maps a setting to "flag", "preset NAME",
    "checkpoint" or "data set NAME" where its value is not the file's."""
    cfg, origin = dict(constants), {}
    saved = (ckpt or {}).get("config", {})
    if saved:
        training = "optimizer" in ckpt  # a training checkpoint, not exported weights
        wanted = [k for k in cfg if training or k in model_keys]
        kept = {k: saved[k] if k in saved else ADDED_LATER[k] for k in wanted if k in saved or k in ADDED_LATER}
        cfg.update(kept)
        origin.update((k, "checkpoint") for k, v in kept.items() if v != constants.get(k))
        if training and "RUN_DIR" not in explicit:  # a training run continues in its own folder
            cfg["RUN_DIR"] = os.path.dirname(os.path.abspath(resume_path))
            origin["RUN_DIR"] = "checkpoint"
    preset = explicit.get("PRESET", "" if saved else cfg["PRESET"])
    for name, values in preset_values(preset, presets):
        cfg.update(values)
        origin.update((k, f"preset {name}") for k in values)
    cfg["PRESET"] = preset or cfg["PRESET"]
    cfg.update(explicit)
    origin.update((k, "flag") for k in explicit)
    if cfg["DATASET"] not in dataset_settings:
        raise UsageError(f"--dataset must be one of {', '.join(k for k in dataset_settings if k != 'default')}, "
                         f"not {cfg['DATASET']!r}")
    own, default = dataset_settings[cfg["DATASET"]], dataset_settings["default"]
    for key in [k for k, v in cfg.items() if v is None]:
        if key not in own and key not in default:
            raise ValueError(f"{key} is None but no data set gives a value for it (DATASET_SETTINGS['default'])")
        cfg[key] = own.get(key, default.get(key))
        if key in own:
            origin[key] = f"data set {cfg['DATASET']}"
    validate_config(cfg, [k for k in dataset_settings if k != "default"])
    return cfg, origin


def settings_lines(cfg, origin, constants):
    """The start-up lines: for each source but the flags (which the user just typed), the settings
    in force that came from it, e.g. 'data set cifar10 (the paper's settings for it): PRIMARY_CAPS=64, ...'."""
    groups = {}
    for key, source in origin.items():
        if source != "flag" and key != "CLASS_NAMES" and cfg[key] != constants.get(key, object()):
            groups.setdefault(source, []).append(f"{key}={cfg[key]}")
    titles = {"checkpoint": "from the checkpoint"}
    lines = []
    for source, items in groups.items():
        title = titles.get(source, source)
        if source.startswith("data set "):
            title += " (the paper's settings for it)"
        lines.append(f"{title}: {', '.join(items)}")
    return lines
