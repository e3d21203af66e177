"""`cr-accel predict RUN_DIR --input FILE --output FILE [--checkpoint best|last|PATH] [--batch-size N]
[--input-key KEY]`: a trained run's model on new inputs.

Reads the inputs from a `.npz`, `.safetensors` or `.pt` file (the tensor `inputs`, or `--input-key`; other tensors
in the file, targets say, are ignored), as the datasets read theirs (no pickles). They must have the per-sample
shape the run trained on (from the dataset metadata its checkpoint records); floating-point inputs are cast to the
training dtype. The model is the checkpoint's, as `cr_accel.load_model` gives it (best if present, else last; EMA
weights where the run keeps an EMA), in eval mode under the run's mixed precision, on the device accelerate
gives. It runs over the inputs in batches (`--batch-size`, default the run's validation batch size) with a
progress bar, and the outputs are written to `--output` under the key `outputs`, in input order, in the format
its suffix names. An existing `--output` is never replaced.

Under `accelerate launch` each process predicts its share of the batches; the outputs are gathered in order
(accelerate's padding of an uneven last batch dropped) and the main process writes them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

OUTPUT_KEY = "outputs"


def main(argv: Sequence[str]) -> int:
    from .cli import EXIT_USER_ERROR, _error, _leave_process_group
    from .evaluate import one_line

    args = _parser().parse_intermixed_args(argv)
    try:
        written = predict(args.run_dir, args.input, args.output, args.checkpoint, args.batch_size, args.input_key)
    except UserError as exc:
        _error(one_line(exc))
        _leave_process_group()
        return EXIT_USER_ERROR
    if written is not None:
        print(f"wrote {written[0]} outputs of shape {written[1:]} to {args.output}", flush=True)
    _leave_process_group()
    return 0


def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser

    p = _Parser(prog="cr-accel predict",
                description="Run a trained run's model on the inputs in a .npz, .safetensors or .pt file and write "
                            f"its outputs (key `{OUTPUT_KEY}`, in input order) to a new file of one of those formats.",
                epilog="example: %(prog)s runs/default --input new.npz --output predictions.npz")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output.dir (holding config.yaml and checkpoints/)")
    p.add_argument("--input", required=True, metavar="FILE", help="the inputs: a .npz, .safetensors or .pt file")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="where the outputs go (.npz, .safetensors or .pt, by its suffix); must not exist yet")
    p.add_argument("--checkpoint", metavar="best|last|PATH",
                   help="best, last, a folder in RUN_DIR/checkpoints, or a checkpoint folder's path "
                        "(default: best if present, else last)")
    p.add_argument("--batch-size", "--batch_size", type=_positive, metavar="N",
                   help="samples per forward pass on each process (default: the run's validation batch size)")
    p.add_argument("--input-key", "--input_key", default="inputs", metavar="KEY",
                   help="the inputs' tensor in the file (default: inputs)")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got `{text}`")
    return value


def predict(run_dir: str, input_file: str, output_file: str, checkpoint: str | None = None,
            batch_size: int | None = None, input_key: str = "inputs") -> list[int] | None:
    """Write the outputs of run `run_dir`'s model on `input_file` to `output_file` (see the module docstring);
    returns the outputs' shape on the main process, None on the others."""
    from accelerate import Accelerator

    from .checkpoint import load_model, read_state
    from .data.files import read_tensor
    from .environment import pick_precision
    from .evaluate import load_run
    from .scoring import run_checkpoint

    run, cfg = load_run(run_dir)
    output = Path(output_file)
    write = _writer(output)
    path = run_checkpoint(run, checkpoint)
    inputs = read_tensor(input_file, input_key, "--input-key")
    inputs = fitting_inputs(inputs, read_state(path).get("dataset") or {}, f"`{input_key}` in `{input_file}`", run)
    acc = Accelerator(mixed_precision=pick_precision(cfg.resolved_mixed_precision))
    model = load_model(path, device=acc.device)
    outputs = run_model(acc, model, inputs, batch_size or cfg.data.val_batch_size or cfg.data.batch_size)
    if acc.is_main_process:
        write(outputs)
    acc.wait_for_everyone()
    return list(outputs.shape) if acc.is_main_process else None


def fitting_inputs(inputs: Any, metadata: dict[str, Any], what: str, run: Path) -> Any:
    """`inputs` checked against the samples the run trained on (its dataset metadata's `input_shape` and
    `input_dtype`, where it records them); floating-point inputs are cast to the training dtype."""
    import torch

    if len(inputs) == 0:
        raise UserError(f"{what} holds no samples")
    shape, dtype = metadata.get("input_shape"), metadata.get("input_dtype")
    if isinstance(shape, list) and list(inputs.shape[1:]) != shape:
        sample = "x".join(map(str, shape)) or "scalar"
        hint = (f"; it looks like one sample without the batch dimension: save it as x[None], shape {[1, *shape]}"
                if list(inputs.shape) == shape else f"; save them as an array of shape [N, {', '.join(map(str, shape))}]")
        raise UserError(f"{what} has shape {list(inputs.shape)}, samples of shape {list(inputs.shape[1:])}, but the "
                        f"model of `{run}` takes samples of shape {shape} ({sample} {dtype or ''}, from the run's "
                        f"dataset metadata){hint}")
    wanted = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if isinstance(wanted, torch.dtype) and inputs.dtype != wanted:
        if not (inputs.is_floating_point() and wanted.is_floating_point):
            raise UserError(f"{what} has dtype {str(inputs.dtype).removeprefix('torch.')}, but the model of `{run}` "
                            f"was trained on {dtype} inputs; save them as {dtype}")
        inputs = inputs.to(wanted)
    return inputs


def run_model(acc: Any, model: Any, inputs: Any, batch_size: int) -> Any:
    """The model's outputs for `inputs`, in order, on the main process's CPU (None elsewhere): each process runs
    its share of the batches; every batch is gathered (gather_for_metrics drops the padding of the last one)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    model = acc.prepare_model(model, evaluation_mode=True)  # the run's mixed precision; no DDP wrapper
    loader = acc.prepare_data_loader(DataLoader(TensorDataset(inputs), batch_size=batch_size, shuffle=False),
                                     device_placement=acc.device.type != "cpu")
    chunks = []
    with torch.no_grad():
        for (batch,) in tqdm(loader, desc="predict", disable=not acc.is_local_main_process, file=sys.stderr,
                             dynamic_ncols=True):
            outputs = model(batch)
            if not isinstance(outputs, torch.Tensor):
                raise UserError(f"the model returned a {type(outputs).__name__}; predict writes one tensor per "
                                "batch")
            outputs = acc.gather_for_metrics(outputs)
            if acc.is_main_process:
                chunks.append(outputs.cpu())
    return torch.cat(chunks) if acc.is_main_process else None


def _writer(output: Path) -> Any:
    """A function writing the outputs tensor to `output` in the format of its suffix, whole (a temporary file
    renamed into place); refused now, before anything runs, where `output` exists or the suffix is unknown."""
    from .data.files import SUPPORTED_SUFFIXES

    suffix = output.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UserError(f"--output `{output}` has extension `{output.suffix or '(none)'}`; name a "
                        f"{', '.join(SUPPORTED_SUFFIXES)} file (the format follows the suffix)")
    if output.exists():
        raise UserError(f"--output `{output}` already exists; remove it first, or name another file")
    if output.parent.exists() and not output.parent.is_dir():
        raise UserError(f"--output `{output}`: `{output.parent}` is not a folder")

    def write(outputs: Any) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.stem}.tmp{suffix}")
        _save(tmp, suffix, outputs)
        if output.exists():  # appeared while the model ran
            tmp.unlink()
            raise UserError(f"--output `{output}` appeared while predicting; remove it first, or name another file")
        os.replace(tmp, output)

    return write


def _save(path: Path, suffix: str, outputs: Any) -> None:
    import torch

    if suffix == ".npz":
        import numpy as np

        array = outputs.float() if outputs.dtype == torch.bfloat16 else outputs  # numpy has no bfloat16
        np.savez(path, **{OUTPUT_KEY: array.numpy()})
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({OUTPUT_KEY: outputs.contiguous()}, str(path))
    else:
        torch.save({OUTPUT_KEY: outputs}, path)
