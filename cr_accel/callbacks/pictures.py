"""A picture of the validation every `output.samples_every` epochs, with the dashboard on or off.

Reconstruction (outputs shaped like the targets): the first validation samples, one row each: input | output |
target | |output - target| (the difference four times brighter), values scaled by the targets' range from the
dataset metadata. Classification: the confusion matrix the validation counted. Written by the main process to
`samples/epoch_NNNN.png` and sent to every sink (TensorBoard's images, the dashboard's latest picture).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType

from . import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

SAMPLES = 4  # rows of the samples picture
FOLDER = "samples"


class ValidationPictures(Callback):
    state_key = "validation_pictures"

    def __init__(self, every: int) -> None:
        self.every = every
        self.enabled = True

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        epoch = trainer.epoch + 1  # the epoch just trained and validated (the counter moves on after this)
        if not self.enabled or epoch % self.every or not trainer.validation_at_epoch_end:
            return
        if trainer.last_confusion is not None:
            from ..images import confusion_png

            png = confusion_png(trainer.last_confusion)
        else:
            png = self._samples(trainer)
        if png is None or not trainer.accelerator.is_main_process:
            return
        path = trainer.output_dir / FOLDER / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        trainer.sinks.log_image("samples", png, step=trainer.global_step, epoch=epoch)

    @torch.no_grad()
    def _samples(self, trainer: Trainer) -> bytes | None:
        """The picture of the first validation samples; every process runs the model (a sharded one must), the
        main one draws. None, once and for the rest of the run, where outputs are not shaped like targets."""
        from ..components import data_bounds
        from ..images import samples_png
        from ..rng import rng_kept

        acc, val = trainer.accelerator, trainer.data.val
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        model = trainer.model if sharded else acc.unwrap_model(trainer.model)
        pairs = [val[i] for i in range(min(SAMPLES, len(val)))]
        inputs = torch.stack([torch.as_tensor(p[0]) for p in pairs]).to(acc.device)
        targets = torch.stack([torch.as_tensor(p[1]) for p in pairs])
        was_training = model.training
        model.eval()
        try:
            with rng_kept():
                outputs = trainer.normalization.run(model, inputs)  # raw inputs, outputs in the data's units
        finally:
            model.train(was_training)
        if tuple(outputs.shape) != tuple(targets.shape):
            self.enabled = False
            trainer.text_log.info(f"no samples picture for this task: the outputs {list(outputs.shape[1:])} are not "
                             f"shaped like the targets {list(targets.shape[1:])}", console=False)
            return None
        if not acc.is_main_process:
            return None
        return samples_png(inputs, outputs, targets, difference=True, value_range=data_bounds(trainer.data.metadata))
