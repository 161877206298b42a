"""Live plots in Visdom through torchnet's loggers: checked once at start; without a server,
one warning line and no plots."""

import contextlib
import io
import logging
import queue
import socket
import sys
import threading


def visdom_reachable(server, port, timeout=1.0):
    """True if a Visdom server answers at server:port (checked once, quietly)."""
    try:
        with socket.create_connection((server, port), timeout=timeout):
            pass
    except OSError:
        return False
    import visdom

    logging.getLogger("visdom").setLevel(logging.CRITICAL)  # its client logs every retry
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            client = visdom.Visdom(server=f"http://{server}", port=port, use_incoming_socket=False,
                                   raise_exceptions=True)
            return bool(client.check_connection())
    except Exception:  # something answers on that port, but not Visdom
        return False


FIG5_TITLE = ("Fig. 5: test pairs (top), reconstructions from the two longest capsules, red = first label, "
              "green = second (middle), red = first label, green = a class not present (bottom)")


def open_windows(cfg, objects):
    """The loggers of the run's windows (torchnet's VisdomPlotLogger and VisdomLogger), by name."""
    from torchnet.logger import VisdomLogger, VisdomPlotLogger

    server, port, env = cfg["VISDOM_SERVER"], cfg["VISDOM_PORT"], cfg["VISDOM_ENV"]

    def plot(title, ylabel, caption=None, markers=True):
        return VisdomPlotLogger("line", env=env, port=port, server=server, win=f"{env}_{title}",
                                opts=dict(title=caption or title, xlabel="epoch", ylabel=ylabel,
                                          markers=markers, markersize=6))

    def window(kind, title, **opts):
        return VisdomLogger(kind, env=env, port=port, server=server, win=f"{env}_{title}",
                            opts=dict(title=title, **opts))

    every = f"mean of every {cfg['PROGRESS_EVERY']} batches"
    labels = [str(k) for k in range(cfg["NUM_CLASSES"])]
    with contextlib.redirect_stdout(io.StringIO()):
        return {
            "loss": plot("loss", "loss"), "accuracy": plot("accuracy", "accuracy (%)"),
            "lr": plot("learning rate", "learning rate"),
            "routing": plot("routing logit change", "mean |change of b_ij|"),
            "live_loss": plot("training loss, live", "loss", f"training loss, live ({every})", False),
            "live_accuracy": plot("training accuracy, live", "accuracy (%)", f"training accuracy, live ({every})",
                                  False),
            "confusion": window("heatmap", "confusion matrix (test)", columnnames=labels, rownames=labels,
                                xlabel="predicted", ylabel="true"),
            # two-digit images: Fig. 5
            "recon": window("image", "test images (top) and reconstructions (bottom)" if objects == 1 else FIG5_TITLE),
            "fig4": window("image", "Fig. 4: each of the 16 dimensions perturbed by -0.25..0.25"),
            "masks": window("image", "reconstruction under every class mask (rows: digits, cols: masks)"),
            "couplings": window("image", "couplings c_ij of one test image (per class: the primary capsule types on "
                                         "their grid; min black, max white)"),
            "rotation": window("image", "rotation sweep: capsule lengths of a test image per class turned through "
                                        "360 degrees, reconstructions beneath"),
        }


class VisdomPlots:
    """Live plots through torchnet's Visdom loggers. Checked once at start; if the server is not
    there, or stops answering later, one warning line and training goes on without it.
    The requests go out from a thread of their own, in order: training never waits for the
    server (on a GPU, four requests every PROGRESS_EVERY steps would stall it); flush() waits
    until everything queued has been sent."""

    def __init__(self, cfg, objects=1):
        self.enabled = False
        self.sending = None  # the queue of the sender thread, once there is something to send
        if not cfg["VISDOM"]:
            return
        server, port, env = cfg["VISDOM_SERVER"], cfg["VISDOM_PORT"], cfg["VISDOM_ENV"]
        if not visdom_reachable(server, port):
            print(f"warning: no Visdom server answers at {server}:{port}; training without live plots "
                  f"(start one with: python -m visdom.server -port {port} -bind_local)", file=sys.stderr)
            return
        try:
            windows = open_windows(cfg, objects)
            vars(self).update(windows)  # each window's logger is an attribute of its name: self.loss, ...
            self.loggers = list(windows.values())
            for lg in self.loggers:
                lg.viz.raise_exceptions = True  # errors reach us instead of being printed per call
        except Exception as e:
            self._fail(e)
            return
        self.enabled = True
        self.url = f"http://{server}:{port}/env/{env}"
        print(f"Visdom: plots at {self.url}")

    def _send(self, request):
        """Queue `request` (a callable) for the sender thread; it runs them one after another."""
        if self.sending is None:
            self.sending = queue.Queue()
            threading.Thread(target=self._sender, name="visdom", daemon=True).start()
        self.sending.put(request)

    def _sender(self):
        while True:
            request = self.sending.get()
            try:
                if self.enabled:
                    request()  # (not under redirect_stdout: that would swallow the training thread's lines)
            except Exception as e:  # a server that went away: warn once, keep training
                self._fail(e)
            finally:
                self.sending.task_done()

    def flush(self, timeout=60.0):
        """Wait (at most `timeout` seconds) until every queued request has been sent."""
        if self.sending is None:
            return
        done = threading.Thread(target=self.sending.join, daemon=True)
        done.start()
        done.join(timeout)

    def _fail(self, error):
        if not self.enabled:
            return
        self.enabled = False
        from tqdm import tqdm  # tqdm.write: on a line of its own, above a progress bar being drawn

        tqdm.write(f"warning: Visdom stopped answering ({type(error).__name__}); training goes on without live "
                   f"plots", file=sys.stderr)

    def _lines(self, logger, epoch, values):
        """Append one point per named series; create the window with a legend the first time."""
        import numpy as np

        if logger.viz.win_exists(win=logger.win, env=logger.env):
            for name, value in values.items():
                logger.log(epoch, value, name=name)
        else:
            logger.viz.line(X=np.array([[epoch] * len(values)]), Y=np.array([list(values.values())]),
                            win=logger.win, env=logger.env, opts=dict(logger.opts, legend=list(values)))

    def log_progress(self, epoch, loss, accuracy):
        """One point per live window at fractional epoch `epoch` (every PROGRESS_EVERY batches)."""
        if self.enabled:
            self._send(lambda: (self._lines(self.live_loss, epoch, {"train": loss}),
                                self._lines(self.live_accuracy, epoch, {"train": accuracy})))

    def log_epoch(self, epoch, row, confusion, recon_grid, figures=None, recon_caption=None):
        if self.enabled:
            self._send(lambda: self._epoch_requests(epoch, row, confusion, recon_grid, figures, recon_caption))

    def _epoch_requests(self, epoch, row, confusion, recon_grid, figures, recon_caption):
        self._lines(self.loss, epoch, {"train": row["train_loss"], "test": row["test_loss"]})
        accuracy = {"train": row["train_accuracy"], "test": row["test_accuracy"]}
        if "test_accuracy_any" in row:  # two-digit images: train and test are both digits right
            accuracy["test, at least one digit"] = row["test_accuracy_any"]
        self._lines(self.accuracy, epoch, accuracy)
        self._lines(self.lr, epoch, {"lr": row["lr"]})
        if row.get("routing_logit_change"):
            self._lines(self.routing, epoch, {f"iteration {k + 1}": value for k, value in
                                              enumerate(row["routing_logit_change"])})
        self.confusion.log(confusion)
        if recon_caption:
            self.recon.opts = dict(self.recon.opts, caption=recon_caption)
        self.recon.log(recon_grid.numpy())
        if figures:
            self.fig4.log(figures["fig4"].numpy())
            self.masks.log(figures["class_masks"].numpy())
            self.couplings.log(figures["couplings"].numpy())
            if "rotation" in figures:
                self.rotation.log(figures["rotation"].numpy())


class LiveProgress:
    """A pass's progress: its batches counted, and every PROGRESS_EVERY batches (one device sync)
    the running loss and accuracy in the tqdm bar and, in training, the mean of those batches
    alone as a point in Visdom's live windows, at x = epoch + the fraction of it done."""

    def __init__(self, every, visdom, shown=True):
        self.every, self.visdom, self.shown = every, visdom, shown
        self.bar = None
        self.start_pass()

    def start_pass(self, batch=0, last_totals=(0.0, 0.0, 0)):
        """A new pass, or a pass resumed after `batch` batches with PassStats.totals() `last_totals`
        at its last progress update."""
        self.batch, self.last_totals = batch, last_totals

    def wrap(self, batches, desc, total=None):
        from tqdm import tqdm

        self.bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, initial=self.batch,
                        total=total, file=sys.stderr, unit="batch", disable=not self.shown)
        return self.bar

    def due(self, stats):
        """One more batch done: every `every` batches, stats.totals() (loss sum, correct, count,
        first non-finite batch or -1), else None."""
        self.batch += 1
        return stats.totals() if self.batch % self.every == 0 else None

    def show(self, totals, epoch, batches):
        """Show `totals` (due's); in training (`epoch` not None, of `batches`) also in Visdom."""
        loss_sum, correct, count, _ = totals
        self.bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{100.0 * correct / count:.2f}%", refresh=False)
        if epoch is not None:
            last_sum, last_correct, last_count = self.last_totals
            self.last_totals = loss_sum, correct, count
            self.visdom.log_progress(epoch + self.batch / batches, (loss_sum - last_sum) / (count - last_count),
                                     100.0 * (correct - last_correct) / (count - last_count))

    def close(self):
        if self.bar is not None:
            self.bar.close()

