"""Train a text-conditioned pixel-space diffusion model on MNIST.

A small diffusers UNet2DConditionModel denoises 28x28 digits (padded to 32x32) while cross-attending to the
hidden states of a frozen text encoder reading "A handwritten digit 7". Objective: variance-preserving DDPM
(squared-cosine betas, 1000 steps), MSE on epsilon or v. The caption is replaced by the empty prompt with
probability --cond_dropout_prob, so the unconditional branch that classifier-free guidance uses is trained.

    python train_mnist.py --dataset_path ../shared/datasets --text_encoder_name_or_path openai/clip-vit-base-patch32
    accelerate launch train_mnist.py --mixed_precision bf16 --num_train_epochs 20
"""

import argparse
import atexit
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

IMAGE_SIZE = 28  # MNIST
PAD = 2  # 28 + 2 * 2 = 32: the UNet halves the resolution once per level, so the size must divide by 2**(levels-1)
NULL = 10  # index of the empty prompt in the table of encoded prompts (digits 0..9 come first)
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last in a checkpoint or export: size and hash of every file, the commit point
LOCK = "run.lock"  # one training run per output folder
NEGATABLE = {"use_ema"}  # BooleanOptionalAction flags: --use_ema / --no-use_ema


def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2, before any heavy work."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text):
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset_path",
        "--data_root",
        default="./dataset_cache",
        help="Folder holding MNIST/raw (torchvision layout); downloaded there when missing and online.",
    )
    g.add_argument("--caption_template", default="A handwritten digit {}", help="Caption of a digit; {} is the digit.")
    g.add_argument("--max_samples", type=int, default=None, help="Truncate the training set to N examples.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("models")
    g.add_argument(
        "--text_encoder_name_or_path",
        default=None,
        help="Frozen text encoder (hub id or local folder with its tokenizer): CLIP text, BERT family, T5 "
        "encoder. Default openai/clip-vit-base-patch32; with --sample_from, the export's encoder.",
    )
    g.add_argument("--tokenizer_max_length", type=int, default=8, help="Tokens per caption (padded/truncated).")
    g.add_argument("--block_out_channels", type=int_list, default=[32, 64, 64], help="UNet width per level.")
    g.add_argument(
        "--cross_attention_levels",
        type=int_list,
        default=[2],
        help="Levels (0 = full resolution) whose blocks cross-attend to the text; the mid block does too.",
    )
    g.add_argument("--layers_per_block", type=int, default=1)
    g.add_argument(
        "--patch_size",
        type=int,
        choices=[1, 2, 4],
        default=2,
        help="Feed the UNet p x p pixel patches as channels: p=2 costs a quarter of p=1.",
    )
    g.add_argument("--attention_head_dim", type=int, default=16)
    g.add_argument("--norm_num_groups", type=int, default=8)

    g = parser.add_argument_group("objective")
    g.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="v is well conditioned at every noise level; epsilon needs the sampler's x0 clipping most.",
    )
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_schedule", default="squaredcos_cap_v2", help="DDPMScheduler beta schedule.")
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=5.0,
        help="Min-SNR loss weighting (Hang et al. 2023): caps the weight of low-noise steps; 0 = plain MSE.",
    )
    g.add_argument(
        "--cond_dropout_prob",
        type=float,
        default=0.1,
        help="Probability of replacing the caption by the empty prompt (trains the guidance branch).",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="output_mnist")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", "--batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=10)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs when set.")
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument(
        "--lr_scheduler",
        default="cosine",
        help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=200)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="Stop after this many optimizer steps in a row with a non-finite gradient.",
    )
    g.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an EMA of the weights (with warmup) for samples and the export.",
    )
    g.add_argument("--ema_decay", type=float, default=0.999, help="Largest EMA decay, reached after the warmup.")
    g.add_argument("--ema_power", type=float, default=0.75, help="EMA warmup: decay = 1 - (1 + step) ** -power.")

    g = parser.add_argument_group("speed and memory")
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Autocast precision; fp16 needs a CUDA GPU. Default: accelerate's config or launcher flag.",
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")

    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=2.0,
        help="uncond + s * (cond - uncond); 1 = no guidance. Used for --num_eval_samples.",
    )
    g.add_argument(
        "--validation_guidance_scales", type=float_list, default=[1.0, 2.0, 4.0], help="Columns of the validation grid."
    )
    g.add_argument("--num_inference_steps", type=int, default=10, help="DPM-Solver++ steps.")
    g.add_argument(
        "--num_eval_samples",
        type=int,
        default=0,
        help="Write N samples (balanced over the digits) to <output_dir>/eval_samples.npz at the end.",
    )
    g.add_argument("--eval_batch_size", type=int, default=250)
    g.add_argument(
        "--sample_from",
        default=None,
        help="Generate from an export (a finished run's output_dir) or a checkpoint-N folder; no training.",
    )

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument("--validation_steps", type=int, default=1000)
    g.add_argument("--checkpointing_steps", type=int, default=1000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest": the newest intact checkpoint in --output_dir.',
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run's checkpoints: deletes them first.",
    )
    g.add_argument(
        "--report_to",
        choices=["none", "tensorboard", "wandb", "all"],
        default="none",
        help="Send metrics and validation grids to a tracker (its package must be installed); all: every "
        "installed one.",
    )
    g.add_argument("--tracker_project_name", default="train_mnist", help="Project (wandb) or run folder name.")

    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args([underscore_flag(a) for a in argv])


def underscore_flag(arg):
    """Every flag also accepts its hyphen spelling: --max-samples == --max_samples, --no-use-ema == --no-use_ema."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    negation = "no-" if name.startswith(("no-", "no_")) and name[3:].replace("-", "_") in NEGATABLE else ""
    return "--" + negation + name[len(negation) :].replace("-", "_") + eq + value


def check_args(args):
    """Cheap checks of the flags, before any dataset or model is loaded."""
    if args.max_samples is not None and args.max_samples < 1:
        fail(f"--max_samples {args.max_samples}: must be at least 1 (leave it out to use the whole dataset)")
    if "{}" not in args.caption_template:
        fail(f"--caption_template {args.caption_template!r}: must contain {{}} where the digit goes")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if not 0.0 <= args.cond_dropout_prob < 1.0:
        fail(f"--cond_dropout_prob {args.cond_dropout_prob}: must be in [0, 1)")
    levels, side = len(args.block_out_channels), (IMAGE_SIZE + 2 * PAD) // args.patch_size
    if side % 2 ** (levels - 1):
        fail(f"--block_out_channels: {levels} levels halve {side}x{side} UNet inputs too often; use fewer levels")
    if any(not 0 <= i < levels for i in args.cross_attention_levels):
        fail(f"--cross_attention_levels {args.cross_attention_levels}: levels are 0..{levels - 1}")
    if args.sample_from:
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(
                f"--sample_from {args.sample_from}: no {EXPORT_CONFIG} there; pass the output_dir of a finished run "
                f"or one of its checkpoint-N folders"
            )
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged or incomplete ({problem}); pass an intact export")
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            fail("--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers)")
    args.report_to = installed_trackers(args.report_to)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not (Path(args.resume_from_checkpoint) / "training_state.json").is_file():
            fail(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a checkpoint folder of this script")


def installed_trackers(report_to):
    """--report_to as accelerate's log_with: a tracker whose package is missing is an error, never silence."""
    import importlib.util

    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    if report_to == "none":
        return []
    if report_to == "all":
        found = [name for name, package in packages.items() if importlib.util.find_spec(package)]
        if not found:
            fail("--report_to all: no tracker is installed; pip install tensorboard (or wandb)")
        return found
    if not importlib.util.find_spec(packages[report_to]):
        fail(
            f"--report_to {report_to}: the {packages[report_to]} package is not installed; "
            f"pip install {packages[report_to]}"
        )
    return [report_to]


def check_accelerator(accelerator):
    """Checks of what accelerate resolved from the flags, its config file and the launcher, before heavy work."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        fail("--mixed_precision fp16 (from the flag or accelerate's config) needs a CUDA GPU: use bf16 or no here")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fail("DeepSpeed is not supported by this script: launch it with DDP (accelerate launch --multi_gpu)")
    if accelerator.distributed_type == DistributedType.FSDP:
        fail("FSDP is not supported by this script (its EMA needs whole weights): launch it with DDP (--multi_gpu)")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def build_dataset(args):
    """MNIST train set as one in-memory tensor dataset: images [N, 1, 32, 32] in [-1, 1], labels [N]."""
    root = Path(args.dataset_path)
    try:
        mnist = torchvision.datasets.MNIST(root, train=True, download=False)
    except RuntimeError:
        try:
            mnist = torchvision.datasets.MNIST(root, train=True, download=True)
        except Exception as e:  # offline, proxy, disk full: all end the same way
            fail(
                f"--dataset_path {root}: MNIST is not there and could not be downloaded ({type(e).__name__}); "
                f"point --dataset_path at a folder holding MNIST/raw/train-images-idx3-ubyte etc."
            )
    n = len(mnist) if args.max_samples is None else min(args.max_samples, len(mnist))
    images = mnist.data[:n].float().div(127.5).sub(1.0).unsqueeze(1)  # white digit on black, in [-1, 1]
    images = F.pad(images, (PAD, PAD, PAD, PAD), value=-1.0)
    return torch.utils.data.TensorDataset(images, mnist.targets[:n].long())


def captions(template):
    """The ten digit captions and, last, the empty prompt used for the unconditional branch."""
    return [template.format(d) for d in range(10)] + [""]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def load_text_encoder(name_or_path):
    """Tokenizer + frozen encoder through the Auto classes; a full CLIP checkpoint gives its text tower only."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        fail(
            f"--text_encoder_name_or_path {name_or_path}: cannot load it ({type(e).__name__}); pass a local folder "
            f"with config.json and the tokenizer files, or a hub id when online"
        )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model_cls = {"clip": CLIPTextModel, "t5": T5EncoderModel, "mt5": T5EncoderModel}.get(config.model_type, AutoModel)
    text_encoder = model_cls.from_pretrained(name_or_path)
    return tokenizer, text_encoder.requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, max_length, device):
    """Last hidden states [n, L, D] and attention masks [n, L]; run once, the table is indexed every step."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    text_encoder.to(device)
    states = text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
    return states.float(), tokens.attention_mask.to(device)


def build_unet(args, cross_attention_dim):
    levels = range(len(args.block_out_channels))
    down = [("CrossAttnDownBlock2D" if i in args.cross_attention_levels else "DownBlock2D") for i in levels]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DConditionModel(
        sample_size=(IMAGE_SIZE + 2 * PAD) // args.patch_size,
        in_channels=args.patch_size**2,
        out_channels=args.patch_size**2,
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=args.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=args.attention_head_dim,
    )


def denoise(unet, x, t, states, mask, patch_size):
    """The UNet on p x p pixel patches stacked as channels (space-to-depth, as in DiT's patchify and Simple
    Diffusion): p=2 gives the same network a quarter of the positions, so a quarter of the compute."""
    pred = unet(F.pixel_unshuffle(x, patch_size), t, encoder_hidden_states=states, encoder_attention_mask=mask)
    return F.pixel_shuffle(pred.sample, patch_size)


def build_noise_scheduler(args):
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        clip_sample=False,
    )


def build_sampler(noise_scheduler_config):
    """Second-order DPM-Solver++ on the training schedule: good digits in ~10 steps. Its data prediction is
    clipped to the pixel range [-1, 1] (thresholding with sample_max_value=1): near t=T the squared-cosine
    schedule has alpha ~ 1e-3, so x0 = (x_t - sigma * eps) / alpha multiplies epsilon errors by ~1000."""
    return DPMSolverMultistepScheduler.from_config(
        noise_scheduler_config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=True,
        sample_max_value=1.0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Objective and sampler
# ----------------------------------------------------------------------------------------------------------------
def training_step(unet, noise_scheduler, images, labels, text_states, text_mask, args, generator):
    """Noise a batch at random timesteps, drop captions for guidance, return per-sample losses and timesteps."""
    n = images.shape[0]
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator, device=images.device
    )
    # Classifier-free guidance: the unconditional branch is the same network reading the empty prompt.
    drop = torch.rand(n, generator=generator, device=images.device) < args.cond_dropout_prob
    prompt_index = torch.where(drop, torch.full_like(labels, NULL), labels)
    # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: variance preserving.
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(images, noise, timesteps)
    pred = denoise(unet, noisy, timesteps, text_states[prompt_index], text_mask[prompt_index], args.patch_size)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma:  # min(SNR, gamma) in x0 units, divided by what the target's loss already weighs: SNR or SNR+1
        snr = compute_snr(noise_scheduler, timesteps)
        base = snr if args.prediction_type == "epsilon" else snr + 1
        per_sample = per_sample * snr.clamp(max=args.snr_gamma) / base
    return per_sample, timesteps


@torch.no_grad()
def sample(
    unet, sampler, cond_states, cond_mask, null_states, null_mask, guidance_scale, num_inference_steps, generator
):
    """Generate len(cond_states) images [n, 1, 32, 32] in [-1, 1] with classifier-free guidance."""
    n = cond_states.shape[0]
    patch_size = math.isqrt(unet.config.in_channels)  # the UNet reads p x p patches as p * p channels
    device = cond_states.device
    dtype = next(unet.parameters()).dtype
    x = torch.randn((n, 1, IMAGE_SIZE + 2 * PAD, IMAGE_SIZE + 2 * PAD), generator=generator, device=device)
    x = x * sampler.init_noise_sigma
    guided = guidance_scale != 1.0
    if guided:  # one batched call: [unconditional; conditional]
        states = torch.cat([null_states.expand_as(cond_states), cond_states]).to(dtype)
        mask = torch.cat([null_mask.expand_as(cond_mask), cond_mask])
    else:
        states, mask = cond_states.to(dtype), cond_mask
    sampler.set_timesteps(num_inference_steps, device=device)
    for t in sampler.timesteps:
        x_in = sampler.scale_model_input(torch.cat([x, x]) if guided else x, t).to(dtype)
        pred = denoise(unet, x_in, t, states, mask, patch_size).float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = sampler.step(pred, t, x).prev_sample
    return x.clamp(-1, 1)


def to_uint8(images):
    """[n, 1, 32, 32] in [-1, 1] -> uint8 [n, 28, 28], white digit on black like MNIST."""
    images = images[:, 0, PAD : PAD + IMAGE_SIZE, PAD : PAD + IMAGE_SIZE]
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Validation, plots and evaluation samples
# ----------------------------------------------------------------------------------------------------------------
def log_validation(unet, sampler, prompts, args, path, trackers=(), step=0, per_digit=4):
    """Grid: one row per digit prompt, one panel per guidance scale, labelled; written to `path` and sent to the
    trackers (TensorBoard: an image; wandb: an image captioned with its prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states, mask = prompts
    labels = torch.arange(10, device=states.device).repeat_interleave(per_digit)
    scales = args.validation_guidance_scales
    fig, axes = plt.subplots(1, len(scales), figsize=(1.6 * per_digit * len(scales), 12), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        generator = torch.Generator(states.device).manual_seed(args.seed)  # same noise in every panel and step
        images = to_uint8(
            sample(
                unet,
                sampler,
                states[labels],
                mask[labels],
                states[NULL:],
                mask[NULL:],
                scale,
                args.num_inference_steps,
                generator,
            )
        )
        grid = images.view(10, per_digit, IMAGE_SIZE, IMAGE_SIZE).permute(0, 2, 1, 3).reshape(10 * IMAGE_SIZE, -1)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"guidance {scale:g}")
        ax.set_xticks([])
        ax.set_yticks([IMAGE_SIZE * (d + 0.5) for d in range(10)])
        ax.set_yticklabels([args.caption_template.format(d) for d in range(10)] if ax is axes[0][0] else [])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    if trackers:
        caption = f"rows: {args.caption_template.format('0')} ... 9; guidance {', '.join(f'{s:g}' for s in scales)}"
        log_image(trackers, path, step, caption)


def log_image(trackers, path, step, caption):
    """A PNG written to disk, sent to every tracker that shows images."""
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", image, step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=caption)]}, step=step)


def plot_loss(metrics_path, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():  # validation before the first logging step
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    for k in sorted(k for k in rows[-1] if k.startswith("loss_t")):  # loss per timestep bin, as minRF logs it
        ax.plot([r["step"] for r in rows], [r.get(k, float("nan")) for r in rows], lw=0.8, label=k)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def write_eval_samples(unet, sampler, prompts, args, path):
    """N samples balanced over the digits at --guidance_scale: images uint8 [N, 28, 28], labels [N]."""
    states, mask = prompts
    labels = torch.arange(args.num_eval_samples, device=states.device) % 10
    generator = torch.Generator(states.device).manual_seed(args.seed + 1)
    start, chunks = time.perf_counter(), []
    for batch in labels.split(args.eval_batch_size):
        chunks.append(
            to_uint8(
                sample(
                    unet,
                    sampler,
                    states[batch],
                    mask[batch],
                    states[NULL:],
                    mask[NULL:],
                    args.guidance_scale,
                    args.num_inference_steps,
                    generator,
                )
            )
        )
    seconds = time.perf_counter() - start
    np.savez_compressed(
        path,
        images=torch.cat(chunks).numpy(),
        labels=labels.cpu().numpy(),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        sample_seconds=seconds,
    )
    return seconds


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ----------------------------------------------------------------------------------------------------------------
def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder, names):
    """Size and sha256 of the files `names` (relative to `folder`, or the folders they name), written last."""
    files = {}
    for name in names:
        root = folder / name
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                files[str(path.relative_to(folder))] = [path.stat().st_size, file_digest(path)]
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def manifest_problem(folder):
    """What is wrong with a checkpoint or export folder, in a few words, or None when its manifest holds."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the folder is incomplete)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
        if file_digest(path) != digest:
            return f"{name} does not match its hash"
    return None


def save_ema(ema, model, folder):
    """The EMA weights in diffusers' save_pretrained layout (config.json + diffusion_pytorch_model.safetensors):
    `from_pretrained(checkpoint, subfolder=...)` loads them. Buffers come from the model; the EMA's own state
    (decay, step) is in training_state.json."""
    folder.mkdir(parents=True)
    model.save_config(folder)
    state = model.state_dict()
    state.update((name, shadow) for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params, strict=True))
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        folder / "diffusion_pytorch_model.safetensors",
        metadata={"format": "pt"},
    )


def save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, write_sampling_files):
    """accelerate's save_state, the EMA model (unet_ema/, or unet/ without EMA) with what --sample_from needs, the
    objective's RNG and the data position, in a temp folder; a manifest written last, then an atomic rename.
    `position` is (epoch, batches of --train_batch_size consumed in it by all processes)."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    if not all(torch.isfinite(p).all() for p in unet.parameters()):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        # Model (safetensors), optimizer, data sampler and the global RNGs of every process.
        accelerator.save_state(str(tmp))
        save_file({"state": train_rng.get_state()}, tmp / f"train_rng_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(unet)
            state = {
                "script": "train_mnist.py",
                "global_step": global_step,
                "num_processes": accelerator.num_processes,
                "epoch": position[0],
                "epoch_batches": position[1],
                "ema": None,
            }
            if ema is not None:
                save_ema(ema, model, tmp / "unet_ema")
                state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            else:
                model.save_pretrained(tmp / "unet")
            write_sampling_files(tmp)
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a crash never leaves a half-written checkpoint-<step>
    except OSError as e:  # a full disk, a lost mount: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        print(
            f"error: step {global_step}: checkpoint not written ({reason}); the previous checkpoints are intact, "
            f"resume from them with --resume_from_checkpoint latest",
            file=sys.stderr,
        )
        sys.exit(1)
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir):
    """Complete checkpoints (those with a manifest), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(accelerator, args):
    """The folder --resume_from_checkpoint names, checked against its manifest, or None for a new run. "latest"
    falls back past damaged checkpoints to the newest intact one; a damaged explicit path is an error."""
    if not args.resume_from_checkpoint:
        return None
    choice = [None]
    if accelerator.is_main_process:  # one process reads the files; the others take its answer
        if args.resume_from_checkpoint != "latest":
            path = Path(args.resume_from_checkpoint)
            if problem := manifest_problem(path):
                fail(f"--resume_from_checkpoint {path}: damaged ({problem}); pass an intact checkpoint or latest")
            choice = [str(path)]
        found = list_checkpoints(args.output_dir) if choice[0] is None else []
        for path in reversed(found):
            if not (problem := manifest_problem(path)):
                choice = [str(path)]
                break
            accelerator.print(f"warning: {path} is damaged ({problem}); trying the checkpoint before it")
        if found and choice[0] is None:
            fail(
                f"--resume_from_checkpoint latest: every checkpoint in {args.output_dir} is damaged; start anew "
                f"with --overwrite_output_dir"
            )
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def load_checkpoint(accelerator, path, unet, ema, train_rng, args):
    """Restore everything save_checkpoint wrote; returns training_state.json. Nothing loaded can run code.

    A checkpoint of N processes resumes on M != N at the same step, learning rate and number of samples seen
    (weights, optimizer and EMA are the same on every process); the random streams of the objective are derived
    anew for the M processes, so the run is not bitwise the one it would have been on N."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != "train_mnist.py":
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not train_mnist.py")
    if ema is not None and state["ema"] is None:
        fail(f"--resume_from_checkpoint {path}: saved without EMA; resume with --no-use_ema")
    accelerator.load_state(str(path))  # safetensors + torch.load(weights_only=True)
    rank, saved = accelerator.process_index, state.get("num_processes", 1)
    if saved == accelerator.num_processes:
        train_rng.set_state(load_file(path / f"train_rng_{rank}.safetensors")["state"])
    else:
        accelerator.print(
            f"warning: {path} was written by {saved} processes, resumed on {accelerator.num_processes}: "
            f"same step, learning rate and data position, new random streams (not bitwise)"
        )
        train_rng.manual_seed(args.seed * 1000 + rank + 7919 * state["global_step"])
    if ema is not None:
        # Straight onto the device the EMA lives on: load_state_dict keeps the tensors it is given.
        weights = load_file(
            path / "unet_ema" / "diffusion_pytorch_model.safetensors", device=str(ema.shadow_params[0].device)
        )
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(unet).named_parameters()]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def write_sampling_files(sampler, args, text_encoder_name, folder):
    """The sampler and export_config.json: with the UNet beside them, what --sample_from needs."""
    sampler.save_pretrained(folder / "scheduler")
    config = {
        "text_encoder_name_or_path": text_encoder_name,
        "tokenizer_max_length": args.tokenizer_max_length,
        "caption_template": args.caption_template,
        "image_size": IMAGE_SIZE,
        "padding": PAD,
        "patch_size": args.patch_size,
        "pad_value": -1.0,
        "guidance_scale": args.guidance_scale,
    }
    (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def model_card(args, text_encoder_name, global_step, metrics_path):
    """README.md of the export: the Hub's YAML front matter, then how it was trained and how to sample it."""
    from huggingface_hub import ModelCardData

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        datasets=["ylecun/mnist"],
        tags=["diffusers", "text-to-image", "unet", "pixel-diffusion", "mnist"],
    )
    command = " ".join(["python train_mnist.py", *sys.argv[1:]])
    return f"""---
{data.to_yaml()}
---

# Text-conditioned MNIST diffusion (train_mnist.py)

A `UNet2DConditionModel` trained from scratch on MNIST, {global_step} optimizer steps, final loss
{rows[-1]["loss"]:.4f}. Its condition: the last hidden states of the frozen text encoder `{text_encoder_name}`
reading captions such as "{args.caption_template.format(7)}"; the unconditional branch reads the empty prompt.
The UNet reads {args.patch_size}x{args.patch_size} pixel patches stacked as channels (`export_config.json`).

Training command:

```bash
{command}
```

Sample it (the EMA weights) with the script:

```bash
python train_mnist.py --sample_from THIS_FOLDER --output_dir samples
```

![samples at guidance {", ".join(f"{s:g}" for s in args.validation_guidance_scales)}](samples.png)
"""


def export_model(unet, write_sampling_files, output_dir, card, grid):
    """The EMA UNet in diffusers layout (unet/), the sampler (scheduler/), export_config.json, and a model card
    (README.md, samples.png). Each part is written under a temporary name and renamed; manifest.json, written
    last, says the export is complete."""
    (output_dir / MANIFEST).unlink(missing_ok=True)  # until the new manifest: visibly incomplete
    tmp = output_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    write_sampling_files(tmp)
    (tmp / "README.md").write_text(card)
    shutil.copyfile(grid, tmp / "samples.png")
    parts = sorted(p.name for p in tmp.iterdir())
    for name in parts:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()
    write_manifest(output_dir, parts)


class RunLock:
    """One training run per output folder: run.lock holds the PID, the host and a heartbeat time refreshed every
    minute. A lock whose process is gone (same host) or whose heartbeat is older than `stale_after` seconds
    (another host: a pre-empted job requeued elsewhere) is taken over with a warning."""

    def __init__(self, output_dir, stale_after=300):
        self.path, self.stale_after = Path(output_dir) / LOCK, stale_after
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.done = threading.Event()

    def acquire(self):
        try:
            other = json.loads(self.path.read_text())
        except FileNotFoundError:
            other = None
        except ValueError:  # a lock being written or cut short: nobody can prove it is alive
            other = {"pid": None, "host": None, "heartbeat": 0}
        if other is not None and other.get("pid") != self.me["pid"]:
            if self.alive(other):
                fail(
                    f"--output_dir {self.path.parent}: another run (PID {other['pid']} on {other['host']}) trains "
                    f"there; wait for it, stop it, or pick another --output_dir"
                )
            print(f"warning: taking over the stale lock of PID {other.get('pid')} on {other.get('host')}")
        self.write()
        threading.Thread(target=self.beat, daemon=True).start()

    def alive(self, other):
        if other.get("host") == self.me["host"] and other.get("pid"):
            try:
                os.kill(other["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return time.time() - other.get("heartbeat", 0) < self.stale_after

    def write(self):
        tmp = self.path.with_name(f".{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def beat(self):
        while not self.done.wait(60):
            self.write()

    def release(self):
        self.done.set()
        self.path.unlink(missing_ok=True)


def claim_output_dir(args):
    """Main process, before any heavy work: take the lock, and refuse to mix a new run with another run's
    checkpoints (--resume_from_checkpoint latest would later pick the old run's higher step)."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir}: is a file; pass a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--output_dir {output_dir}: cannot create it ({e.strerror}); pass a writable folder")
    if not os.access(output_dir, os.W_OK):
        fail(f"--output_dir {output_dir}: not writable; pass a writable folder")
    lock = RunLock(output_dir)
    lock.acquire()
    atexit.register(lock.release)
    old = sorted(output_dir.glob("checkpoint-*")) + sorted(output_dir.glob(".checkpoint-*.tmp"))
    if old and not args.resume_from_checkpoint:
        if not args.overwrite_output_dir:
            lock.release()
            fail(
                f"--output_dir {output_dir}: holds another run's checkpoints ({old[-1].name}); continue it with "
                f"--resume_from_checkpoint latest, or pass --overwrite_output_dir to delete them"
            )
        for path in old:
            shutil.rmtree(path)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    return lock


def write_run_config(args, accelerator):
    import accelerate
    import diffusers
    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    config = {
        "args": vars(args),
        "git_commit": commit,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # what accelerate resolved: flag, config or launcher
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, diffusers, transformers, accelerate)},
    }
    (Path(args.output_dir) / "run_config.json").write_text(json.dumps(config, indent=2))


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint at a step boundary, then a clean exit (pre-emptible clusters).

    Every process must stop at the same step (the save is collective), wherever the signal landed. The flags are
    agreed over a CPU (gloo) group without blocking: each step reads the previous step's all-reduce and starts the
    next one, so all processes stop within one step of the signal and the GPU never waits for the host."""

    def __init__(self, accelerator):
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        self.group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self.flag, self.pending = torch.zeros(1), None

    def __call__(self):
        """True on every process, at the same step, once any process got a signal."""
        if self.group is None:
            return self.event.is_set()
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            agreed = bool(self.flag.item())  # a CPU tensor: no device sync
        if not agreed:
            self.flag.fill_(float(self.event.is_set()))
            self.pending = torch.distributed.all_reduce(
                self.flag, torch.distributed.ReduceOp.MAX, self.group, async_op=True
            )
        return agreed

    def close(self):
        if self.pending is not None:
            self.pending.wait()


# ----------------------------------------------------------------------------------------------------------------
# Sampling from an export, without training
# ----------------------------------------------------------------------------------------------------------------
def generate_from_export(args, accelerator):
    export = Path(args.sample_from)
    config = json.loads((export / EXPORT_CONFIG).read_text())
    tokenizer, text_encoder = load_text_encoder(args.text_encoder_name_or_path or config["text_encoder_name_or_path"])
    prompts = encode_prompts(
        tokenizer,
        text_encoder,
        captions(config["caption_template"]),
        config["tokenizer_max_length"],
        accelerator.device,
    )
    subfolder = "unet" if (export / "unet").is_dir() else "unet_ema"  # an export, or a checkpoint with EMA
    unet = UNet2DConditionModel.from_pretrained(export, subfolder=subfolder).to(accelerator.device).eval()
    sampler = DPMSolverMultistepScheduler.from_pretrained(export / "scheduler")
    args.caption_template = config["caption_template"]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        log_validation(unet, sampler, prompts, args, output_dir / "samples" / "export.png")
        if args.num_eval_samples:
            seconds = write_eval_samples(unet, sampler, prompts, args, output_dir / "eval_samples.npz")
            print(f"wrote {args.num_eval_samples} samples to {output_dir / 'eval_samples.npz'} in {seconds:.1f}s")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args):
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # "auto" is CPU without CUDA; then several processes (torchrun, accelerate launch) talk over gloo.
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, "logs")),
        # The shuffling order of epoch e depends only on (seed, e): the data position can be restored mid-epoch.
        # non_blocking: a batch from pinned memory reaches the GPU without the host waiting for the GPU's queue.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    check_accelerator(accelerator)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.sample_from:
        return generate_from_export(args, accelerator)
    if accelerator.is_main_process:
        claim_output_dir(args)
    stop = StopRequest(accelerator)  # from here on, a signal means: checkpoint at the next step, exit 0
    set_seed(args.seed)  # same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)
    if accelerator.is_main_process:
        write_run_config(args, accelerator)

    # ---- Data -------------------------------------------------------------------------------------------------
    dataset = build_dataset(args)
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    # ---- Frozen text encoder: the 10 captions and the empty prompt, encoded once ------------------------------
    text_encoder_name = args.text_encoder_name_or_path or "openai/clip-vit-base-patch32"
    tokenizer, text_encoder = load_text_encoder(text_encoder_name)
    prompts = encode_prompts(
        tokenizer, text_encoder, captions(args.caption_template), args.tokenizer_max_length, accelerator.device
    )
    text_states, text_mask = prompts
    del text_encoder  # never needed again

    # ---- Model, noise schedule, EMA ---------------------------------------------------------------------------
    unet = build_unet(args, cross_attention_dim=text_states.shape[-1])
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    noise_scheduler = build_noise_scheduler(args)
    sampler = build_sampler(noise_scheduler.config)
    sampling_files = functools.partial(write_sampling_files, sampler, args, text_encoder_name)
    ema = None
    if args.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=args.ema_decay,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=args.ema_power,
            foreach=True,
            model_cls=UNet2DConditionModel,
            model_config=unet.config,
        )
        ema.to(accelerator.device)
    accelerator.print(
        f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters; "
        f"text states {tuple(text_states.shape[1:])} from {text_encoder_name}"
    )

    # ---- Optimizer and LR schedule ----------------------------------------------------------------------------
    # Fused AdamW: one kernel for all tensors, and it can skip a non-finite step on the device (found_inf below).
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True,
    )
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # Every random draw of the objective comes from this generator, saved in each checkpoint. The global RNG
    # cannot be trusted for exact resume: each DataLoader iterator draws its base seed from it.
    train_rng = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    # ---- Resume -----------------------------------------------------------------------------------------------
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, unet, ema, train_rng, args)
        global_step, first_epoch = state["global_step"], state["epoch"]
        # The data position in batches of this run's processes (the count may differ from the saved run's).
        batches_to_skip = state["epoch_batches"] // accelerator.num_processes
        if batches_to_skip >= len(train_dataloader):
            first_epoch, batches_to_skip = first_epoch + 1, 0
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    # Not prepared: accelerate would step it once per process and save it pickled. It counts optimizer steps
    # whatever the number of processes; a resumed run rebuilds it at its step (last_epoch), nothing to load.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        last_epoch=global_step - 1,
    )
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})

    # ---- Training loop: the host reads device values only every --logging_steps -------------------------------
    metrics_path = output_dir / "metrics.jsonl"
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_main_process, desc="train")
    num_bins = 4  # loss per quarter of the timestep range: where the model still has to learn
    bin_loss = torch.zeros(num_bins, device=accelerator.device)
    bin_count = torch.zeros(num_bins, device=accelerator.device)
    # Optimizer steps with a non-finite gradient: in total, in the current run, and the longest run since the
    # last logging step (the only place the host reads them).
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=accelerator.device).unbind()
    window_start, window_samples = time.perf_counter(), 0
    position = (first_epoch, batches_to_skip * accelerator.num_processes)
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        unet.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        epoch_batches = batches_to_skip if epoch == first_epoch else 0  # per process, for the data position
        for images, labels in batches:
            epoch_batches += 1
            with accelerator.accumulate(unet):
                per_sample, timesteps = training_step(
                    unet, noise_scheduler, images, labels, text_states, text_mask, args, train_rng
                )
                accelerator.backward(per_sample.mean())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm or float("inf"))
                    # The norm is the same on every process (all-reduced gradients). A non-finite one skips the
                    # update on the device: the fused AdamW kernel leaves weights and moments as they were where
                    # found_inf is 1. With fp16 the GradScaler sets found_inf itself; it skips exactly the steps
                    # whose unscaled norm is non-finite, so they are counted here too.
                    nonfinite = (~torch.isfinite(grad_norm)).float()
                    if accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bins = (timesteps * num_bins // noise_scheduler.config.num_train_timesteps).clamp(max=num_bins - 1)
            bin_loss.index_add_(0, bins, per_sample.detach().float())
            bin_count.index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float))
            window_samples += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            # -- one optimizer step done
            global_step += 1
            progress.update(1)
            lr_scheduler.step()
            nonfinite_steps += nonfinite
            nonfinite_run.mul_(nonfinite).add_(nonfinite)
            torch.maximum(longest_run, nonfinite_run, out=longest_run)
            if ema is not None:  # after a skipped step the weights did not move: averaging them again is harmless
                ema.step(unet.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                bin_totals = accelerator.reduce(torch.stack([bin_loss, bin_count]), "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": (bin_totals[0].sum() / bin_totals[1].sum().clamp(min=1)).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                    "nonfinite_steps": int(total_nonfinite),
                }
                row.update(
                    {
                        f"loss_t{i}": (bin_totals[0, i] / bin_totals[1, i]).item()
                        for i in range(num_bins)
                        if bin_totals[1, i] > 0
                    }
                )
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    progress.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.0f}")
                accelerator.log(row, step=global_step)
                bin_loss.zero_()
                bin_count.zero_()
                longest_run.copy_(nonfinite_run)
                window_start, window_samples = time.perf_counter(), 0
                if longest >= args.max_nonfinite_steps:  # the same on every process
                    accelerator.print(
                        f"error: {int(longest)} steps in a row with a non-finite gradient before step "
                        f"{global_step}; lower --learning_rate. The last checkpoint is intact."
                    )
                    sys.exit(1)

            stop_now = stop()
            position = (epoch, epoch_batches * accelerator.num_processes)
            if (global_step % args.checkpointing_steps == 0 or stop_now) and global_step < max_train_steps:
                path = save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
                accelerator.print(f"\nsaved {path}")
            if stop_now:
                accelerator.print(
                    f"stop requested: exiting at step {global_step}; resume with --resume_from_checkpoint latest"
                )
                accelerator.end_training()
                return
            if (
                global_step % args.validation_steps == 0
                and global_step < max_train_steps
                and accelerator.is_main_process
            ):
                validation_unet = accelerator.unwrap_model(unet)
                if ema is not None:
                    ema.store(unet.parameters())
                    ema.copy_to(unet.parameters())
                log_validation(
                    validation_unet.eval(),
                    sampler,
                    prompts,
                    args,
                    output_dir / "samples" / f"step-{global_step}.png",
                    accelerator.trackers,
                    global_step,
                )
                plot_loss(metrics_path, output_dir / "loss.png")
                if ema is not None:
                    ema.restore(unet.parameters())
                unet.train()
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    stop.close()
    progress.close()
    train_seconds = time.perf_counter() - train_start

    # ---- Final checkpoint, samples and export (EMA weights) ---------------------------------------------------
    save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet).eval()
        if ema is not None:
            ema.copy_to(final_unet.parameters())
        grid = output_dir / "samples" / f"step-{global_step}.png"
        log_validation(final_unet, sampler, prompts, args, grid, accelerator.trackers, global_step)
        plot_loss(metrics_path, output_dir / "loss.png")
        card = model_card(args, text_encoder_name, global_step, metrics_path)
        export_model(final_unet, sampling_files, output_dir, card, grid)
        summary = {"global_step": global_step, "train_seconds": train_seconds}
        if args.num_eval_samples:
            summary["sample_seconds"] = write_eval_samples(
                final_unet, sampler, prompts, args, output_dir / "eval_samples.npz"
            )
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"done: step {global_step}, {train_seconds / 60:.1f} min of training; export in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
