"""GPU lane: every trainer on CUDA, run as users run it (subprocess, offline) with tiny models and data.

    python -m pytest -m gpu -n 0 -v tests/test_gpu.py      # on a machine with an NVIDIA GPU (.ci/gpu_lane)

Without CUDA every test here is skipped, so the normal `python -m pytest` stays green on CPU machines.
GPU_TESTS_DEVICE=cpu runs the same commands on the CPU instead (slow; for editing this file without a GPU):
the CUDA-only cases (fp16, torch.compile, xformers) still skip.

What the CPU suite cannot see and this lane checks:
  * bf16 autocast on CUDA, pre-emption (SIGTERM -> checkpoint -> exit 0) and resume with an EMA: the EMA's shadow
    tensors are read back from safetensors on the CPU and must end up on the GPU, or the first EMA update after
    the resume mixes devices;
  * sampling on CUDA, during training (validation) and from the export, and the exports loading in diffusers;
  * fp16 with a GradScaler: an overflow that never ends stops the run after --max_nonfinite_steps;
  * --gradient_checkpointing, --torch_compile (train_dit.py) and xformers attention (when installed).
  * accelerate's own FSDP2 on one GPU (train_dit.py, train_ldm_sd.py): the CPU suite lifts accelerate's GPU-only
    gate with a test shim; here nothing is patched.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV, REPO, run_script
from PIL import Image
from safetensors.torch import load_file

DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

# Like diffusers' `require_torch_gpu`: skipped with the reason in the report, never an error at collection.
NO_GPU_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False); run .ci/gpu_lane on one"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason=NO_GPU_REASON)]
# fp16 (GradScaler), torch.compile and xformers are checked on CUDA only, also under GPU_TESTS_DEVICE=cpu.
requires_cuda = pytest.mark.skipif(
    not ON_CUDA or not torch.cuda.is_available(), reason=NO_GPU_REASON if ON_CUDA else "CUDA only: GPU_TESTS_DEVICE=cpu"
)

BF16 = ["--mixed_precision", "bf16", "--device", DEVICE]
MNIST, DIT, LDM = "train_mnist.py", "train_dit.py", "train_ldm_sd.py"
DISCRETE, CONTINUOUS = "train_image_discrete.py", "train_image_continuous.py"
TRAINERS = [MNIST, DIT, LDM, DISCRETE, CONTINUOUS]

# The FAST flag lists of tests/test_train_*.py (tiny models, 2 sampler steps, a metrics row per step).
MNIST_FAST = [
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
DIT_FAST = [
    "--model",
    "DiT-S/2",
    "--depth",
    "2",
    "--hidden_size",
    "32",
    "--num_heads",
    "2",
    "--train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--num_inference_steps",
    "2",
    "--validation_guidance_scales",
    "1,3",
    "--seed",
    "0",
]
LDM_FAST = [
    "--lr_warmup_steps",
    "0",
    "--report_to",
    "none",
    "--resolution",
    "32",
    "--train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-3",
    "--num_inference_steps",
    "2",
    "--validation_guidance_scales",
    "1,3",
    "--num_validation_images",
    "1",
    "--validation_prompts",
    "a red square",
    "a blue circle",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
]
MMDIT_FAST = [
    "--dim-image",
    "32",
    "--depth",
    "1",
    "--num-heads",
    "2",
    "--num-inference-steps",
    "2",
    "--validation-guidance-scales",
    "1,2",
    "--logging-steps",
    "1",
    "--tokenizer-max-length",
    "8",
    "--num-validation-images",
    "3",
]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An ImageNet-style folder: 3 classes x 3 RGB 32x32 images, one subfolder per class."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            pixels[:, 10 * c : 10 * c + 10] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory, tiny_clip, tiny_vae):
    """A StableDiffusionPipeline folder (as in tests/test_train_ldm_sd.py): tiny CLIP, VAE and UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    tokenizer.model_max_length = 16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_vae),
        text_encoder=CLIPTextModel.from_pretrained(tiny_clip),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return path


@pytest.fixture
def train_args(request, tiny_mnist, tiny_clip, tiny_bert, tiny_imagefolder, class_folder, tmp_path):
    """train_args(script, output_dir): the data, tiny-model and bf16-on-CUDA flags of a 'train' run of `script`.

    Fixtures are looked up lazily so that a test of one script does not build the others' (tiny_sd, tiny_vae)."""

    def make(script, output_dir):
        if script == MNIST:
            data = ["--data_root", tiny_mnist, "--text_encoder_name_or_path", tiny_clip, *MNIST_FAST]
        elif script == DIT:  # latents of a tiny VAE, 3 classes: exports a DiTPipeline
            tiny_vae = request.getfixturevalue("tiny_vae")
            data = ["--train_data_dir", class_folder, "--vae_name_or_path", tiny_vae, "--resolution", "32", *DIT_FAST]
        elif script == LDM:
            tiny_sd = request.getfixturevalue("tiny_sd")
            data = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", tiny_imagefolder, *LDM_FAST]
        elif script == DISCRETE:
            data = [
                "--data_root",
                tiny_mnist,
                "--tokenizer",
                tiny_bert,
                "--dim_text",
                "32",
                "--train_batch_size",
                "8",
                *MMDIT_FAST,
            ]
        else:
            data = [
                "--data_root",
                tiny_mnist,
                "--text_encoder_name_or_path",
                tiny_bert,
                "--dim_text",
                "32",
                "--train_batch_size",
                "8",
                *MMDIT_FAST,
            ]
        return [*data, *BF16, "--output_dir", output_dir]

    return make


def sample_args(script, export, output_dir, tiny_mnist):
    """Flags of a generation-only run from the export folder of a finished run; the MMDiT runs read a prompts file
    and an images file written into output_dir's parent."""
    if script == MNIST:
        extra = ["--num_eval_samples", "10", "--num_inference_steps", "2", "--validation_guidance_scales", "1,2"]
    elif script == DIT:
        extra = ["--num_eval_samples", "6", "--num_inference_steps", "2", "--validation_guidance_scales", "1,3"]
    elif script in (DISCRETE, CONTINUOUS):
        prompts, images = Path(output_dir).parent / "prompts.txt", Path(output_dir).parent / "images.npz"
        prompts.write_text("a handwritten digit seven\na handwritten digit one\n")
        np.savez(images, images=np.zeros((5, 28, 28), dtype=np.uint8))
        extra = [
            "--data_root",
            tiny_mnist,
            "--prompts_file",
            prompts,
            "--images_file",
            images,
            "--num_joint_samples",
            "3",
            "--num_inference_steps",
            "2",
            "--validation_guidance_scales",
            "1",
        ]
    else:
        raise ValueError(f"{script} has no --sample_from")
    return ["--sample_from", export, "--output_dir", output_dir, *BF16, *extra]


def read_metrics(output_dir):
    """Rows of metrics.jsonl; a last line still being written is left out."""
    path = output_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def run_then_sigterm(script, args, output_dir, after_step, timeout=300):
    """Start a long run, send SIGTERM once metrics.jsonl reaches `after_step`; return (exit code, output).

    Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the trainer."""
    log = output_dir.parent / f"{output_dir.name}.log"
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **OFFLINE_ENV}, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                rows = read_metrics(output_dir)
                if rows and rows[-1]["step"] >= after_step:
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text()


def checkpoint_step(checkpoint):
    return json.loads((checkpoint / "training_state.json").read_text())["global_step"]


def assert_finite(weights, where):
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{where}: non-finite tensors {bad[:5]}"


# Where a checkpoint keeps the EMA model (diffusers save_pretrained layout).
EMA_FOLDER = {
    MNIST: "unet_ema",
    DIT: "transformer_ema",
    LDM: "unet_ema",
    DISCRETE: "mmdit_ema",
    CONTINUOUS: "mmdit_ema",
}


def ema_weights(checkpoint, script):
    """The EMA weights a checkpoint holds, by parameter name."""
    folder = checkpoint / EMA_FOLDER[script]
    if folder.is_dir():
        return load_file(folder / "diffusion_pytorch_model.safetensors")
    return load_file(checkpoint / "ema.safetensors")  # the layout before the EMA got its own model folder


def check_export_loads(script, out):
    """Load the export the way a user would (diffusers classes), on the GPU, and take a sampler step or two."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    if script == MNIST:
        from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(out / "unet").to(DEVICE).eval()
        DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
        p = json.loads((out / "export_config.json").read_text())["patch_size"]
        states = torch.randn(2, 8, unet.config.cross_attention_dim, device=DEVICE)
        x = torch.nn.functional.pixel_unshuffle(torch.randn(2, 1, 32, 32, device=DEVICE), p)
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            pred = unet(x, torch.tensor([10, 900], device=DEVICE), encoder_hidden_states=states).sample
        assert pred.shape == x.shape and torch.isfinite(pred).all()
    elif script == DIT:
        from diffusers import DiTPipeline

        labels = json.loads((out / "export_config.json").read_text())["label_names"]
        pipe = DiTPipeline.from_pretrained(out, id2label=dict(enumerate(labels))).to(DEVICE)
        images = pipe(
            class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, generator=generator, output_type="np"
        ).images
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    elif script == LDM:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None).to(DEVICE)
        image = pipe(
            "a red square",
            num_inference_steps=2,
            height=32,
            width=32,
            guidance_scale=3.0,
            generator=generator,
            output_type="np",
        ).images[0]
        assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    else:  # mmdit/ (a diffusers ModelMixin defined in the script) + export_config.json: --sample_from (below)
        config = json.loads((out / "mmdit" / "config.json").read_text())
        assert config["_class_name"]
        weights = load_file(out / "mmdit" / "diffusion_pytorch_model.safetensors", device=DEVICE)
        assert_finite(weights, "mmdit/diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Every trainer: bf16 on CUDA, pre-empted, resumed with its EMA, sampled from the export
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", TRAINERS)
def test_bf16_sigterm_resume_with_ema_then_sample(script, train_args, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    # Launched long on purpose: tiny models take milliseconds a step on a GPU, and a run to 40 could finish before
    # the signal lands. The MMDiT scripts also validate (sample) every 10 steps on the GPU while training.
    validation = ["--validation_steps", "10"] if script in (DISCRETE, CONTINUOUS) else ["--validation_steps", "1000"]
    long = [*train_args(script, out), "--max_train_steps", "400", "--checkpointing_steps", "1000", *validation]
    rc, output = run_then_sigterm(script, long, out, after_step=20)
    assert rc == 0, f"{script}: exit code {rc} after SIGTERM\n{output[-4000:]}"
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "manifest.json").is_file(), output[-3000:]
    step = checkpoint_step(checkpoints[0])
    assert 20 <= step < 400, output[-3000:]
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left behind
    assert_finite(load_file(checkpoints[0] / "model.safetensors"), f"{checkpoints[0].name}/model.safetensors")
    if script in (DISCRETE, CONTINUOUS):  # validation sampled on the GPU during training (a stop skips it)
        assert (out / "samples" / "step-10.png").is_file()

    # Resume 20 more steps. The EMA shadow tensors come back from safetensors on the CPU: its first update after
    # the resume fails on mixed devices unless they were moved to the GPU. --gradient_checkpointing changes
    # what is recomputed, not the weights, so the resumed half also covers it.
    final = step + 20
    resumed = [
        *train_args(script, out),
        "--max_train_steps",
        final,
        "--checkpointing_steps",
        "1000",
        *validation,
        "--resume_from_checkpoint",
        "latest",
        "--gradient_checkpointing",
    ]
    proc = run_script(script, *resumed, timeout=300)
    assert "resumed from" in proc.stdout and f"step {step}" in proc.stdout
    steps = [r["step"] for r in read_metrics(out)]
    assert steps[-20:] == list(range(step + 1, final + 1))
    last = out / f"checkpoint-{final}"
    assert checkpoint_step(last) == final
    ema = ema_weights(last, script)
    assert_finite(ema, f"{last.name} EMA")
    # The EMA moved after the resume (it was updated on the GPU, not left as loaded).
    before = ema_weights(checkpoints[0], script)
    assert any(not torch.equal(before[k], ema[k]) for k in ema), "EMA unchanged by the resumed steps"

    check_export_loads(script, out)
    if script != LDM:  # train_ldm_sd.py exports a StableDiffusionPipeline: diffusers samples it (above)
        again = tmp_path / "from-export"
        run_script(script, *sample_args(script, out, again, tiny_mnist), timeout=300)
        assert any((again / "samples").glob("*export*.png"))
        written = "prompt_samples.npz" if script in (DISCRETE, CONTINUOUS) else "eval_samples.npz"
        assert (again / written).is_file()


# ---------------------------------------------------------------------------------------------------------------
# fp16: an overflow that never ends
# ---------------------------------------------------------------------------------------------------------------
OVERFLOW = """
import sys
sys.path.insert(0, {repo!r})
import train_mnist

step = train_mnist.training_step


def overflowing(*args, **kwargs):  # every loss is infinite: every scaled gradient overflows
    per_sample, timesteps = step(*args, **kwargs)
    return per_sample * float("inf"), timesteps


train_mnist.training_step = overflowing
train_mnist.main(train_mnist.parse_args(sys.argv[1:]))
"""


@requires_cuda
def test_fp16_persistent_overflow_stops_with_exit_1(tiny_mnist, tiny_clip, tmp_path):
    """The GradScaler skips an overflowing step and halves its scale; a loss that is never finite must still end
    the run after --max_nonfinite_steps steps in a row, exit code 1, instead of training on without updates."""
    out = tmp_path / "run"
    args = [
        "--data_root",
        tiny_mnist,
        "--text_encoder_name_or_path",
        tiny_clip,
        *MNIST_FAST,
        "--mixed_precision",
        "fp16",
        "--device",
        "cuda",
        "--max_nonfinite_steps",
        "3",
        "--max_train_steps",
        "12",
        "--validation_steps",
        "1000",
        "--output_dir",
        out,
    ]
    cmd = [sys.executable, "-c", OVERFLOW.format(repo=str(REPO)), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit code {proc.returncode}, expected 1\n{output[-4000:]}"
    assert "non-finite" in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # stopped at the third overflow in a row, not at step 12
    assert not (out / "unet").exists()  # no export of a run that failed


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory options
# ---------------------------------------------------------------------------------------------------------------
@requires_cuda
def test_dit_torch_compile(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script(
        DIT,
        "--dataset_name",
        "mnist",
        "--vae_name_or_path",
        "none",
        "--resolution",
        "32",
        "--data_root",
        tiny_mnist,
        *DIT_FAST,
        "--model",
        "DiT-S/4",
        "--torch_compile",
        *BF16,
        "--max_train_steps",
        "6",
        "--validation_steps",
        "1000",
        "--validation_guidance_scales",
        "1",
        "--output_dir",
        out,
        timeout=400,
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in rows)
    # The compiled model saves under the plain model's names: the export loads without torch.compile.
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(out / "transformer")
    assert not any("_orig_mod" in name for name, _ in model.named_parameters())


@requires_cuda
@pytest.mark.parametrize("script", [DIT, LDM])
def test_fsdp2_one_gpu_checkpoint_resume_export(script, train_args, tmp_path):
    """accelerate's own FSDP2 (no test shim), one process on the GPU: it wraps the model, shards the EMA, saves whole
    weights in checkpoints, resumes, and exports a pipeline that loads."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2"]
    launch += ["--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", str(REPO / script)]
    args = [*train_args(script, out), "--checkpointing_steps", "2", "--validation_steps", "2"]
    env = {**os.environ, **OFFLINE_ENV}
    for steps, extra in (("2", []), ("4", ["--resume_from_checkpoint", "latest"])):
        cmd = [*launch, *map(str, args), "--max_train_steps", steps, *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((out / "run_config.json").read_text())["num_processes"] == 1
    assert "resumed from" in proc.stdout and list((out / "checkpoint-4").glob("pytorch_model_fsdp*.bin"))
    assert_finite(ema_weights(out / "checkpoint-4", script), f"{script} checkpoint-4 EMA")
    check_export_loads(script, out)


@requires_cuda
def test_xformers_attention(tiny_mnist, tiny_clip, tmp_path):
    try:
        import xformers  # noqa: F401
    except ImportError:
        pytest.skip("xformers is not installed (pip install the xformers built for this torch)")
    out = tmp_path / "run"
    run_script(
        MNIST,
        "--data_root",
        tiny_mnist,
        "--text_encoder_name_or_path",
        tiny_clip,
        *MNIST_FAST,
        *BF16,
        "--enable_xformers_memory_efficient_attention",
        "--max_train_steps",
        "3",
        "--output_dir",
        out,
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
