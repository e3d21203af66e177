"""Errors a user can fix: the CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """A problem in the user's input (config, paths, checkpoints) with a message that says how to fix it
    (the command line exits 2 for it)."""


class ConfigError(UserError):
    """Every problem found in one config, reported together so the user can fix them in one pass."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "error" if len(self.problems) == 1 else "errors"
        super().__init__(f"Config is not well-formed, found {len(self.problems)} {noun}:\n{lines}")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, tampered with, or for another model."""
