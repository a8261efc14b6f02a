"""Smoke, resume and bad-input tests of train_mnist.py, run as users run it (subprocess, offline, CPU)."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (
    OFFLINE_ENV,
    REPO,
    assert_same_weights,
    check_damaged_checkpoint_and_claims,
    free_port,
    resume_in_new_folder,
    run_script,
)
from safetensors.torch import load_file

SCRIPT = "train_mnist.py"
FAST = [
    "--train_batch_size",
    "8",
    "--num_inference_steps",
    "2",
    "--validation_guidance_scales",
    "1,2",
    "--block_out_channels",
    "16,32",
    "--cross_attention_levels",
    "1",
    "--attention_head_dim",
    "8",
    "--logging_steps",
    "1",
]


def common(tiny_mnist, encoder, output_dir):
    return ["--data_root", tiny_mnist, "--text_encoder_name_or_path", encoder, "--output_dir", output_dir, *FAST]


def load_script():
    """train_mnist.py as a module, for in-process tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mnist", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_python_clip(tiny_mnist, tiny_clip, tmp_path):
    out = tmp_path / "run"
    run_script(
        SCRIPT,
        *common(tiny_mnist, tiny_clip, out),
        "--max_train_steps",
        "2",
        "--report_to",
        "tensorboard",
        "--tracker_project_name",
        "tiny",
        "--mixed_precision",
        "bf16",
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert (out / "samples" / "step-2.png").stat().st_size > 1000
    assert (out / "loss.png").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["max_train_steps"] == 2 and config["versions"]["torch"]
    assert config["mixed_precision"] == "bf16"  # bf16 autocast runs on CPU; the export stays float32 (below)

    # The export loads with diffusers alone and denoises to finite values.
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in unet.state_dict().values())
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.num_train_timesteps == 1000
    export_config = json.loads((out / "export_config.json").read_text())
    assert export_config["text_encoder_name_or_path"] == str(tiny_clip)
    # The UNet reads p x p pixel patches as channels: what export_config.json documents is all a user needs.
    p = export_config["patch_size"]
    assert unet.config.in_channels == p * p and scheduler.config.prediction_type == "v_prediction"
    states = torch.randn(2, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        x = torch.nn.functional.pixel_unshuffle(torch.randn(2, 1, 32, 32), p)
        pred = unet(x, torch.tensor([10, 900]), encoder_hidden_states=states).sample
    assert torch.nn.functional.pixel_shuffle(pred, p).shape == (2, 1, 32, 32) and torch.isfinite(pred).all()

    # A checkpoint holds the EMA UNet in save_pretrained layout (at the last step: the export's weights) and all
    # that --sample_from needs; the manifests of checkpoint and export hold.
    module = load_script()
    assert module.manifest_problem(out) is None and module.manifest_problem(out / "checkpoint-2") is None
    ema = UNet2DConditionModel.from_pretrained(out / "checkpoint-2", subfolder="unet_ema")
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), unet.state_dict().values(), strict=True))
    # TensorBoard got the scalars and the validation grid; the export says what it is (Hub model card).
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Images("validation")] == [2] and events.Images("validation")[0].width > 100
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license and "mnist" in card.data.tags
    assert "--max_train_steps 2" in card.text and "(samples.png)" in card.text and (out / "samples.png").is_file()

    again = tmp_path / "from-checkpoint"
    run_script(
        SCRIPT,
        "--sample_from",
        out / "checkpoint-2",
        "--output_dir",
        again,
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1",
    )
    assert (again / "samples" / "export.png").is_file()


def test_two_steps_accelerate_two_processes_bert(tiny_mnist, tiny_bert, tmp_path):
    out = tmp_path / "run"
    run_script(
        SCRIPT,
        *common(tiny_mnist, tiny_bert, out),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        launcher="accelerate",
    )
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_processes"] == 2
    checkpoint = out / "checkpoint-2"
    for rank in (0, 1):  # every process keeps its own RNG streams
        assert (checkpoint / f"train_rng_{rank}.safetensors").is_file()
        assert (checkpoint / f"random_states_{rank}.pkl").is_file()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # 16 samples per step: 8 per process.
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # The 2-process run resumed on 1 process: same step, learning rate and data position (in batches of 8).
    one = tmp_path / "one"
    shutil.copytree(out / "checkpoint-1", one / "checkpoint-1")
    proc = run_script(
        SCRIPT, *common(tiny_mnist, tiny_bert, one), "--max_train_steps", "2", "--resume_from_checkpoint", "latest"
    )
    assert "written by 2 processes, resumed on 1" in proc.stdout
    assert [r["step"] for r in read_metrics(one)] == [2]
    assert read_metrics(one)[0]["lr"] == rows[1]["lr"]
    state = json.loads((one / "checkpoint-2" / "training_state.json").read_text())
    assert (state["num_processes"], state["epoch"], state["epoch_batches"]) == (1, 0, 3)  # 2 batches, then 1


def test_two_processes_with_fewer_examples_than_a_batch_each(tiny_mnist, tiny_bert, tmp_path):
    """12 examples, batches of 8 (FAST), 2 processes: there are not two full batches, so each epoch is one step with the
    batches wrapped around (dropping the last batch would leave every epoch empty and the run spinning forever)."""
    out = tmp_path / "run"
    args = [
        *common(tiny_mnist, tiny_bert, out),
        "--max_samples",
        "12",
        "--num_train_epochs",
        "2",
        "--logging_steps",
        "1",
    ]
    run_script(SCRIPT, *args, launcher="accelerate", timeout=180)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2


def test_max_samples_whole_pipeline_then_sample_from_export(tiny_mnist, tiny_clip, tmp_path):
    out = tmp_path / "run"
    # Hyphen spellings and the seed aliases are accepted.
    run_script(
        SCRIPT,
        "--data-root",
        tiny_mnist,
        "--text-encoder-name-or-path",
        tiny_clip,
        "--output-dir",
        out,
        *FAST,
        "--max-samples",
        "10",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--num-eval-samples",
        "20",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
    )
    # 10 samples, batch 4, drop_last: 2 steps per epoch, 2 epochs; only the newest 2 checkpoints are kept.
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    evals = np.load(out / "eval_samples.npz")
    assert evals["images"].shape == (20, 28, 28) and evals["images"].dtype == np.uint8
    assert np.bincount(evals["labels"], minlength=10).tolist() == [2] * 10

    again = tmp_path / "from-export"
    run_script(
        SCRIPT,
        "--sample_from",
        out,
        "--output_dir",
        again,
        "--num_eval_samples",
        "10",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1,2",
        "--guidance_scale",
        "2",
    )
    evals = np.load(again / "eval_samples.npz")
    assert evals["images"].shape == (10, 28, 28) and sorted(evals["labels"].tolist()) == list(range(10))
    assert float(evals["guidance_scale"]) == 2.0 and float(evals["sample_seconds"]) > 0
    assert (again / "samples" / "export.png").is_file()


def test_resume_matches_uninterrupted_run(tiny_mnist, tiny_clip, tmp_path):
    straight = tmp_path / "straight"
    args = [
        *common(tiny_mnist, tiny_clip, straight),
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--lr_warmup_steps",
        "1",
        "--ema_power",
        "1.0",
    ]
    run_script(SCRIPT, *args)
    # Resume in a fresh folder from the step-2 checkpoint (mid-epoch: 64 samples / batch 8 = 8 steps per epoch).
    resumed = tmp_path / "resumed"
    proc = resume_in_new_folder(SCRIPT, args, straight, resumed)
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert [r["step"] for r in read_metrics(resumed)] == [3, 4]
    assert_same_weights(straight / "checkpoint-4", resumed / "checkpoint-4")
    # A resumed run that skipped the data position or reused the noise would still be close: make sure the
    # comparison is sharp by checking that training did move the weights between step 2 and step 4.
    w2, w4 = (
        load_file(straight / "checkpoint-2" / "model.safetensors"),
        load_file(straight / "checkpoint-4" / "model.safetensors"),
    )
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)

    # The 1-process run resumed on 2 processes: same steps and learning rates, data position in batches of 8
    # (2 before, then 2 steps of 2 processes), new random streams (not bitwise).
    two = tmp_path / "two"
    shutil.copytree(straight / "checkpoint-2", two / "checkpoint-2")
    args = [two if a == straight else a for a in args]
    run_script(SCRIPT, *args, "--resume_from_checkpoint", "latest", launcher="accelerate")
    rows = read_metrics(two)
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["lr"] for r in rows] == [r["lr"] for r in read_metrics(straight)[2:]]
    state = json.loads((two / "checkpoint-4" / "training_state.json").read_text())
    assert (state["num_processes"], state["epoch"], state["epoch_batches"]) == (2, 0, 6)


def test_bf16_from_the_flag_or_from_accelerate(tiny_mnist, tiny_clip, tmp_path):
    """bf16 autocast runs on CPU; the precision accelerate resolves (flag, or the launcher's environment when the
    flag is left out) is the one recorded. The flag's case is the run of test_two_steps_python_clip."""
    env = tmp_path / "env"
    # What `accelerate launch --mixed_precision bf16` (or an accelerate config set to bf16) hands the script.
    run_script(
        SCRIPT,
        *common(tiny_mnist, tiny_clip, env),
        "--max_train_steps",
        "2",
        "--validation_steps",
        "100",
        env={"ACCELERATE_MIXED_PRECISION": "bf16"},
    )
    assert json.loads((env / "run_config.json").read_text())["mixed_precision"] == "bf16"
    assert all(math.isfinite(r["loss"]) for r in read_metrics(env))
    unet = load_file(env / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in unet.values())


def test_divergence_stops_with_a_message_and_finite_checkpoints(tiny_mnist, tiny_clip, tmp_path):
    """Non-finite gradients skip the update on the device and are counted; a long enough run of them stops the run
    (exit 1) with the weights of the last good step."""
    out = tmp_path / "run"
    proc = run_script(
        SCRIPT,
        *common(tiny_mnist, tiny_clip, out),
        "--max_train_steps",
        "40",
        "--learning_rate",
        "1e6",
        "--lr_warmup_steps",
        "0",
        "--max_grad_norm",
        "0",
        "--max_nonfinite_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
        "--no-use_ema",
        expect_rc=1,
    )
    assert "non-finite gradient" in proc.stdout + proc.stderr
    rows = read_metrics(out)
    assert rows[-1]["nonfinite_steps"] >= 3 and rows[-1]["step"] < 40
    for checkpoint in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_mnist, tiny_clip, tmp_path):
    """A signal that reaches one rank only (as a node's pre-emption does) stops every rank within a step, at the
    same step, with one checkpoint and exit code 0, although no rank logs or checkpoints on its own until 1000."""
    import psutil

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--multi_gpu",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / SCRIPT),
        *map(str, common(tiny_mnist, tiny_clip, out)),
        "--max_train_steps",
        "1000",
        "--logging_steps",
        "1000",
        "--checkpointing_steps",
        "1000",
        "--validation_steps",
        "1000",
    ]
    env = {**__import__("os").environ, **OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    ranks = []
    while len(ranks) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if SCRIPT in " ".join(p.cmdline())]
    while not (out / "run_config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # the stop handler is in place before run_config.json is written
    ranks[-1].send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    assert {p.name for p in checkpoints[0].glob("train_rng_*")} == {
        "train_rng_0.safetensors",
        "train_rng_1.safetensors",
    }
    assert 1 <= json.loads((checkpoints[0] / "training_state.json").read_text())["global_step"] < 1000


def test_damaged_checkpoint_falls_back_and_the_folder_is_one_runs(tiny_mnist, tiny_clip, tmp_path, capsys):
    """`latest` skips a damaged checkpoint (one line) for the newest intact one; a damaged explicit path, a locked
    folder and a new run into another run's checkpoints are one-line errors that change nothing."""
    out = tmp_path / "run"
    args = [*common(tiny_mnist, tiny_clip, out), "--checkpointing_steps", "1", "--validation_steps", "100"]
    run_script(SCRIPT, *args, "--max_train_steps", "3")
    assert not (out / "run.lock").exists()  # released at the end
    check_damaged_checkpoint_and_claims(SCRIPT, load_script(), args, out, capsys, read_metrics)


def test_disk_full_while_saving_leaves_the_previous_checkpoint(tiny_mnist, tiny_clip, tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: one line, exit 1, no half folder, the previous checkpoint intact and the
    one `latest` picks."""
    import errno

    module = load_script()
    out = tmp_path / "run"
    args = module.parse_args([str(a) for a in common(tiny_mnist, tiny_clip, out)] + ["--max_train_steps", "1"])
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    unet = module.build_unet(args, cross_attention_dim=32)
    ema = EMAModel(unet.parameters(), foreach=True)
    optimizer = torch.optim.AdamW(unet.parameters())
    unet, optimizer = accelerator.prepare(unet, optimizer)
    rng = torch.Generator().manual_seed(0)
    out.mkdir()
    sampling = module.functools.partial(module.write_sampling_files, module.DPMSolverMultistepScheduler(), args, "enc")
    module.save_checkpoint(accelerator, args, unet, ema, rng, 1, (0, 1), sampling)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        module.save_checkpoint(accelerator, args, unet, ema, rng, 2, (0, 2), sampling)
    assert stopped.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert module.list_checkpoints(out) == [out / "checkpoint-1"]
    assert module.manifest_problem(out / "checkpoint-1") is None


def test_objective_rng_resumes_exactly_or_reseeds_from_another_device_type(tmp_path, capsys):
    """restore_train_rng (the block every trainer copies): the saved stream comes back on the same kind of device;
    a CUDA generator's state (16 bytes, not a CPU generator's 5056) gives a new, announced stream, not a crash."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    module = load_script()
    accelerator = SimpleNamespace(process_index=0, num_processes=1, print=print)
    state = {"num_processes": 1, "global_step": 3}
    saved = torch.Generator().manual_seed(123)
    save_file({"state": saved.get_state()}, tmp_path / "train_rng_0.safetensors")
    rng = torch.Generator().manual_seed(0)
    module.restore_train_rng(accelerator, tmp_path, rng, state, seed=0)
    assert torch.equal(rng.get_state(), saved.get_state()) and capsys.readouterr().out == ""

    save_file({"state": torch.arange(16, dtype=torch.uint8)}, tmp_path / "train_rng_0.safetensors")
    module.restore_train_rng(accelerator, tmp_path, rng, state, seed=0)
    assert "written on another device type: new random streams" in capsys.readouterr().out
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(7919 * 3).get_state())


def test_xformers_attention_gets_the_text_mask_in_the_compute_dtype(monkeypatch):
    """xformers, unlike SDPA under autocast, needs its bias in the queries' dtype, and diffusers' UNet builds the
    text mask's bias in float32. Emulated on CPU: a stand-in for xformers.ops.memory_efficient_attention checks the
    dtypes as the CUDA kernel does, then attends with SDPA (diffusers' XFormersAttnProcessor fails here)."""
    from types import SimpleNamespace

    import diffusers.models.attention_processor as processors
    import torch.nn.functional as F

    biases = []

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        if attn_bias is not None and attn_bias.dtype != q.dtype:
            raise RuntimeError("invalid dtype for bias - should match query's dtype")
        biases.append(attn_bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)

    ops = SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setattr(processors, "xformers", SimpleNamespace(ops=ops), raising=False)
    module = load_script()
    args = module.parse_args(["--block_out_channels", "16,32", "--cross_attention_levels", "1"])
    unet = module.build_unet(args, cross_attention_dim=32)
    unet.set_attn_processor(module.XFormersTextMask())
    x, states = torch.randn(2, 1, 32, 32), torch.randn(2, 8, 32)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])  # the second caption has 3 padding tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.denoise(unet, x, torch.tensor([10, 500]), states, mask, args.patch_size)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert any(b is not None and b.dtype == torch.bfloat16 for b in biases)
