"""FSDP2, one table for the scripts that support it (train_dit.py, train_ldm_sd.py), on two CPU processes over gloo.
accelerate enables FSDP for GPU processes only; the `fsdp_on_cpu` fixture lifts that gate with a test shim (torch's
FSDP2 itself runs on CPU). tests/test_gpu.py runs accelerate's own FSDP2 on a GPU, without the shim."""

import shutil

import pytest
import torch
from conftest import DIT, LDM, assert_same_weights, one_error, run_script, tiny_run_args
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
