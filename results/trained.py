"""What the results scripts share: a trained checkpoint's settings and model, ready to test on the CPU.
    from trained import trained   (with results/ on sys.path)"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import capsule_network as cn  # noqa: E402
from capsnet import runtime  # noqa: E402


def trained(path, **settings):
    """(settings, model in eval mode on the CPU, the checkpoint itself) of the checkpoint at `path`;
    `settings` (constants by name, e.g. DATASET="affnist") change what the checkpoint's configuration
    says, as flags would."""
    ckpt = runtime.load_checkpoint(path)
    cfg = cn.configure({"DEVICE": "cpu", **settings}, ckpt, path)[0]
    model = cn.build_model(cfg)
    runtime.load_weights(model, ckpt["model"])
    return cfg, model.eval(), ckpt
