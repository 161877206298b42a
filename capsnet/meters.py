"""What a pass measures: torchnet's meters (loss, accuracy, confusion), fed once per pass from
totals kept on the device, and MultiMNIST's two-digit scores (paper, sec. 6)."""

import torch

from capsnet.runtime import device_name


def matched_predictions(lengths, pair_labels):
    """The two longest capsules (B, 2), ordered to match pair_labels (B, 2): position k holds label k
    where that label is among the two, else the other predicted class -> (classes (B, 2), swapped
    (B,) bool: the order is the reverse of the lengths' order)."""
    top = lengths.topk(2, dim=1).indices  # (B, 2), longest first
    swapped = (top[:, 0] == pair_labels[:, 1]) | (top[:, 1] == pair_labels[:, 0])
    return torch.where(swapped[:, None], top.flip(1), top), swapped


def two_digit_scores(lengths, pair_labels):
    """MultiMNIST's measures (sec. 6) from lengths (B, J) and the two labels (B, 2) of each image ->
    (both, any) boolean (B,): the two longest capsules are exactly the two labels (the paper's
    score), or at least one of the two labels is among them."""
    top = lengths.topk(2, dim=1).indices  # (B, 2)
    hits = (top[:, :, None] == pair_labels[:, None, :]).any(1)  # (B, 2): label found among the top two
    return hits.all(1), hits.any(1)



def pass_meters(num_classes, digits=1):
    """The torchnet meters of one pass: loss, accuracy and confusion; for two-digit images the
    accuracy is both digits right (the paper's MultiMNIST score) and accuracy_any at least one."""
    from torchnet import meter

    meters = {"loss": meter.AverageValueMeter(), "confusion": meter.ConfusionMeter(num_classes)}
    if digits == 1:
        meters["accuracy"] = meter.ClassErrorMeter(accuracy=True)
    else:
        meters["accuracy"], meters["accuracy_any"] = meter.AverageValueMeter(), meter.AverageValueMeter()
    return meters


def meter_values(meters):
    """{loss, accuracy[, accuracy_any]} of a pass's meters, accuracies in %."""
    values = {"loss": float(meters["loss"].value()[0])}
    accuracy = meters["accuracy"].value()
    values["accuracy"] = float(accuracy[0])  # ClassErrorMeter: [top-1]; AverageValueMeter: (mean, std)
    if "accuracy_any" in meters:
        values["accuracy_any"] = float(meters["accuracy_any"].value()[0])
    return values


class PassStats:
    """Loss sum, correct count and per-batch outputs of one pass, kept on the device; handed to the
    torchnet meters once, at the end of the pass. A step only appends its loss, class scores and
    labels to lists (no kernel, no sync); the sums are brought up to date in a few batched
    operations when they are read (totals(): every PROGRESS_EVERY batches, and at the end of the
    pass). With pair labels (B, 2) "correct" is both digits right, "correct_any" at least one, and
    the confusion counts each label against the capsule matched to it (matched_predictions)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.correct_any = torch.zeros((), device=self.device, dtype=torch.long)
        self.count = 0
        self.batch_losses, self.batch_sizes, self.outputs, self.targets = [], [], [], []
        self.first_nonfinite = torch.full((), -1, device=self.device, dtype=torch.long)  # batch index, -1: none
        self.pending = []  # (lengths, labels) of the batches added since the sums were last brought up to date

    def add(self, loss, lengths, labels):
        self.count += labels.shape[0]
        self.batch_losses.append(loss.detach())
        self.batch_sizes.append(labels.shape[0])
        self.pending.append((lengths.detach(), labels))

    def fold(self):
        """Bring the sums up to date with the batches added since the last call: one stack and a
        few reductions over all of them."""
        if not self.pending:
            return
        new = len(self.pending)
        first = len(self.batch_losses) - new
        losses = torch.stack(self.batch_losses[first:])
        sizes = torch.tensor(self.batch_sizes[first:], device=losses.device, dtype=losses.dtype)
        self.loss_sum += (losses.float() * sizes).sum()
        bad = ~torch.isfinite(losses)
        index = first + bad.int().argmax()  # the first batch whose loss was not finite, if any
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & bad.any(), index, self.first_nonfinite)
        lengths = torch.cat([p[0] for p in self.pending]).float()
        labels = torch.cat([p[1] for p in self.pending])
        self.pending = []
        if labels.dim() == 1:
            self.correct += (lengths.argmax(1) == labels).sum()
            self.outputs.append(lengths)
            self.targets.append(labels)
        else:
            both, any_right = two_digit_scores(lengths, labels)
            self.correct += both.sum()
            self.correct_any += any_right.sum()
            self.outputs.append(matched_predictions(lengths, labels)[0].flatten())
            self.targets.append(labels.flatten())

    def snapshot(self):
        """This pass so far, on the CPU (a mid-epoch checkpoint; what gather sends)."""
        self.fold()
        losses = torch.stack(self.batch_losses) if self.batch_losses else self.loss_sum.new_zeros(0)
        return {"sums": torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype),
                                     self.correct_any.to(self.loss_sum.dtype)]).cpu(),
                "count": self.count, "batch_losses": losses.cpu(), "batch_sizes": list(self.batch_sizes),
                "outputs": [o.cpu() for o in self.outputs], "targets": [t.cpu() for t in self.targets]}

    def restore(self, snaps):
        """Continue the pass of snapshot() (or of several processes' snapshots, concatenated)."""
        self.reset()
        for snap in snaps:
            loss_sum, correct, correct_any = snap["sums"].to(self.device)
            self.loss_sum += loss_sum
            self.correct += correct.long()
            self.correct_any += correct_any.long()
            self.count += snap["count"]
            self.batch_losses += list(snap["batch_losses"].to(self.device).unbind())
            self.batch_sizes += snap["batch_sizes"]
            self.outputs += [o.to(self.device) for o in snap["outputs"]]
            self.targets += [t.to(self.device) for t in snap["targets"]]

    def totals(self):
        """(loss sum, correct count, images, index of the first batch whose loss was not finite or
        -1) so far: one device sync."""
        self.fold()
        loss, correct, bad = torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype),
                                          self.first_nonfinite.to(self.loss_sum.dtype)]).tolist()
        return loss, correct, self.count, int(bad)

    def gather(self, dist):
        """Under torchrun: this pass's numbers from every process, in rank order, on every process,
        so that the meters see the whole pass (the same sums as one process)."""
        if dist.enabled:
            self.restore(dist.gather(self.snapshot()))

    def feed(self, meters):
        """Hand the pass to pass_meters() meters."""
        self.fold()
        if not self.count:
            return
        for loss, n in zip(torch.stack(self.batch_losses).tolist(), self.batch_sizes):
            meters["loss"].add(loss * n, n)  # AverageValueMeter.add(sum, n) keeps the per-image mean
        outputs, targets = torch.cat(self.outputs).cpu(), torch.cat(self.targets).cpu()
        meters["confusion"].add(outputs, targets)
        if "accuracy_any" in meters:
            correct, correct_any = torch.stack([self.correct, self.correct_any]).tolist()
            meters["accuracy"].add(100.0 * correct, self.count)
            meters["accuracy_any"].add(100.0 * correct_any, self.count)
        else:
            meters["accuracy"].add(outputs, targets)


class PassMeters:
    """An epoch's meters: torchnet's for each pass (pass_meters), and the running sums of the pass
    under way (PassStats), which feed them when it ends."""

    def __init__(self, num_classes, objects, device):
        self.meters = {mode: pass_meters(num_classes, objects) for mode in ("train", "test")}
        self.stats = PassStats(device)

    def start(self, mode):
        for meter in self.meters[mode].values():
            meter.reset()
        self.stats.reset()

    def finish(self, mode, dist):
        """The pass's sums from every process (torchrun) into its meters."""
        self.stats.gather(dist)
        self.stats.feed(self.meters[mode])


def print_evaluation(result, name, objects, models, seconds):
    """--eval-only's report of `result` (run_eval's dict, over `models` checkpoints): the test
    accuracy and loss (for two-digit images the paper's both-right score and at least one right),
    then the confusion matrix."""
    images = f"{result['test_images']:,} {'images' if objects == 1 else 'pairs'}, {seconds:.1f}s"
    if objects == 1 and models == 1:
        print(f"{name}: test accuracy {result['test_accuracy']:.2f}%  test loss {result['test_loss']:.4f}  ({images})")
    elif objects == 1:
        print(f"{name}: ensemble of {models}: test accuracy {result['test_accuracy']:.2f}%  ({images})")
    else:
        print(f"{name}: both digits right {result['test_accuracy']:.2f}% (error {100 - result['test_accuracy']:.2f}%), "
              f"at least one right {result['test_accuracy_any']:.2f}%  test loss {result['test_loss']:.4f}  ({images})")
    print("confusion matrix (rows: true class, columns: predicted):" if objects == 1 else
          "confusion matrix of the digits (rows: true class, columns: the capsule matched to it):")
    for k, counts in enumerate(result["confusion"]):
        print(f"  {k}: " + " ".join(f"{int(c):5d}" for c in counts))


def routing_changes(model):
    """The mean routing logit change of each iteration over the steps `model` recorded (Appendix A's
    measure); its recording stops."""
    changes, model.logit_changes, model.record_routing = model.logit_changes, [], False
    return torch.stack(changes).mean(0).tolist() if changes else []


def epoch_row(epoch, lr, meters, seconds, data, changes, compile_choice, device):
    """One metrics.jsonl row: the epoch's learning rate, each pass's meters, times (`seconds`: train,
    test) and speed on `data` (the run's Data), the mean routing logit change per iteration, the
    compile choice, the device it ran on and the test set's name (affnist: "affNIST" or
    "affNIST-like (generated)"). For two-digit images train_accuracy and test_accuracy are both
    digits right (the paper's score), and *_accuracy_any at least one."""
    row = {"epoch": epoch, "lr": lr}
    for mode in ("train", "test"):
        row.update({f"{mode}_{k}": v for k, v in meter_values(meters[mode]).items()})
    row.update({"train_seconds": round(seconds[0], 3), "test_seconds": round(seconds[1], 3),
                "train_images_per_s": round(data.train.rows / seconds[0], 1), "routing_logit_change": changes,
                "compile": compile_choice, "device_name": device_name(device), "test_set": data.name})
    return row


def print_epoch(row, epochs, dataset):
    """The epoch's line on the terminal; the test set named where it is not the data set's own."""
    both = " (both digits)" if "test_accuracy_any" in row else ""
    anyone = f", at least one {row['test_accuracy_any']:.2f}%" if both else ""
    print(f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.3g}  train loss {row['train_loss']:.4f} "
          f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc{both} "
          f"{row['test_accuracy']:.2f}%{anyone}  ({row['train_seconds']:.1f}s + {row['test_seconds']:.1f}s)"
          + ("" if row["test_set"] == dataset else f"  [test set: {row['test_set']}]"), flush=True)

