"""FSDP2, one table for the scripts that support it (train_dit.py, train_ldm_sd.py), on two CPU processes over gloo.
accelerate enables FSDP for GPU processes only; the `fsdp_on_cpu` fixture lifts that gate with a test shim (torch's
FSDP2 itself runs on CPU). tests/test_gpu.py runs accelerate's own FSDP2 on a GPU, without the shim."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DIT, LDM, assert_same_weights, one_error, run_script, tiny_run_args
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file

# Where each script keeps the EMA model in a checkpoint, and the model in its export.
FOLDERS = {DIT: ("transformer_ema", "transformer"), LDM: ("unet_ema", "unet")}


@pytest.mark.parametrize("script", [DIT, LDM])
def test_fsdp2_two_processes_train_resume_and_export_like_ddp(script, tiny_fixtures, fsdp_on_cpu, tmp_path):
    """A 4-step run with EMA and validation, its resume from checkpoint-2, and the same run under DDP. The resumed
    run ends bitwise equal; the EMA gathered from the shards (checkpoint, export) matches DDP's; the model file of a
    checkpoint is whole weights read without running code; resuming it without FSDP is a one-line error."""
    runs = {name: tmp_path / name for name in ("fsdp", "resumed", "ddp", "without_fsdp")}
    args = [*tiny_run_args(script, tiny_fixtures, runs["fsdp"]), "--max_train_steps", "4"]
    args += ["--checkpointing_steps", "2", "--validation_steps", "2", "--logging_steps", "1"]

    def in_run(name):  # the same flags, into another folder
        return [runs[name] if a == runs["fsdp"] else a for a in args]

    run_script(script, *args, launcher="accelerate", env=fsdp_on_cpu, timeout=300)
    assert (runs["fsdp"] / "samples" / "step-2.png").is_file() and (runs["fsdp"] / "manifest.json").is_file()
    (model_file,) = (runs["fsdp"] / "checkpoint-4").glob("pytorch_model_fsdp*.bin")
    assert all(torch.isfinite(v).all() for v in torch.load(model_file, weights_only=True).values())

    for name in ("resumed", "without_fsdp"):
        shutil.copytree(runs["fsdp"] / "checkpoint-2", runs[name] / "checkpoint-2")
    resume = ["--resume_from_checkpoint", "latest"]
    run_script(script, *in_run("resumed"), *resume, launcher="accelerate", env=fsdp_on_cpu, timeout=300)
    assert_same_weights(runs["fsdp"] / "checkpoint-4", runs["resumed"] / "checkpoint-4")
    proc = run_script(script, *in_run("without_fsdp"), *resume, expect_rc=2)
    one_error(proc.stderr, "--resume_from_checkpoint", "written with FSDP")

    run_script(script, *in_run("ddp"), launcher="accelerate", timeout=300)
    ema, export = FOLDERS[script]
    for weights in (f"checkpoint-4/{ema}", export):
        sharded = load_file(runs["fsdp"] / weights / "diffusion_pytorch_model.safetensors")
        reference = load_file(runs["ddp"] / weights / "diffusion_pytorch_model.safetensors")
        assert sharded.keys() == reference.keys()
        for key in sharded:
            torch.testing.assert_close(sharded[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{weights}: {key}")


def test_flags_that_need_whole_weights_are_refused_under_fsdp(tiny_fixtures, fsdp_on_cpu, tmp_path):
    """Each process exits with code 2 and the same line (the launcher may interleave the two) without a traceback of
    its own; the launcher reports 1."""
    args = [*tiny_run_args(LDM, tiny_fixtures, tmp_path / "run"), "--offload_ema"]
    proc = run_script(LDM, *args, launcher="accelerate", env=fsdp_on_cpu, expect_rc=1)
    assert proc.stderr.count("error: --offload_ema: not supported with FSDP; drop it") == 2, proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr  # torchrun prefixes each process's lines with [rankN]


# Appended to the FSDP shim: records the dtype of every float tensor the model's forward receives.
INPUT_PROBE = """
import os
import diffusers

def probe(forward):
    def recorded(self, *args, **kwargs):
        with open(os.environ["INPUT_DTYPES"], "a") as f:
            for name, value in [*enumerate(args), *kwargs.items()]:
                if hasattr(value, "is_floating_point") and value.is_floating_point():
                    f.write(f"{name} {value.dtype}\\n")
        return forward(self, *args, **kwargs)
    return recorded

for cls in (diffusers.DiTTransformer2DModel, diffusers.UNet2DConditionModel):
    cls.forward = probe(cls.forward)
"""


@pytest.mark.parametrize("script", [DIT, LDM])
def test_fsdp2_bf16_without_ema(script, tiny_fixtures, fsdp_on_cpu, tmp_path):
    """FSDP2's mixed precision casts every float input of the model to bf16 by default, which rounds the flow
    timesteps (713.7 -> 712). The scripts autocast the forward instead: the inputs stay float32, as under DDP.
    Without EMA a checkpoint holds the model itself, gathered from the shards."""
    shim = Path(fsdp_on_cpu["PYTHONPATH"].split(os.pathsep)[0]) / "sitecustomize.py"
    shim.write_text(shim.read_text() + INPUT_PROBE)
    dtypes = tmp_path / "dtypes.txt"
    args = [*tiny_run_args(script, tiny_fixtures, tmp_path / "run"), "--max_train_steps", "2", "--no-use_ema"]
    args += ["--mixed_precision", "bf16", *(["--objective", "flow"] if script == DIT else [])]
    env = {**fsdp_on_cpu, "INPUT_DTYPES": str(dtypes)}
    run_script(script, *args, launcher="accelerate", env=env, timeout=300)
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["mixed_precision"] == "bf16"
    recorded = dtypes.read_text().splitlines()
    assert recorded and all(line.endswith("torch.float32") for line in recorded), sorted(set(recorded))
    folder = tmp_path / "run" / "checkpoint-2" / FOLDERS[script][1]
    model_cls = DiTTransformer2DModel if script == DIT else UNet2DConditionModel
    model = model_cls.from_pretrained(folder)  # raises on a missing weight or one of a shard's shape
    assert all(torch.isfinite(p).all() for p in model.parameters())
