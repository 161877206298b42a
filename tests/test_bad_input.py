"""Bad input is reported on one line with exit code 2, never with a traceback."""

import os
import time

import numpy as np
import pytest
import torch

from conftest import SMALL_ARCH, cn, describe, run_main, run_script, write_idx_images, write_idx_labels
from capsnet import data, runtime  # noqa: E402


def load_mnist(root, train, limit=0):
    """MNIST's images and labels through data.load_idx."""
    return data.load_idx("MNIST", root, train, limit)[:2]


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, describe(done)
    assert "Traceback" not in done.stderr, describe(done)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(done)
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def data_args(root, tmp_path):
    """A one-epoch run on the CPU, also where CUDA is (the errors here do not depend on the device)."""
    return ["--data-dir", root, "--run-dir", tmp_path / "run", "--no-visdom", "--epochs", 1, "--device", "cpu",
            *SMALL_ARCH]


# Any download attempt goes to a closed local port: the test is the same with or without internet
# (with internet torchvision would fetch the real MNIST instead of failing).
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
NO_NETWORK.update(no_proxy="", NO_PROXY="")


def test_missing_data(tmp_path):
    """An empty data dir and no network: exit 2, one line naming MNIST/raw and the four files.
    (torchvision tries to download first; the elapsed time is printed for the record.)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    started = time.perf_counter()
    done = run_script(data_args(empty, tmp_path), env=NO_NETWORK)
    print(f"missing-data run took {time.perf_counter() - started:.1f} s")
    assert_one_line_error(done, os.path.join(str(empty), "MNIST", "raw"), *data.MNIST_FILES)
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def garbage_images(raw):
    with open(os.path.join(raw, "train-images-idx3-ubyte"), "wb") as f:
        f.write(b"this is not an IDX file at all" * 10)


def truncated_images(raw):
    path = os.path.join(raw, "train-images-idx3-ubyte")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:16 + 28 * 28 * 3 + 100])  # header says 200 images, 3.1 follow


def labels_out_of_range(raw):
    write_idx_labels(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.full(100, 12, np.uint8))


def label_count_mismatch(raw):
    write_idx_labels(os.path.join(raw, "train-labels-idx1-ubyte"), np.zeros(150, np.uint8))


def wrong_image_size(raw):
    write_idx_images(os.path.join(raw, "t10k-images-idx3-ubyte"), np.zeros((100, 27, 27), np.uint8))


@pytest.mark.parametrize("damage", [garbage_images, truncated_images])
def test_corrupt_idx_file_from_the_command_line(fresh_mnist, tmp_path, damage):
    """A damaged IDX file: exit 2 and a one-line 'cannot load MNIST' message, no traceback."""
    damage(fresh_mnist["raw"])
    assert_one_line_error(run_script(data_args(fresh_mnist["root"], tmp_path)), "cannot load MNIST",
                          fresh_mnist["raw"])


@pytest.mark.parametrize("damage, train, why", [
    (garbage_images, True, "train-images-idx3-ubyte is not an IDX file of its kind (its first 4 bytes are 0x74686973"),
    (labels_out_of_range, False, "labels outside 0..9"),
    (label_count_mismatch, True, "150 labels for 200 images"),
    (wrong_image_size, False, "expected (N, 28, 28)"),
])
def test_corrupt_or_inconsistent_files_raise_usage_error(fresh_mnist, damage, train, why):
    """load_mnist turns every unusable-file case into one UsageError line with the reason."""
    damage(fresh_mnist["raw"])
    with pytest.raises(runtime.UsageError) as info:
        load_mnist(fresh_mnist["root"], train)
    message = str(info.value)
    assert "\n" not in message and "cannot load MNIST" in message and why in message


@pytest.mark.parametrize("flag, value, fragment", [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--epochs", "-1", "--epochs must be >= 0"),
    ("--device", "tpu", "--device must be one of"),
])
def test_bad_flag_values_from_the_command_line(tiny_mnist, tmp_path, flag, value, fragment):
    """Impossible flag values: exit 2, one line naming the flag, no traceback, nothing trained."""
    done = run_main(data_args(tiny_mnist["root"], tmp_path) + [flag, value])
    assert_one_line_error(done, fragment)
    assert not os.path.exists(tmp_path / "run")


def test_a_number_of_classes_the_data_does_not_have(tiny_mnist, tmp_path):
    """--num-classes 5 on MNIST: one line saying how many it has; nothing written."""
    run = tmp_path / "run"
    done = run_main(["--data-dir", tiny_mnist["root"], "--run-dir", run, "--no-visdom", "--num-classes", "5",
                     "--device", "cpu"])
    assert_one_line_error(done, "--num-classes 5: mnist has 10 classes")
    assert not run.exists()


def test_resume_of_a_missing_file(tmp_path):
    """--resume of a file that does not exist: exit 2, one line naming it."""
    missing = tmp_path / "nope" / "last.pt"
    assert_one_line_error(run_main(["--resume", missing, "--no-visdom"]), str(missing))


@pytest.mark.parametrize("argv, fragment", [
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--train-size", "-5"], "--train-size must be >= 0"),
    (["--max-shift", "14"], "--max-shift must be in [0, 13]"),
    (["--routing-iterations", "0"], "--routing-iterations must be >= 1"),
    (["--primary-caps", "0"], "layer sizes must be >= 1"),
    (["--num-classes", "-1"], "--num-classes must be >= 0"),
    (["--kernel-size", "0"], "--kernel-size must be >= 1"),
    (["--image-channels", "4"], "--image-channels must be 1 or 3"),
    (["--crop-size", "-1"], "--crop-size must be >= 0"),
    (["--dataset", "multimnist", "--image-size", "28"], "multimnist images are 36x36"),
    (["--predict", "x.png"], "--predict needs --resume"),
    (["--m-minus", "0.95"], "--m-minus < --m-plus"),
    (["--visdom-port", "70000"], "--visdom-port must be in 1..65535"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--visualize"], "--visualize needs --resume"),
    (["--export-weights", "x.pt"], "--export-weights needs --resume"),
])
def test_usage_errors_in_process(argv, fragment, capsys, tmp_path):
    """main() returns 2 and prints one 'error' line for each impossible value (checked before any
    data is touched)."""
    rc = cn.main(argv + ["--data-dir", str(tmp_path / "none"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsule_network.py: error:") and fragment in lines[0], err
    assert not os.path.exists(tmp_path / "none") and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("argv", [["--batch-size", "abc"], ["--no-such-flag"], ["--lr", "fast"]])
def test_unparseable_flags_exit_2_on_one_line(argv, capsys):
    """argparse errors are one line (no usage block) and exit code 2."""
    with pytest.raises(SystemExit) as info:
        cn.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capsule_network.py: error:"), err


def test_unreadable_checkpoint(tmp_path, capsys):
    """--resume of a file that is not a checkpoint: exit 2, one line."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    assert cn.main(["--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable checkpoint" in err[0]
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    assert cn.main(["--resume", str(other)]) == 2
    assert "neither a checkpoint nor a model state dict" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda(capsys, tmp_path):
    """--device cuda on a machine without it: exit 2, one line saying so."""
    assert cn.main(["--device", "cuda", "--data-dir", str(tmp_path), "--no-visdom"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
