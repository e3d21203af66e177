"""The names of what a run writes into `output.dir` (besides the log and the CSV files, whose names are
configurable): one place for the trainer, the commands and `--overwrite`."""

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
CHECKPOINTS = "checkpoints"
TEST_METRICS = "test_metrics.json"  # the test split's score at the end of training
EVAL_PATTERN = "eval_*.json"  # `cr-accel evaluate`'s records

RUN_FILES = (CONFIG, ENVIRONMENT, CHECKPOINTS, "samples", "dashboard_run_id", "trackers", TEST_METRICS)


def eval_file(split: str, checkpoint_name: str) -> str:
    """`cr-accel evaluate`'s record of `split` scored with checkpoint `checkpoint_name` (best, last, step_...)."""
    return f"eval_{split}_{checkpoint_name}.json"
