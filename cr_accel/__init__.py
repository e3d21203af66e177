"""cr_accel: a config-driven PyTorch trainer built on HuggingFace Accelerate."""

__version__ = "0.1.0"


def load_model(run_dir_or_checkpoint, device="cpu"):
    """The trained model from a run folder or checkpoint, ready for inference (see cr_accel.checkpoint)."""
    from .checkpoint import load_model as load

    return load(run_dir_or_checkpoint, device)
