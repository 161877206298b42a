"""Under torchrun, a fault in one process ends every process alike: a NaN, an out-of-memory error, a
data error or any other failure of one rank ends all ranks within seconds, each with the same exit
code, and rank 0 prints the one line. The first fault is written on the job's key-value store (the
TCPStore that torchrun's processes meet at, MASTER_ADDR:MASTER_PORT) by the process it ended; the
others read it there. A process stuck in a collective with the failed one (NCCL waits for ever,
gloo until its timeout) is ended by a watcher thread, after the checkpoint it may be writing is
complete (WRITING), so the checkpoint rules are those of one process. Nothing here imports the
rest of the project."""

import datetime
import os
import signal
import sys
import threading
import time

WRITING = threading.Lock()  # held while a checkpoint or a metrics row is written: a forced exit waits for it


class OtherProcessFailed(Exception):
    """Another process of the job failed where this one waited for it (Distributed.together): this
    process ends with that one's line and exit code."""


class FaultBoard:
    """The first fault of a torchrun job on its TCPStore, for every process: post() writes this
    process's end or reads the one written first; a watcher thread ends this process with
    another's fault when the main thread does not settle it itself within GRACE seconds (it is
    stuck in a collective). Every other process notes its end on the store just before it exits
    (finish(), or the watcher); the process that posted the first fault waits for those notes (or
    ACKS_WAIT seconds) and exits last: torchrun, which stops the rest with SIGTERM once one process
    has exited, then finds them gone, and every exit code is the fault's. Keys are per job and
    restart (TORCHELASTIC_RUN_ID, TORCHELASTIC_RESTART_COUNT): a restarted job starts clean."""

    POLL, GRACE, ACKS_WAIT = 0.5, 2.0, 30.0  # seconds; every process asks the store twice a second

    def __init__(self, environ, rank, world):
        from torch.distributed import TCPStore

        self.rank, self.world = rank, world
        job = f"{environ.get('TORCHELASTIC_RUN_ID', 'job')}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.key, self.acks = f"capsnet/fault/{job}", f"capsnet/fault-acks/{job}"
        host, port, timeout = environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), datetime.timedelta(seconds=60)
        self.store = TCPStore(host, port, is_master=False, timeout=timeout)  # the main thread's connection
        self.watch_store = TCPStore(host, port, is_master=False, timeout=timeout)  # the watcher's
        self.settled, self.closed = threading.Event(), threading.Event()
        self.ending, self.first = None, False  # the exit code agreed on (post), and whether this process posted it
        self.watcher = threading.Thread(target=self.watch, name="capsnet-faults", daemon=True)
        self.watcher.start()

    def read(self, store):
        """(rank, exit code, line) of the job's first fault, or None."""
        if not store.check([self.key]):
            return None
        rank, code, line = store.get(self.key).decode().split("\n", 2)
        return int(rank), int(code), line

    def posted(self, wait):
        """read(), waiting up to `wait` seconds for a fault to be posted."""
        deadline = time.monotonic() + wait
        while (found := self.read(self.store)) is None and time.monotonic() < deadline:
            time.sleep(self.POLL)
        return found

    def post(self, code, line):
        """This process ends with (exit code, line): -> the job's (code, line), the first posted by any
        process (the caller prints it, then finish() ends the process). From here a SIGTERM (torchrun
        stopping the rest once one process has exited) exits with the job's code."""
        self.settled.set()
        rank, code, line = self.store.compare_set(self.key, "", f"{self.rank}\n{code}\n{line}").decode().split("\n", 2)
        self.ending, self.first = int(code), int(rank) == self.rank
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(int(code)))
        return self.ending, line

    def finish(self):
        """The end of a process that a fault ends (post()), after its line was printed: its note for the
        first poster, or, for the first poster, a wait until every other has noted its end (so that
        it exits last: torchrun stops the others once one has exited); then exit with the agreed
        code at once, without taking down the process group (other processes may be gone, or stuck
        in a collective that would never return)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if not self.first:
            self.store.add(self.acks, 1)
        deadline = time.monotonic() + self.ACKS_WAIT
        while self.first and self.store.add(self.acks, 0) < self.world - 1 and time.monotonic() < deadline:
            time.sleep(self.POLL)
        os._exit(self.ending)

    def watch(self):
        """The watcher thread: another process's fault, and the main thread not settling it within
        GRACE seconds -> note it, rank 0 prints its line, and this process exits with its code."""
        while not self.closed.wait(self.POLL):
            found = self.read(self.watch_store)
            if found is None:
                continue
            if found[0] == self.rank or self.settled.wait(self.GRACE):
                return  # this process's own fault, or the main thread ends it
            with WRITING:  # not in the middle of a checkpoint
                self.watch_store.add(self.acks, 1)
                sys.stdout.flush()
                if self.rank == 0:
                    print("\n" + found[2], file=sys.stderr, flush=True)
                os._exit(found[1])

    def close(self):
        self.closed.set()
        self.watcher.join(timeout=2 * self.POLL + 1)
