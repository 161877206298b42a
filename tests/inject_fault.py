"""capsule_network.py with a fault in the process of RANK 1 alone, for tests/test_distributed.py
(torchrun runs this file instead of the script): CAPSNET_TEST_FAULT is nan (the loss of training
step CAPSNET_TEST_FAULT_STEP is NaN in that process's share), oom (that step raises an
out-of-memory error) or data (the data do not load there). The time of the fault is written to
CAPSNET_TEST_FAULT_FILE."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import capsule_network as cn  # noqa: E402
from capsnet.runtime import UsageError  # noqa: E402

KIND, STEP = os.environ["CAPSNET_TEST_FAULT"], int(os.environ.get("CAPSNET_TEST_FAULT_STEP", "0"))
DATA_ERROR = "cannot load MNIST: train-images-idx3-ubyte is cut short (injected)"


def mark():
    with open(os.environ["CAPSNET_TEST_FAULT_FILE"], "w", encoding="utf-8") as f:
        f.write(repr(time.time()))


def load_data(cfg, device):
    mark()
    raise UsageError(DATA_ERROR)


def step_with_a_fault(real):
    steps = [0]

    def call(self, sample):
        loss, lengths = real(self, sample)
        if self.model.training:
            steps[0] += 1
            if steps[0] == STEP:
                mark()
                if KIND == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
                loss = loss * float("nan")
                self.last = (self.last[0] * float("nan"), self.last[1])
        return loss, lengths
    return call


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        if KIND == "data":
            cn.load_data = load_data
        else:
            cn.BatchLoss.__call__ = step_with_a_fault(cn.BatchLoss.__call__)
    sys.exit(cn.main())
