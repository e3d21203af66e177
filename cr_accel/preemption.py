"""Stop cleanly when the cluster says so: SIGTERM, SIGINT or SIGUSR1 (SLURM's `--signal` warning).

The first signal asks for a stop: every process finishes its optimizer step, they agree, a checkpoint
of that step is written, and the run exits with PREEMPTED_EXIT_CODE so a job script can requeue it.
A second signal aborts at once.

With several processes, a signal may reach only some of them. After each optimizer step every process
posts its flag to an asynchronous all-reduce over a CPU (gloo) group and reads the previous step's
result: the processes agree one step after the signal, and the device is never synchronised for it.
"""

import os
import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again" — requeue and resume
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preemption:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signal_name = None
        self._previous = {}
        self._group = None
        self._flag = None
        self._pending = None
        if accelerator.num_processes > 1:
            # NCCL all-reduces need the GPU; a gloo group carries the flag between CPUs instead.
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

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
        """Call once per optimizer step on every process; True on all of them once any was signalled."""
        if self.accelerator.num_processes == 1:
            return self.requested
        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._flag.item())  # a CPU tensor: no device sync
        self._flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return decided
