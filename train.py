"""Train a model from a YAML config:

    python train.py --config configs/default.yaml [section.key=value ...]
    accelerate launch train.py --config configs/default.yaml
"""

import sys

from cr_accel.cli import main_train
from cr_accel.launch_exit import recorded

if __name__ == "__main__":
    sys.exit(recorded(main_train))  # recorded: launch.sh reports the workers' own exit codes
