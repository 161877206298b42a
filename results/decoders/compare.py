"""The final epoch of each decoder arm (results/decoders/run.sh) on the test set: accuracy and the
mean over test images of the summed squared reconstruction error, the decoder reading the longest
capsule (as at test), beside the arm's test loss from metrics.jsonl.
    python results/decoders/compare.py DATA_DIR RUN_DIR [RUN_DIR ...]"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trained import trained  # noqa: E402
from capsnet import data  # noqa: E402


def evaluate(run_dir, data_dir):
    cfg, model, ckpt = trained(os.path.join(run_dir, "last.pt"), DATA_DIR=data_dir)
    test = data.load_data(cfg, torch.device("cpu"), train=False).test
    correct = squared = 0.0
    with torch.no_grad():
        for images_u8, labels in test:
            images = data.to_float_images(images_u8, cfg["CROP_SIZE"])
            lengths, recon = model(images)
            correct += float((lengths.argmax(1) == labels).sum())
            squared += float(((recon - images) ** 2).flatten(1).sum(1).sum())
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {"run": run_dir, "decoder": cfg["DECODER"], "decoder_bn": cfg["DECODER_BN"], "epoch": ckpt["epoch"],
            "parameters": sum(p.numel() for p in model.parameters()), "test_accuracy": 100 * correct / test.rows,
            "summed_squared_error": squared / test.rows, "test_loss": rows[-1]["test_loss"],
            "train_seconds": sum(r["train_seconds"] for r in rows), "device_name": rows[-1].get("device_name")}


if __name__ == "__main__":
    results = [evaluate(run, sys.argv[1]) for run in sys.argv[2:]]
    for r in results:
        print(f"{r['decoder']:6s} BN {str(r['decoder_bn']):5s}  epoch {r['epoch']}  {r['parameters']:,} parameters  "
              f"test accuracy {r['test_accuracy']:.2f}%  summed squared error {r['summed_squared_error']:.2f}  "
              f"test loss {r['test_loss']:.4f}  ({r['train_seconds']:.0f} s of training)")
    print(json.dumps(results, indent=1))
