"""Progress for people watching: tqdm bars on a terminal, plain periodic lines when output is a file.

Only the local main process shows anything. Values arrive at log intervals, already on the host.
"""

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, enabled, interactive=None):
        self.enabled = enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        self._validation = {}

    def epoch_bar(self, epoch, epochs, total):
        """A bar over one epoch's batches (None where bars are off); call `.update()` per batch."""
        self.close()
        if self.enabled and self.interactive:
            self._bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                             file=sys.stderr)
        return self._bar

    def validation(self, loader, desc="validate"):
        if self.enabled and self.interactive:
            return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        return loader

    def show_validation(self, metrics):
        """The latest validation metrics (`val_*`), shown in the bar's postfix from now on."""
        self._validation = {k: f"{v:.4g}" for k, v in metrics.items()
                            if k.startswith("val_") and isinstance(v, float) and "/" not in k}

    def report(self, epoch, step, total_steps, loss, lr):
        """At a log interval: the bar's postfix on a terminal, one plain line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", **self._validation, refresh=False)
        elif not self.interactive:
            print(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss:.6g} lr {lr:.4g}", flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
