"""Stop cleanly when the cluster says so: SIGTERM, SIGINT or SIGUSR1 (SLURM's `--signal` warning).

The first signal asks for a stop: every process finishes its optimizer step, they agree, a checkpoint
of that step is written, and the run exits with PREEMPTED_EXIT_CODE so a job script can requeue it.
A second signal aborts at once.

With several processes, a signal may reach only some of them, so the processes vote (a MAX all-reduce of
their flags) and all stop at the same optimizer step. The vote is decided every VOTE_EVERY optimizer steps
(counted by calls to `agreed`, which every process makes once per step): at the step before each decision
step every process posts its flag to an asynchronous all-reduce, and the decision step reads the result,
which has had a whole step to arrive. So the processes stop at the first decision step (a multiple of
VOTE_EVERY steps since `agreed` was first called) that comes at least one step after the signal: at most
VOTE_EVERY steps after it. The vote runs on its own gloo group of CPU tensors: it never waits on the device
and never queues with the model's gradient all-reduces (DDP's group, NCCL or gloo).

Measured on the 2-core CPU machine (docs/benchmarks.md, "2-process throughput"): one vote costs 130-260 us of
CPU per process (the asynchronous work goes through gloo's worker thread), about 1% of the default job's
step; voting at every second step halves that and keeps the stop one step after a signal on an odd step.
"""

import os
import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" — requeue and resume
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
VOTE_EVERY = 2  # optimizer steps between decisions; a stop comes at most this many steps after a signal


class Preemption:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signal_name = None
        self._previous = {}
        self._group = None
        self._flag = None
        self._pending = None
        self._calls = 0  # calls to `agreed`: the same count on every process
        self._alone = accelerator.num_processes == 1  # read once: `agreed` runs every optimizer step
        if not self._alone:
            # Always a group of its own (every process creates it here, in the same order): NCCL all-reduces
            # need the GPU, and on DDP's gloo group the flag would share the gradients' worker threads.
            self._group = dist.new_group(backend="gloo")

    def install(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def _on_signal(self, signum, frame):
        if self.signal_name is not None:  # second signal: abort now, the way the default handler would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self):
        return self.signal_name is not None

    def agreed(self):
        """Call once per optimizer step on every process; True on all of them, at the same step, once any was
        signalled (at most VOTE_EVERY steps after the signal)."""
        if self._alone:
            return self.signal_name is not None
        self._calls += 1
        decided = False
        if self._calls % VOTE_EVERY == 0 and self._pending is not None:  # a decision step
            decided = self._read()
        if (self._calls + 1) % VOTE_EVERY == 0:  # the step before a decision step
            self._post()
        return decided

    def _post(self):
        self._flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def _read(self):
        self._pending.wait()
        self._pending = None
        return bool(self._flag.item())  # a CPU tensor: no device sync
