"""Every checkpoint layout accelerate 1.15 writes, built on CPU with the names and folders its save_state uses:
detection, the allow-list, shapes without reading weights, the merged model, and refusing tampered files.

Real content: `plain` (accelerate's own save_accelerator_state), and `fsdp_sharded` / `fsdp_full` from a real
2-process FSDP2 run on gloo (fully_shard, then the calls accelerate's save_fsdp_model/save_fsdp_optimizer make).
Simulated: the DeepSpeed files (no deepspeed here), as dicts with the keys its engine.py save_checkpoint writes.
"""

import math
import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections import OrderedDict
from enum import IntEnum

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn

from cr_accel.checkpoint import CheckpointError, Checkpoints, check_model_matches, load_model, verify
from cr_accel.checkpoint.files import list_files
from cr_accel.checkpoint.layouts import (DEEPSPEED, FSDP_FULL, FSDP_SHARDED, FSDP_SHARDED_LOCAL, PLAIN, detect,
                                         load_model_state, model_shapes)
from cr_accel.checkpoint.store import _write_manifest
from tests.runners import ROOT, clean_env, free_port

# DCP's no_dist=True writes in one process on purpose; its warning says it assumes so.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Net(nn.Module):
    """Linear + Conv + BatchNorm: weights, biases, buffers, and shapes that do not split evenly over 2 ranks."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 3)
        self.norm = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def trained_net():
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(4, 2, 6, 6)).square().mean().backward()  # BatchNorm running stats move off their defaults
    torch.optim.AdamW(net.parameters(), lr=0.1).step()
    return net


def assert_same_state(loaded, expected):
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def write_rng_files(folder, ranks):
    for rank in range(ranks):  # accelerate's random_states_<rank>.pkl; what it holds does not matter here
        torch.save({"step": 0}, folder / f"random_states_{rank}.pkl")


# ---------------------------------------------------------------- layouts written in this process


def write_plain(folder, state, safe=True):
    """accelerate's own writer behind save_state for the plain (no FSDP/DeepSpeed) distributed types."""
    from accelerate.checkpointing import save_accelerator_state

    folder.mkdir(exist_ok=True)  # save_state makes the folder before it calls the writer
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    save_accelerator_state(str(folder), [state], [optimizer], [], [], 0, 0, safe_serialization=safe)


def write_fsdp_full(folder, state):
    """save_fsdp_model / save_fsdp_optimizer with FULL_STATE_DICT: torch.save of the gathered dicts."""
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "pytorch_model_fsdp.bin")
    torch.save({"state": {}, "param_groups": [{"lr": 0.1, "params": list(state)}]}, folder / "optimizer.bin")
    write_rng_files(folder, 2)


def write_fsdp_sharded_1_rank(folder, state):
    """save_fsdp_model with SHARDED_STATE_DICT: DCP of {"model": state_dict}, one process."""
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(folder / "pytorch_model_fsdp_0"), no_dist=True)
    dcp.save({"optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
             storage_writer=dcp.FileSystemWriter(folder / "optimizer_0"), no_dist=True)
    write_rng_files(folder, 1)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """Modules named like DeepSpeed's, so pickles refer to its classes exactly as a real checkpoint does."""
    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler",
             "deepspeed.runtime.zero", "deepspeed.runtime.zero.config"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale, self.dynamic = scale, False

    LossScaler.__module__, LossScaler.__qualname__ = "deepspeed.runtime.fp16.loss_scaler", "LossScaler"
    modules["deepspeed.runtime.fp16.loss_scaler"].LossScaler = LossScaler
    stage = IntEnum("ZeroStageEnum", {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3},
                    module="deepspeed.runtime.zero.config")
    modules["deepspeed.runtime.zero.config"].ZeroStageEnum = stage
    return types.SimpleNamespace(LossScaler=LossScaler, ZeroStageEnum=stage)


DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}


def deepspeed_common(module_state, buffer_names, param_shapes, **extra):
    """engine.py `_common_checkpoint_state` with a ZeRO optimizer (its state lives in the optim files)."""
    return dict(module=module_state, buffer_names=buffer_names, optimizer=None, param_shapes=param_shapes,
                shared_params={}, lr_scheduler=None, data_sampler=None, random_ltd=None,
                sparse_tensor_module_names=set(), skipped_steps=0, global_steps=3, global_samples=12,
                dp_world_size=2, mp_world_size=1, checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
                ds_config=DS_CONFIG, ds_version="0.18.0", **extra)


def write_deepspeed_tail(folder):
    """What DeepSpeed puts beside the tag folder: `latest` (the tag) and its recovery script."""
    (folder / "latest").write_text("pytorch_model")
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script, copied by _copy_recovery_script\n")
    write_rng_files(folder, 2)


def write_deepspeed_zero2(folder, state, ds):
    tag = folder / "pytorch_model"
    tag.mkdir(parents=True)
    buffers = [n for n in state if "running" in n or "num_batches" in n]
    shapes = [OrderedDict((n, t.shape) for n, t in state.items() if n not in buffers)]
    torch.save(deepspeed_common(state, buffers, shapes, frozen_param_shapes=OrderedDict(),
                                frozen_param_fragments=OrderedDict()), tag / "mp_rank_00_model_states.pt")
    flat = torch.cat([t.flatten().float() for n, t in state.items() if n not in buffers])
    for rank, part in enumerate(flat.chunk(2)):
        optimizer = {"loss_scaler": ds.LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
                     "zero_stage": ds.ZeroStageEnum.gradients, "partition_count": [2], "base_optimizer_state": [],
                     "single_partition_of_fp32_groups": [part.clone()], "group_paddings": [0]}
        torch.save({"optimizer_state_dict": optimizer, "ds_config": DS_CONFIG, "ds_version": "0.18.0"},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    write_deepspeed_tail(folder)


def zero3_partition(tensor, rank, world):
    """Rank `rank`'s piece of a ZeRO-3 parameter: ceil(n / world) elements, the last rank zero-padded."""
    part = math.ceil(tensor.numel() / world)
    padded = torch.cat([tensor.flatten().float(), torch.zeros(part * world - tensor.numel())])
    return padded[rank * part:(rank + 1) * part].clone()


def write_deepspeed_zero3(folder, state, ds, world=2):
    """Per-rank model-state files (buffers real, parameters empty placeholders) and per-rank fp32 partitions of
    two parameter groups; a frozen parameter (norm.bias) travels as fragments in the model-state files instead."""
    frozen = [n for n in state if n.endswith("norm.bias")]
    tag = folder / "pytorch_model"
    tag.mkdir(parents=True)
    buffers = [n for n in state if "running" in n or "num_batches" in n]
    trained = [n for n in state if n not in buffers and n not in frozen]
    groups = [trained[:2], trained[2:]]
    module = {n: (t if n in buffers else torch.empty(0)) for n, t in state.items()}
    for rank in range(world):
        common = deepspeed_common(
            module, buffers, [OrderedDict((n, state[n].shape) for n in g) for g in groups],
            frozen_param_shapes=OrderedDict((n, state[n].shape) for n in frozen),
            frozen_param_fragments=OrderedDict((n, zero3_partition(state[n], rank, world)) for n in frozen))
        torch.save(common, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        flats = [torch.cat([zero3_partition(state[n], rank, world) for n in g]) for g in groups]
        optimizer = {"zero_stage": ds.ZeroStageEnum.weights, "loss_scaler": ds.LossScaler(1.0),
                     "dynamic_loss_scale": False, "overflow": False, "partition_count": world,
                     "optimizer_state_dict": {"state": {}, "param_groups": []}, "fp32_flat_groups": flats}
        torch.save({"optimizer_state_dict": optimizer, "ds_config": DS_CONFIG, "ds_version": "0.18.0"},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    write_deepspeed_tail(folder)


BUILDERS = {
    "plain": (PLAIN, lambda folder, state, ds: write_plain(folder, state)),
    "plain_bin": (PLAIN, lambda folder, state, ds: write_plain(folder, state, safe=False)),
    "fsdp_full": (FSDP_FULL, lambda folder, state, ds: write_fsdp_full(folder, state)),
    "fsdp_sharded_1_rank": (FSDP_SHARDED, lambda folder, state, ds: write_fsdp_sharded_1_rank(folder, state)),
    "deepspeed_zero2": (DEEPSPEED, write_deepspeed_zero2),
    "deepspeed_zero3": (DEEPSPEED, write_deepspeed_zero3),
}


@pytest.fixture(params=sorted(BUILDERS))
def built(request, tmp_path, fake_deepspeed):
    layout, write = BUILDERS[request.param]
    state = trained_net().state_dict()
    write(tmp_path / "ckpt", state, fake_deepspeed)
    return types.SimpleNamespace(kind=request.param, layout=layout, folder=tmp_path / "ckpt", state=state)


def shapes_of(state):
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


# ---------------------------------------------------------------- a real 2-process FSDP2 run

FSDP2_WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, torch.multiprocessing as mp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from tests.test_layouts import Net

    def work(rank, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.manual_seed(0)
        model = Net()
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 2, 6, 6)).square().mean().backward()
        optimizer.step()
        # save_fsdp_model / save_fsdp_optimizer, SHARDED_STATE_DICT (FSDP2: sd_options without full_state_dict)
        dcp.save({"model": get_model_state_dict(model)},
                 storage_writer=dcp.FileSystemWriter(f"{out}/sharded/pytorch_model_fsdp_0"))
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 storage_writer=dcp.FileSystemWriter(f"{out}/sharded/optimizer_0"))
        # FULL_STATE_DICT with more than one process: offload_to_cpu and rank0_only, rank 0 writes
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
        state = get_model_state_dict(model, options=full)
        optim = get_optimizer_state_dict(model, optimizer, options=full)
        for name in ("sharded", "full"):
            torch.save({"step": 0}, f"{out}/{name}/random_states_{rank}.pkl")
        if rank == 0:
            torch.save(state, f"{out}/full/pytorch_model_fsdp.bin")
            torch.save(optim, f"{out}/full/optimizer.bin")
            save_file(state, f"{out}/reference.safetensors")  # gathered by DTensor, not read back through DCP
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        os.makedirs(f"{sys.argv[1]}/full", exist_ok=True)
        os.makedirs(f"{sys.argv[1]}/sharded", exist_ok=True)
        mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("fsdp2")
    script = out / "fsdp2_worker.py"
    script.write_text(FSDP2_WORKER)
    result = subprocess.run([sys.executable, str(script), str(out), str(free_port())], cwd=ROOT, timeout=240,
                            env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return types.SimpleNamespace(sharded=out / "sharded", full=out / "full",
                                 reference=load_file(out / "reference.safetensors"))


def test_real_fsdp2_sharded_checkpoint_has_two_ranks_of_shards(fsdp2_run):
    files = list_files(fsdp2_run.sharded)
    assert {"pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
            "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/.metadata", "optimizer_0/__0_0.distcp",
            "optimizer_0/__1_0.distcp", "random_states_0.pkl", "random_states_1.pkl"} == set(files)
    assert detect(fsdp2_run.sharded) is FSDP_SHARDED
    assert all(FSDP_SHARDED.allows(f) for f in files)


@pytest.mark.parametrize("which, layout", [("sharded", FSDP_SHARDED), ("full", FSDP_FULL)])
def test_real_fsdp2_checkpoint_loads_the_gathered_model(fsdp2_run, which, layout):
    folder = getattr(fsdp2_run, which)
    assert detect(folder) is layout and all(layout.allows(f) for f in list_files(folder))
    assert model_shapes(folder) == shapes_of(fsdp2_run.reference) == shapes_of(Net().state_dict())
    assert_same_state(load_model_state(folder), fsdp2_run.reference)
    check_model_matches(folder, Net())


def test_real_fsdp2_shard_deleted_is_refused(fsdp2_run, tmp_path):
    folder = copy_tree(fsdp2_run.sharded, tmp_path / "ckpt")
    (folder / "pytorch_model_fsdp_0/__1_0.distcp").unlink()
    for read in (model_shapes, load_model_state):
        with pytest.raises(CheckpointError, match=r"shard `pytorch_model_fsdp_0/__1_0.distcp` .* is missing"):
            read(folder)


def copy_tree(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------- every layout


def test_detect_names_the_layout(built):
    assert detect(built.folder) is built.layout


def test_every_file_written_is_allowed_and_nothing_else(built):
    files = list_files(built.folder)
    assert files and all(built.layout.allows(f) for f in files), [f for f in files if not built.layout.allows(f)]
    model_folder = next((f.split("/")[0] for f in files if "/" in f), "")
    strangers = ["evil.pkl", "custom_checkpoint_0.pkl", "sampler.bin", "scheduler.bin", "dl_state_dict.bin",
                 "extra/model.safetensors", "extra/pytorch_model_fsdp.bin", f"{model_folder}/evil.pkl",
                 f"{model_folder}/sub/{files[-1]}", f"{files[0]}\n"]
    assert not [s for s in strangers if built.layout.allows(s)]


def test_layouts_do_not_allow_each_others_model_files():
    assert not PLAIN.allows("pytorch_model_fsdp.bin") and not FSDP_FULL.allows("model.safetensors")
    assert not FSDP_SHARDED.allows("pytorch_model/mp_rank_00_model_states.pt")
    assert not DEEPSPEED.allows("pytorch_model_fsdp_0/.metadata") and not DEEPSPEED.allows("optimizer.bin")
    assert not DEEPSPEED.allows("zero_to_fp32.py/x") and not DEEPSPEED.allows("pytorch_model/zero_to_fp32.py")
    assert not DEEPSPEED.allows("pytorch_model/mp_rank_01_model_states.pt")  # tensor parallel: not supported


def test_model_shapes_read_no_weights(built, monkeypatch):
    """safetensors headers and DCP metadata need no torch.load at all; torch.save'd files are only mapped."""
    real_load = torch.load
    calls = []

    def watched_load(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("mmap") is True and kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", watched_load)
    assert model_shapes(built.folder) == shapes_of(built.state)
    if built.kind in ("plain", "fsdp_sharded_1_rank"):
        assert calls == []


def test_load_model_state_equals_the_saved_module(built):
    assert_same_state(load_model_state(built.folder), built.state)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_wrapped_names_load_as_plain_names(tmp_path, fake_deepspeed, prefix):
    state = trained_net().state_dict()
    wrapped = {prefix + name: tensor for name, tensor in state.items()}
    for kind, (_, write) in BUILDERS.items():
        write(tmp_path / kind, wrapped, fake_deepspeed)
        assert model_shapes(tmp_path / kind) == shapes_of(state), kind
        assert_same_state(load_model_state(tmp_path / kind), state)


def test_an_unknown_folder_names_the_known_layouts(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"`{tmp_path}` holds no model .*plain, fsdp_sharded, "
                                              r"fsdp_sharded_local, fsdp_full, deepspeed"):
        detect(tmp_path)


def test_per_rank_fsdp_files_are_detected_and_refused_clearly(tmp_path):
    """LOCAL_STATE_DICT (FSDP v1): pytorch_model_fsdp_rank<R>.bin per rank, the optimizer in DCP optimizer_0/."""
    state = trained_net().state_dict()
    for rank in range(2):
        torch.save(state, tmp_path / f"pytorch_model_fsdp_rank{rank}.bin")
    dcp.save({"optimizer": {"param_groups": [{"lr": 0.1}]}},
             storage_writer=dcp.FileSystemWriter(tmp_path / "optimizer_0"), no_dist=True)
    assert detect(tmp_path) is FSDP_SHARDED_LOCAL
    assert all(FSDP_SHARDED_LOCAL.allows(f) for f in list_files(tmp_path))
    assert FSDP_SHARDED_LOCAL.allows("pytorch_model_fsdp_0_rank1.bin")  # use_dcp=False names
    assert FSDP_SHARDED_LOCAL.allows("optimizer_0_rank1.bin") and not FSDP_SHARDED_LOCAL.allows("optimizer.bin")
    with pytest.raises(CheckpointError, match="per-rank FSDP shards .* SHARDED_STATE_DICT .* or FULL_STATE_DICT"):
        model_shapes(tmp_path)


# ---------------------------------------------------------------- tampered files


class CreatesMarker:
    """Unpickling this runs `touch <marker>`: a stand-in for any code a tampered checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_the_marker_payload_works_under_plain_pickle(tmp_path):
    """So the refusals below are meaningful: plain pickle.load really would have run it."""
    pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def test_malicious_dcp_metadata_is_refused_without_running_it(fsdp2_run, tmp_path):
    folder = copy_tree(fsdp2_run.sharded, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (folder / "pytorch_model_fsdp_0/.metadata").write_bytes(pickle.dumps(CreatesMarker(marker)))
    for read in (model_shapes, load_model_state):
        with pytest.raises(CheckpointError, match=r"`pytorch_model_fsdp_0/.metadata` is not DCP metadata .*"
                                                  r"without running code .*system"):
            read(folder)
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_its_folder_is_refused(tmp_path):
    write_fsdp_sharded_1_rank(tmp_path, trained_net().state_dict())
    metadata_file = tmp_path / "pytorch_model_fsdp_0/.metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"shard `pytorch_model_fsdp_0/../../elsewhere.distcp` .* missing"):
        load_model_state(tmp_path)


def test_truncated_dcp_shard_is_refused(tmp_path):
    write_fsdp_sharded_1_rank(tmp_path, trained_net().state_dict())
    shard = tmp_path / "pytorch_model_fsdp_0/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="shorter than its metadata says"):
        load_model_state(tmp_path)


@pytest.mark.parametrize("kind, file", [
    ("fsdp_full", "pytorch_model_fsdp.bin"),
    ("plain_bin", "pytorch_model.bin"),
    ("deepspeed_zero2", "pytorch_model/mp_rank_00_model_states.pt"),
    ("deepspeed_zero3", "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("deepspeed_zero3", "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
@pytest.mark.parametrize("tamper", ["pickle_with_code", "not_a_torch_file"])
def test_tampered_torch_files_are_refused_without_running_them(tmp_path, fake_deepspeed, kind, file, tamper):
    _, write = BUILDERS[kind]
    write(tmp_path / "ckpt", trained_net().state_dict(), fake_deepspeed)
    marker = tmp_path / "pwned"
    if tamper == "pickle_with_code":
        torch.save({"module": CreatesMarker(marker)}, tmp_path / "ckpt" / file)
    else:
        (tmp_path / "ckpt" / file).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=rf"`{file}` is not a tensor file cr_accel can read without running"
                       ) as refused:
        load_model_state(tmp_path / "ckpt")
    assert not marker.exists()
    if tamper == "pickle_with_code":  # the reason shown is the refused global, not torch's weights_only=False hint
        assert "refers to `posix.system`" in str(refused.value) and "set to `False`" not in str(refused.value)


def test_a_damaged_safetensors_file_is_refused(tmp_path):
    write_plain(tmp_path, trained_net().state_dict())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    for read in (model_shapes, load_model_state):
        with pytest.raises(CheckpointError, match="`model.safetensors` is not a safetensors file"):
            read(tmp_path)


def test_a_bin_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model_fsdp.bin")
    with pytest.raises(CheckpointError, match=r"`pytorch_model_fsdp.bin` is not a state dict"):
        model_shapes(tmp_path)


def test_zero3_with_a_rank_missing_is_refused(tmp_path, fake_deepspeed):
    write_deepspeed_zero3(tmp_path, trained_net().state_dict(), fake_deepspeed, world=3)
    (tmp_path / "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer-state files .* not one per rank from 0 \(found ranks "
                                              r"\[0, 2\]\)"):
        load_model_state(tmp_path)


# ---------------------------------------------------------------- check_model_matches and load_model


def test_check_model_matches_names_the_wrong_shapes(built):
    check_model_matches(built.folder, Net())
    with pytest.raises(CheckpointError, match=r"`conv.weight` has shape \[3, 2, 3, 3\] in the checkpoint, "
                                              r"\[4, 2, 3, 3\] in the model"):
        check_model_matches(built.folder, Net(channels=4))


def test_check_model_matches_compares_plain_names_of_a_wrapped_model(built):
    wrapper = nn.Module()
    wrapper._orig_mod = Net()  # what torch.compile puts around a model
    check_model_matches(built.folder, wrapper)


def configured_model(folder):
    """A checkpoint folder as cr_accel publishes it (config.yaml, manifest) around the default config's model."""
    from cr_accel.components import build_model
    from cr_accel.config import config_from_dict, parse_yaml

    raw = parse_yaml((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(base_channels=4)
    torch.manual_seed(3)
    model = build_model(config_from_dict(raw, check_components=False))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return model


def test_load_model_from_a_plain_checkpoint(tmp_path):
    folder = tmp_path / "run/checkpoints/best"
    model = configured_model(folder)
    write_plain(folder, model.state_dict())
    _write_manifest(folder, {"world_size": 1, "global_step": 4, "epoch": 1})
    loaded = load_model(tmp_path / "run")
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert not loaded.training


@pytest.mark.parametrize("kind", ["fsdp_full", "fsdp_sharded_1_rank", "deepspeed_zero3"])
def test_load_model_reads_every_layout(tmp_path, fake_deepspeed, kind):
    """Published as cr_accel publishes (a manifest over every file, through folders), verified, loaded."""
    folder = tmp_path / "ckpt"
    model = configured_model(folder)
    BUILDERS[kind][1](folder, model.state_dict(), fake_deepspeed)
    _write_manifest(folder, {"world_size": 1, "global_step": 4, "epoch": 1})
    manifest = verify(folder)
    assert any("/" in name for name in manifest["files"]) == (kind != "fsdp_full")  # folders were walked
    assert_same_state(load_model(folder).state_dict(), model.state_dict())


class MainProcessOnly:
    """What Checkpoints asks of an accelerator when one process publishes."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


def publish_everywhere(source, root):
    """`source`'s files published as a periodic, last and best checkpoint (hard-linked trees)."""
    import shutil

    ckpts = Checkpoints(MainProcessOnly(), root, keep_last_n=None)
    tmp = ckpts.prepare_folder(8)
    tmp.rmdir()
    shutil.copytree(source, tmp)
    return ckpts.publish(tmp, ["periodic", "last", "best"], {"world_size": 2, "global_step": 8, "epoch": 1})


def nested_or_model_file(folder):
    """The file to tamper with: a shard inside a folder where the layout has folders, else the model file."""
    files = list_files(folder)
    nested = [f for f in files if "/" in f and not f.endswith((".metadata", "latest"))]
    return max(nested or [f for f in files if "model" in f], key=lambda f: (folder / f).stat().st_size)


def assert_publishes_to_several_targets(folder, root):
    published = publish_everywhere(folder, root)
    assert [p.name for p in published] == ["step_00000008", "last", "best"]
    for target in published:
        manifest = verify(target)
        assert set(manifest["files"]) == set(list_files(folder))  # every file, through every folder
        check_model_matches(target, Net())
        assert_same_state(load_model_state(target), load_model_state(folder))
    shard = nested_or_model_file(folder)
    assert os.stat(published[0] / shard).st_ino == os.stat(published[1] / shard).st_ino  # links, not copies


def test_every_layout_publishes_to_several_targets_and_verifies(built, tmp_path):
    assert_publishes_to_several_targets(built.folder, tmp_path / "checkpoints")


def test_a_real_fsdp2_checkpoint_publishes_to_several_targets_and_verifies(fsdp2_run, tmp_path):
    assert_publishes_to_several_targets(fsdp2_run.sharded, tmp_path / "checkpoints")


@pytest.mark.parametrize("tamper, message", [("flip_byte", "does not match its checksum"),
                                             ("missing", "is missing"), ("extra", "unexpected file")])
def test_every_layout_refuses_a_tampered_checkpoint(built, tmp_path, tamper, message):
    import shutil

    last = publish_everywhere(built.folder, tmp_path / "checkpoints")[1]
    tampered = tmp_path / "tampered"
    shutil.copytree(last, tampered)  # separate files: the other targets stay intact
    shard = tampered / nested_or_model_file(built.folder)
    if tamper == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif tamper == "missing":
        shard.unlink()
    else:
        (shard.parent / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=message):
        verify(tampered)
    verify(last)


@pytest.mark.parametrize("kind", ["deepspeed_zero3", "fsdp_full"])
def test_a_sharded_run_checks_a_checkpoint_against_the_configs_model_not_its_placeholders(tmp_path, fake_deepspeed,
                                                                                        kind):
    """Under DeepSpeed ZeRO-3 the live module holds empty placeholders (FSDP v1: flat shards), whose shapes would
    refuse every checkpoint: the resume checks against the config's model, built without memory or RNG draws."""
    from accelerate.utils import DistributedType

    from cr_accel.config import config_from_dict
    from cr_accel.resume import ResumeMixin

    folder = tmp_path / "ckpt"
    model = configured_model(folder)
    BUILDERS[kind][1](folder, model.state_dict(), fake_deepspeed)
    live = configured_model(tmp_path / "unused")
    for p in live.parameters():
        p.data = torch.empty(0)  # what ZeRO-3 leaves in the module between forward passes
    with pytest.raises(CheckpointError, match="has shape"):
        check_model_matches(folder, live)
    distributed_type = DistributedType.DEEPSPEED if kind.startswith("deepspeed") else DistributedType.FSDP
    run = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(distributed_type=distributed_type, is_fsdp2=False), model=live,
        cfg=config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()), check_components=False))
    rng = torch.get_rng_state()
    skeleton = ResumeMixin._model_to_check(run)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.is_meta for p in skeleton.parameters())
    check_model_matches(folder, skeleton)
