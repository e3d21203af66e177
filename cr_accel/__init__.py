"""cr_accel: a config-driven PyTorch trainer built on HuggingFace Accelerate."""

__version__ = "0.1.0"
