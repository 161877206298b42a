"""The script's other modes and its start-up lines: --eval-only (one model or an ensemble),
--visualize, --predict and --export-weights, each from a checkpoint; the model line printed when
training starts. The script hands in what it defines (build_model, its BatchLoss): nothing here
imports capsule_network.py."""

import json
import os
import time

import torch

from capsnet.baseline import baseline_line
from capsnet.config import MODEL_KEYS
from capsnet.data import DATA_SETS, load_data, read_images_as_data, to_float_images
from capsnet.efficient import EfficientBody
from capsnet.explore import add_explore_flags
from capsnet.fast import model_to_device
from capsnet.figures import write_figures, write_predictions
from capsnet.meters import PassStats, meter_values, pass_meters, print_evaluation
from capsnet.primary import write_primary_figure
from capsnet.runtime import (UsageError, amp_dtype, atomic_torch_save, first_non_finite, load_weights, setup_process,
                             sync)


def add_mode_flags(parser):
    """The flags of the modes beside training, and --resume."""
    parser.add_argument("--resume", metavar="PATH", action="append",
                        help="continue from a checkpoint (last.pt, best.pt); auto: from RUN_DIR/last.pt if it "
                             "exists, else start a new run there (for restarted or requeued jobs); given several "
                             "times with --eval-only: evaluate the ensemble of those models")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --resume: evaluate on the test set, print accuracy and confusion matrix")
    parser.add_argument("--visualize", action="store_true",
                        help="with --resume: write the capsule visualisations as PNG files into the run dir")
    parser.add_argument("--predict", metavar="IMAGE", nargs="+",
                        help="with --resume: classify these image files (converted as the model's data was), "
                             "write RUN_DIR/predictions.json and a PNG of each beside its reconstruction")
    parser.add_argument("--export-weights", metavar="PATH",
                        help="with --resume: write the model weights alone, in fp16, to PATH")
    add_explore_flags(parser)  # --explore and its --explore-* flags (capsnet/explore.py)


def resolve_resume(args, training, run_dir):
    """Check the mode flags against --resume and resolve it: args.resume becomes the one checkpoint
    to load (or None) -> (whether --resume auto found nothing to resume, the paths of an
    ensemble's other members). --resume auto is RUN_DIR/last.pt if it exists, else a fresh run in
    RUN_DIR (for restarted and requeued jobs)."""
    for flag in ("eval_only", "visualize", "export_weights", "predict", "explore"):
        if getattr(args, flag) and not args.resume:
            raise UsageError(f"--{flag.replace('_', '-')} needs --resume PATH")
    resumes = args.resume or []
    if len(resumes) > 1 and not args.eval_only:
        raise UsageError("several --resume checkpoints are an ensemble: only with --eval-only")
    args.resume = resumes[0] if resumes else None
    if args.resume != "auto":
        return False, resumes[1:]
    if not training:
        raise UsageError("--resume auto is for training; name the checkpoint to evaluate, visualise or export")
    path = os.path.join(run_dir, "last.pt")
    args.resume = path if os.path.exists(path) else None
    return args.resume is None, []


def authors_choices(cfg):
    """Which of the authors' code's departures from the paper's text are on (PRESETS["authors"])."""
    on = {"INIT": cfg["INIT"] == "authors", "PRIMARY_SCALE": cfg["PRIMARY_SCALE"] != 1,
          "DIGIT_CAPS_BIAS": cfg["DIGIT_CAPS_BIAS"], "MARGIN_REDUCTION": cfg["MARGIN_REDUCTION"] != "sum"}
    return [f"{k}={cfg[k]}" for k, v in on.items() if v]


def model_line(model, device, amp, data, cfg=None):
    """The start-up line: the model, the device, the arithmetic and why (amp_choice's text), the data,
    and the authors' choices that are on."""
    if not hasattr(model, "capsules"):  # the CNN baselines
        return baseline_line(model, device, amp, data)
    choices = authors_choices(cfg) if cfg is not None else []
    name = "Efficient-CapsNet" if isinstance(model, EfficientBody) else "CapsNet"
    if model.config.routing_bf16:
        amp += "; routing products in bf16 (ROUTING_BF16)"
    return (f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
            f"({amp}); {data.name}: {data.describe()}, "
            f"{data.channels}x{data.image_size}x{data.image_size} input, {model.grid}x{model.grid} grid of "
            f"{model.num_primary:,} primary capsules, {model.num_classes} classes"
            + (f"; the authors' code's {', '.join(choices)}" if choices else ""))


def run_eval(cfg, ckpt, others, build_model, make_step):
    """--eval-only: the test set through the checkpoint's model; with `others` (more checkpoints
    of the same data set and classes), also their ensemble: the capsule lengths averaged over the
    models before the argmax (the paper's CIFAR10 ensemble; the authors' code sums them).
    make_step(model, cfg, device): the script's BatchLoss of a model (BatchLoss.for_run)."""
    device, _ = setup_process(cfg)
    data = load_data(cfg, device, train=False)
    dtype = amp_dtype(device, cfg["AMP"])
    members = [(cfg, ckpt)] + [(member_config(cfg, other), other) for other in others]
    steppers = []
    for member_cfg, member in members:
        model = model_to_device(build_model(member_cfg), member_cfg, device)
        load_weights(model, member["model"])
        model.eval()
        steppers.append(make_step(model, member_cfg, device))
    stats = [PassStats(device) for _ in range(len(members) + (len(members) > 1))]
    started = time.perf_counter()
    with torch.no_grad():
        for sample in data.test:
            outputs = [step(sample) for step in steppers]
            for (loss, lengths), st in zip(outputs, stats):
                st.add(loss, lengths, sample[1])
            if len(members) > 1:
                mean = torch.stack([lengths for _, lengths in outputs]).mean(0)
                stats[-1].add(torch.stack([loss for loss, _ in outputs]).mean(), mean, sample[1])
    sync(device)
    seconds = time.perf_counter() - started
    results = []
    for k, st in enumerate(stats):
        meters = pass_meters(cfg["NUM_CLASSES"], data.objects)
        st.feed(meters)
        values = meter_values(meters)
        name = "ensemble" if k == len(members) else f"model {k + 1}"
        result = {"dataset": data.name, "test_accuracy": values["accuracy"], "test_loss": values["loss"],
                  "test_images": data.test.rows, "seconds": round(seconds, 3), "device": str(device),
                  "dtype": "bf16" if dtype else "fp32",
                  "checkpoint_epoch": None if name == "ensemble" else members[k][1].get("epoch")}
        if "accuracy_any" in values:
            result["test_accuracy_any"] = values["accuracy_any"]
        result["confusion"] = meters["confusion"].value().tolist()
        results.append(result)
        if len(members) > 1:
            what = "the mean of their capsule lengths" if name == "ensemble" else members[k][1].get("path", "")
            print(f"{name} ({what}): test accuracy {result['test_accuracy']:.2f}%"
                  + ("" if name == "ensemble" else f"  test loss {result['test_loss']:.4f}"))
    result = results[-1]
    print_evaluation(result, data.name, data.objects, len(members), seconds)
    os.makedirs(cfg["RUN_DIR"], exist_ok=True)
    with open(os.path.join(cfg["RUN_DIR"], "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result if len(members) == 1 else dict(result, members=results[:-1]), f, indent=1)
    return result


def member_config(cfg, ckpt):
    """The constants of another checkpoint of an ensemble: its model's, cfg's data (which must agree)."""
    member = dict(cfg)
    member.update({k: v for k, v in ckpt.get("config", {}).items() if k in MODEL_KEYS})
    for key in ("DATASET", "NUM_CLASSES", "IMAGE_CHANNELS", "IMAGE_SIZE", "CROP_SIZE"):
        if member[key] not in (cfg[key], 0):
            raise UsageError(f"--resume {ckpt.get('path')}: an ensemble needs one data set and shape, but its "
                             f"{key} is {member[key]!r}, the first model's {cfg[key]!r}")
        member[key] = cfg[key]
    return member


def run_visualize(cfg, ckpt, build_model):
    """--visualize: the figures of the checkpoint's model and of its run's metrics (write_figures),
    and for a capsule model of one object per image the primary-capsule reconstructions
    (capsnet/primary.py, which trains a small decoder first)."""
    device, _ = setup_process(cfg)
    data = load_data(cfg, device, train=False)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    written = write_figures(model, data, cfg, cfg["RUN_DIR"])
    if hasattr(model, "capsules") and data.objects == 1:  # a capsule model of one object per image
        written += write_primary_figure(model.eval(), data, cfg, cfg["RUN_DIR"])
    print("wrote " + ", ".join(written))
    return written


def run_predict(cfg, ckpt, paths, build_model):
    """--predict: each image file converted as the model's data was (channels, size, the central
    crop; for the MNIST-like data sets a dark digit on a light background is inverted, and the
    output says so) -> the predicted class and every class's capsule length, printed, in
    RUN_DIR/predictions.json, and RUN_DIR/predict_<name>.png: the input beside its reconstruction
    (figures.write_predictions). Every file is read before anything is written."""
    device, _ = setup_process(cfg)
    model = build_model(cfg).to(device)
    load_weights(model, ckpt["model"])
    model.eval()
    dark_on_light = DATA_SETS[cfg["DATASET"]]["reader"] in ("MNIST", "FashionMNIST", "KMNIST", "EMNIST")
    inputs, inverted = read_images_as_data(paths, cfg["IMAGE_SIZE"], cfg["IMAGE_CHANNELS"], dark_on_light)
    images = to_float_images(inputs.to(device), cfg["CROP_SIZE"])
    with torch.no_grad():
        lengths, recon = model(images)
    names = cfg["CLASS_NAMES"] or [str(k) for k in range(cfg["NUM_CLASSES"])]
    return write_predictions(paths, images, recon, lengths, names, inverted, cfg["RUN_DIR"])


def export_weights(ckpt, cfg, path):
    """The model weights alone, in fp16, with the constants that define the model (no paths)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    bad = first_non_finite(state.items())
    if bad is not None:  # nothing non-finite is written
        raise UsageError(f"--export-weights: {bad} is not finite in fp16 (NaN, or beyond fp16's +-65504): "
                         f"nothing written")
    atomic_torch_save({"model": state, "config": {k: cfg[k] for k in MODEL_KEYS}, "epoch": ckpt.get("epoch")},
                      path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, fp16 weights)")
