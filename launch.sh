#!/usr/bin/env bash
# Start train.py through `accelerate launch`, with a config from accelerate_configs/.
# Run `./launch.sh --help` for the options. Everything after the launcher's own options is
# passed to train.py unchanged.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
configs_dir="$here/accelerate_configs"
train_script="${CR_ACCEL_TRAIN_SCRIPT:-$here/train.py}"
# The interpreter whose accelerate runs: $PYTHON, else the project's .venv (scripts/setup.sh makes it),
# else python (python3) from PATH.
python="${PYTHON:-}"
if [[ -z $python ]]; then
  if [[ -x $here/.venv/bin/python ]]; then python="$here/.venv/bin/python"
  elif command -v python >/dev/null 2>&1; then python=python
  else python=python3
  fi
fi
# `accelerate launch`, run by cr_accel/launch_exit.py so that a user error (2) and a preemption (75)
# reach the caller with any number of processes, without torchrun's traceback (see that file).
launcher="$here/cr_accel/launch_exit.py"

usage() {
  cat <<EOF
usage: ./launch.sh [--accelerate-config NAME|PATH] [--num-processes N] [--dry-run] [--] [train.py args ...]

  --accelerate-config NAME|PATH  a file in accelerate_configs/ without .yaml ($(available)), or a path.
                                 Default: cpu with no CUDA GPU, single_gpu with one, multi_gpu with several.
                                 multi_node is for accelerate launch (docs/slurm.md) or a filled-in copy.
  --num-processes N              processes to start (over all machines). Default: all GPUs found for
                                 multi_gpu/fsdp/deepspeed, otherwise the config's value.
                                 cpu with N > 1 starts a real N-process gloo run (DistributedType.MULTI_CPU).
  --dry-run                      print the command (one line) and exit
  -h, --help                     this help

Environment: CR_ACCEL_TRAIN_SCRIPT (script to run, default: train.py next to launch.sh),
PYTHON (interpreter whose accelerate is used, default: .venv/bin/python when it exists, else python),
CR_ACCEL_NUM_GPUS (skip GPU detection).
Exit codes: 0 done, 2 a user error (said once), 75 preempted after a checkpoint, 1 anything else; the
same with any number of processes (torchrun's agent alone would turn 2 and 75 into 1).
Example: ./launch.sh --num-processes 2 --config configs/default.yaml training.epochs=3
EOF
}

available() { (cd "$configs_dir" && ls -- *.yaml) | sed 's/\.yaml$//' | paste -sd, - | sed 's/,/, /g'; }
die() { echo "launch.sh: $*; available accelerate configs: $(available)" >&2; exit 2; }

resolve_config() {  # NAME in accelerate_configs/, or a path -> $config_file
  if [[ -f $configs_dir/$accel_config.yaml ]]; then
    config_file="$configs_dir/$accel_config.yaml"
  elif [[ $accel_config == */* || $accel_config == *.yaml || $accel_config == *.yml ]] && [[ -f $accel_config ]]; then
    config_file="$accel_config"
  else
    die "unknown accelerate config '$accel_config'"
  fi
}

count_gpus() {  # CUDA GPUs this run can see
  if [[ -n ${CR_ACCEL_NUM_GPUS:-} ]]; then echo "$CR_ACCEL_NUM_GPUS"; return; fi
  local listing
  # nvidia-smi ignores CUDA_VISIBLE_DEVICES, so only trust it when that is unset.
  if [[ -z ${CUDA_VISIBLE_DEVICES+set} ]] && listing=$(nvidia-smi -L 2>/dev/null); then
    grep -c '^GPU ' <<<"$listing" || true
  else
    "$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
  fi
}

accel_config="" num_processes="" dry_run=0
while (($#)); do
  opt=$1 value=""
  case "$opt" in
    --accelerate-config=*|--num-processes=*) value=${opt#*=}; opt=${opt%%=*}; shift ;;
    --accelerate-config|--num-processes) (($# >= 2)) || die "$opt needs a value"; value=$2; shift 2 ;;
  esac
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --accelerate-config) [[ -n $value ]] || die "unknown accelerate config ''"; accel_config=$value ;;
    --num-processes)
      [[ $value =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$value'"
      num_processes=$value ;;
    --) shift; break ;;
    *) break ;;  # the first argument for train.py: it and everything after go there unchanged
  esac
done

config_file=""
[[ -z $accel_config ]] || resolve_config  # fail fast, before the (slow) GPU detection
gpus=$(count_gpus)
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
if [[ -z $accel_config ]]; then
  if ((gpus == 0)); then accel_config=cpu
  elif ((gpus == 1)) && [[ -z $num_processes || $num_processes == 1 ]]; then accel_config=single_gpu
  else accel_config=multi_gpu
  fi
  resolve_config
fi

case "$accel_config" in
  multi_node)  # machine_rank and main_process_ip differ per machine; the shipped file has neither
    die "'multi_node' needs per-machine values: see docs/slurm.md, or pass a filled-in copy of it by path" ;;
  multi_gpu|fsdp|deepspeed)
    # Without CUDA, accelerate would start N independent single-process runs, silently.
    ((gpus > 0)) || die "'$accel_config' needs CUDA GPUs and none were found (use --accelerate-config cpu)"
    [[ -n $num_processes ]] || num_processes=$gpus ;;
  single_gpu)
    [[ -z $num_processes || $num_processes == 1 ]] ||
      die "'single_gpu' runs one process; use multi_gpu for --num-processes $num_processes" ;;
esac

cmd=()
if grep -qE '^use_cpu:[[:space:]]*true' "$config_file" && ((${num_processes:-1} > 1)); then
  # accelerate 1.15: `--cpu --num_processes N` starts ONE process, and `--multi_gpu` without
  # ACCELERATE_USE_CPU=1 starts N processes that each think they are alone. This is the
  # combination that gives DistributedType.MULTI_CPU (gloo) with world size N.
  # Port 0: accelerate picks a free port, so parallel CPU runs on one machine do not collide.
  cmd+=(env ACCELERATE_USE_CPU=1 "$python" "$launcher" --config_file "$config_file"
        --multi_gpu --num_processes "$num_processes" --num_machines 1 --main_process_port 0)
else
  cmd+=("$python" "$launcher" --config_file "$config_file")
  [[ -z $num_processes ]] || cmd+=(--num_processes "$num_processes")
fi
cmd+=("$train_script" "$@")

if ((dry_run)); then
  printf -v line '%q ' "${cmd[@]}"
  echo "${line% }"
  exit 0
fi
[[ -f $train_script ]] || { echo "launch.sh: training script not found: $train_script" >&2; exit 2; }
exec "${cmd[@]}"
