"""Train a text-conditioned pixel diffusion model on MNIST.

A small UNet2DConditionModel denoises digits while cross-attending to a frozen text encoder reading
"A handwritten digit 7". Objective: DDPM (squared-cosine betas), v or epsilon prediction with min-SNR
weighting; captions are dropped at random so that classifier-free guidance has an unconditional branch.

    python train_mnist.py --data_root ./data --output_dir output_mnist
    python train_mnist.py --sample_from output_mnist --num_eval_samples 1000 --output_dir samples
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import XFormersAttnProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

IMAGE_SIZE = 28
PAD = 2  # 32x32 inputs: each UNet level halves the resolution
NULL = 10  # row of the empty prompt in the prompt table, after the digits 0..9
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # size and hash of every file, written last: a folder without it is incomplete
LOCK = "run.lock"


# ---- Args ----
# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Copied from train_mnist.int_list
def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


# Copied from train_mnist.float_list
def float_list(text):
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    # Data
    add("--data_root", "--dataset_path", default="./data", help="Folder of MNIST/raw; downloaded when missing.")
    add("--caption_template", default="A handwritten digit {}", help="{} is the digit.")
    add("--max_samples", type=int, help="Train on the first N digits.")
    add("--dataloader_num_workers", type=int, default=0)
    # Models
    add("--text_encoder_name_or_path", help="CLIP text, BERT-like or T5 encoder. Default: CLIP ViT-B/32.")
    add("--tokenizer_max_length", type=int, default=8)
    add("--block_out_channels", type=int_list, default=[32, 64, 64], help="UNet width per level.")
    add("--cross_attention_levels", type=int_list, default=[2], help="Levels (0: full size) that attend to the text.")
    add("--layers_per_block", type=int, default=1)
    add("--patch_size", type=int, choices=[1, 2, 4], default=2, help="The UNet reads p x p patches as channels.")
    add("--attention_head_dim", type=int, default=16)
    add("--norm_num_groups", type=int, default=8)
    # Objective
    add("--prediction_type", choices=["epsilon", "v_prediction"], default="v_prediction")
    add("--snr_gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0: plain MSE.")
    add("--cond_dropout_prob", type=float, default=0.1, help="Probability of an empty caption.")
    # Optimisation (defaults: the recipe in docs/mnist.md)
    add("--output_dir", default="output_mnist")
    add("--seed", type=int, default=0)
    add("--train_batch_size", "--batch_size", type=int, default=64, help="Per process.")
    add("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=10)
    add("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    add("--learning_rate", type=float, default=2e-3)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.99)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--lr_scheduler", default="cosine", help="A diffusers get_scheduler name.")
    add("--lr_warmup_steps", type=int, default=200)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_grad_norm", type=float, default=1.0, help="0: no clipping.")
    add("--max_nonfinite_steps", type=int, default=10, help="Stop after N non-finite gradients in a row.")
    add("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Sample and export EMA weights.")
    add("--ema_decay", type=float, default=0.999)
    add("--ema_power", type=float, default=0.75, help="EMA warmup: decay = 1 - (1 + step) ** -power.")
    # Speed and memory
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's config.")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--allow_tf32", action="store_true")
    add("--gradient_checkpointing", action="store_true")
    add("--enable_xformers_memory_efficient_attention", action="store_true")
    # Sampling
    add("--guidance_scale", type=float, default=2.0, help="Of --num_eval_samples.")
    add("--validation_guidance_scales", type=float_list, default=[1.0, 2.0, 4.0], help="A grid panel each.")
    add("--num_inference_steps", type=int, default=10)
    add("--num_eval_samples", type=int, default=0, help="Write N digits to eval_samples.npz at the end.")
    add("--eval_batch_size", type=int, default=250)
    add("--sample_from", help="An export or checkpoint folder: sample it instead of training.")
    # Logging and checkpoints
    add("--logging_steps", type=int, default=50)
    add("--validation_steps", type=int, default=1000)
    add("--checkpointing_steps", type=int, default=1000)
    add("--checkpoints_total_limit", type=int, help="Keep the newest N checkpoints.")
    add("--resume_from_checkpoint", help="A checkpoint folder, or latest.")
    add("--overwrite_output_dir", action="store_true", help="Delete another run's checkpoints there.")
    add("--report_to", choices=["none", "tensorboard", "wandb", "all"], default="none")
    add("--tracker_project_name", default="train_mnist")
    argv = sys.argv[1:] if argv is None else argv
    for action in parser._actions:  # argparse shows the default of a flag with a help text only
        action.help = action.help or "(default: %(default)s)"
    return parser.parse_args([underscore_flag(a) for a in argv])


# Copied from train_mnist.underscore_flag
def underscore_flag(arg):
    """--max-samples -> --max_samples; --no-use-ema -> --no-use_ema."""
    name, eq, value = arg.partition("=")
    if not name.startswith("--"):
        return arg
    prefix = "--no-" if name.startswith("--no-") else "--"
    return prefix + name[len(prefix) :].replace("-", "_") + eq + value


def check_shared_flags(args):
    """The flags every trainer has: number ranges, the output folder, the script of a checkpoint to resume."""
    rules = [  # a flag this script lacks is skipped
        (
            lambda v: v >= 1,
            "an integer >= 1",
            "train_batch_size eval_batch_size num_train_epochs max_train_steps gradient_accumulation_steps max_samples "
            "logging_steps checkpointing_steps validation_steps checkpoints_total_limit num_inference_steps",
        ),
        (lambda v: v >= 0, "an integer >= 0", "lr_warmup_steps dataloader_num_workers"),
        (
            lambda v: v >= 0,
            "a number >= 0",
            "max_grad_norm adam_weight_decay snr_gamma guidance_scale validation_guidance_scales",
        ),
        (lambda v: v > 0, "a number > 0", "learning_rate ema_power"),
        (lambda v: 0 <= v < 1, "in [0, 1)", "adam_beta1 adam_beta2 cond_dropout_prob"),
        (lambda v: 0 < v < 1, "in (0, 1)", "ema_decay"),
    ]
    for valid, wanted, names in rules:
        for name in names.split():
            value = getattr(args, name, None)
            if value is not None and not all(map(valid, value if isinstance(value, list) else [value])):
                fail(f"--{name} {value}: must be {wanted}")
    out = Path(args.output_dir)
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        fail(f"--output_dir {out}: is a file or lies under one; pass a folder")
    resume, script = args.resume_from_checkpoint, Path(__file__).name
    if resume not in (None, "latest"):
        try:
            written_by = json.loads((Path(resume) / "training_state.json").read_text()).get("script")
        except (OSError, ValueError):
            fail(f"--resume_from_checkpoint {resume}: not a checkpoint folder; pass checkpoint-N or latest")
        if written_by != script:
            fail(f"--resume_from_checkpoint {resume}: written by {written_by}, not {script}")


def check_args(args):
    """Cheap checks of the flags, before any data or model is loaded."""
    check_shared_flags(args)
    if "{}" not in args.caption_template:
        fail(f"--caption_template {args.caption_template!r}: must contain {{}} where the digit goes")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    levels, side = len(args.block_out_channels), (IMAGE_SIZE + 2 * PAD) // args.patch_size
    if side % 2 ** (levels - 1):
        fail(f"--block_out_channels: {levels} levels halve {side}x{side} inputs too often; use fewer levels")
    if any(not 0 <= i < levels for i in args.cross_attention_levels):
        fail(f"--cross_attention_levels {args.cross_attention_levels}: levels are 0..{levels - 1}")
    if args.sample_from:
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(f"--sample_from {args.sample_from}: no {EXPORT_CONFIG}; pass a run's output_dir or checkpoint")
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged ({problem}); pass an intact export")
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            fail("--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers)")
    args.report_to = installed_trackers(args.report_to)


# Copied from train_mnist.installed_trackers
def installed_trackers(report_to):
    """--report_to as accelerate's log_with; a missing tracker package is an error."""
    import importlib.util

    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    found = [name for name in wanted if importlib.util.find_spec(name)]
    if wanted and not found:
        fail(f"--report_to {report_to}: {' or '.join(wanted)} is not installed; pip install {wanted[0]}")
    return found


# Copied from train_mnist.check_accelerator
def check_accelerator(accelerator, fsdp=False):
    """What accelerate resolved from the flags, its config file and the launcher."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        fail("--mixed_precision fp16 (flag or accelerate config) needs a CUDA GPU; use bf16 or no")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fail(
            f"DeepSpeed is not supported; launch with DDP (accelerate launch --multi_gpu){' or FSDP2' if fsdp else ''}"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        if not fsdp:
            fail("FSDP is not supported by this script; launch with DDP (accelerate launch --multi_gpu)")
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            fail("FSDP1 is not supported; set fsdp_version: 2 in the accelerate config (--fsdp_version 2)")
        # Whole weights in checkpoints: sharded ones are pickled, and loading must not run code
        plugin = accelerator.state.fsdp_plugin
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # set anew for the full state dict
        plugin.set_state_dict_type("FULL_STATE_DICT")
        # On resume every process reads the whole files (a broadcast from rank 0 drops the optimizer's initial_lr)
        plugin.state_dict_config.rank0_only = plugin.optim_state_dict_config.rank0_only = False
        # Float inputs stay float32, as under DDP (the script autocasts the forward): FSDP would round flow timesteps
        if plugin.mixed_precision_policy is not None:
            plugin.mixed_precision_policy = replace(plugin.mixed_precision_policy, cast_forward_inputs=False)


# ---- Data ----
def build_dataset(args):
    """MNIST digits in memory, images in [-1, 1] padded to 32x32, and labels."""
    try:  # reads MNIST/raw when it is there, downloads otherwise
        mnist = torchvision.datasets.MNIST(args.data_root, train=True, download=True)
    except Exception as e:  # offline, proxy, disk full: all end the same way
        fail(f"--data_root {args.data_root}: no MNIST/raw there and the download failed ({type(e).__name__})")
    n = len(mnist) if args.max_samples is None else min(args.max_samples, len(mnist))
    images = mnist.data[:n].float().div(127.5).sub(1.0).unsqueeze(1)
    images = F.pad(images, (PAD, PAD, PAD, PAD), value=-1.0)
    return torch.utils.data.TensorDataset(images, mnist.targets[:n].long())


def captions(template):
    """The ten digit captions, then the empty prompt (row NULL)."""
    return [template.format(d) for d in range(10)] + [""]


# ---- Models ----
def load_text_encoder(name_or_path):
    """Tokenizer and frozen encoder; a full CLIP checkpoint gives its text tower."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        fail(
            f"--text_encoder_name_or_path {name_or_path}: cannot load it ({type(e).__name__}); pass a folder "
            f"with config.json and a tokenizer, or a hub id"
        )
    model_cls = {"clip": CLIPTextModel, "t5": T5EncoderModel, "mt5": T5EncoderModel}.get(config.model_type, AutoModel)
    text_encoder = model_cls.from_pretrained(name_or_path).requires_grad_(False).eval()
    return AutoTokenizer.from_pretrained(name_or_path), text_encoder


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, max_length, device):
    """The prompt table: last hidden states and attention masks."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    states = text_encoder.to(device)(tokens.input_ids.to(device), attention_mask=mask)[0]
    return states.float(), mask


def build_unet(args, cross_attention_dim):
    levels = range(len(args.block_out_channels))
    down = [("CrossAttnDownBlock2D" if i in args.cross_attention_levels else "DownBlock2D") for i in levels]
    return UNet2DConditionModel(
        sample_size=(IMAGE_SIZE + 2 * PAD) // args.patch_size,
        in_channels=args.patch_size**2,
        out_channels=args.patch_size**2,
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        down_block_types=down,
        up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
        norm_num_groups=args.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=args.attention_head_dim,
    )


def denoise(unet, x, t, states, mask, patch_size):
    """The UNet on p x p pixel patches stacked as channels."""
    pred = unet(F.pixel_unshuffle(x, patch_size), t, encoder_hidden_states=states, encoder_attention_mask=mask)
    return F.pixel_shuffle(pred.sample, patch_size)


class XFormersTextMask(XFormersAttnProcessor):
    """diffusers' xformers attention, with the text mask's bias in the compute dtype. The UNet builds that bias in
    its input's dtype (float32); xformers refuses it beside bf16/fp16 queries (SDPA casts it under autocast)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None and torch.is_autocast_enabled(hidden_states.device.type):
            attention_mask = attention_mask.to(torch.get_autocast_dtype(hidden_states.device.type))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


# ---- Objective ----
def training_step(unet, noise_scheduler, images, labels, prompts, args, generator):
    """Per-sample losses and timesteps of a batch noised at random timesteps, some captions dropped."""
    n, device = images.shape[0], images.device
    noise = torch.randn(images.shape, generator=generator, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    drop = torch.rand(n, generator=generator, device=device) < args.cond_dropout_prob
    rows = torch.where(drop, NULL, labels)  # the empty prompt trains the unconditional branch of guidance
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(images, noise, timesteps)
    pred = denoise(unet, noisy, timesteps, prompts[0][rows], prompts[1][rows], args.patch_size)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma:  # min(SNR, gamma) in x0 units, over the weight the target already carries: SNR or SNR + 1
        snr = compute_snr(noise_scheduler, timesteps)
        loss = loss * snr.clamp(max=args.snr_gamma) / (snr if args.prediction_type == "epsilon" else snr + 1)
    return loss, timesteps


# ---- Sampling ----
@torch.no_grad()
def sample(unet, sampler, prompts, labels, guidance_scale, num_inference_steps, generator):
    """uint8 digits [n, 28, 28] for the rows `labels` of the prompt table, with classifier-free guidance."""
    states, mask = prompts
    dtype = next(unet.parameters()).dtype
    patch_size = math.isqrt(unet.config.in_channels)
    x = torch.randn((len(labels), 1, 32, 32), generator=generator, device=states.device) * sampler.init_noise_sigma
    guided = guidance_scale != 1.0
    if guided:  # one batched call: [uncond; cond]
        labels = torch.cat([torch.full_like(labels, NULL), labels])
    states, mask = states[labels].to(dtype), mask[labels]
    sampler.set_timesteps(num_inference_steps, device=states.device)
    for t in sampler.timesteps:
        x_in = sampler.scale_model_input(torch.cat([x, x]) if guided else x, t).to(dtype)
        pred = denoise(unet, x_in, t, states, mask, patch_size).float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = sampler.step(pred, t, x).prev_sample
    x = x[:, 0, PAD : PAD + IMAGE_SIZE, PAD : PAD + IMAGE_SIZE]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ---- Validation ----
def log_validation(unet, sampler, prompts, args, path, trackers=(), step=0):
    """A grid, rows: digits 0-9, a panel per guidance scale; saved to `path`, sent to the trackers."""
    from PIL import Image

    labels = torch.arange(10, device=prompts[0].device).repeat_interleave(4)
    panels = []
    for scale in args.validation_guidance_scales:
        generator = torch.Generator(labels.device).manual_seed(args.seed)  # the same noise in every panel
        images = sample(unet, sampler, prompts, labels, scale, args.num_inference_steps, generator)
        panel = images.view(10, 4, 28, 28).permute(0, 2, 1, 3).reshape(280, 112)
        panels.append(F.pad(panel, (4, 4, 4, 4), value=128))  # a gray frame
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(panels, dim=1).numpy()).save(path)
    scales = ", ".join(f"{s:g}" for s in args.validation_guidance_scales)
    log_image(trackers, path, step, f"rows: digits 0-9; panels: guidance {scales}")


# Copied from train_mnist.log_image
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
    """loss.png: the loss and the loss per quarter of the timestep range, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    if not rows:  # validation before the first logging step
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ["loss"] + sorted(k for k in rows[-1] if k.startswith("loss_t")):
        ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def write_eval_samples(unet, sampler, prompts, args, path):
    """--num_eval_samples digits, balanced over 0-9, at --guidance_scale."""
    labels = torch.arange(args.num_eval_samples, device=prompts[0].device) % 10
    generator = torch.Generator(labels.device).manual_seed(args.seed + 1)
    start = time.perf_counter()
    images = [
        sample(unet, sampler, prompts, batch, args.guidance_scale, args.num_inference_steps, generator)
        for batch in labels.split(args.eval_batch_size)
    ]
    seconds = time.perf_counter() - start
    np.savez_compressed(
        path,
        images=torch.cat(images).numpy(),
        labels=labels.cpu().numpy(),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        sample_seconds=seconds,
    )
    return seconds


# ---- Checkpoints and export ----
# Copied from train_mnist.file_digest
def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# Copied from train_mnist.write_manifest
def write_manifest(folder, names):
    """manifest.json: size and sha256 of the files (or folders) `names` in `folder`."""
    files = {}
    for name in names:
        for path in sorted((folder / name).rglob("*")) if (folder / name).is_dir() else [folder / name]:
            if path.is_file():
                files[str(path.relative_to(folder))] = [path.stat().st_size, file_digest(path)]
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


# Copied from train_mnist.manifest_problem
def manifest_problem(folder):
    """What is wrong with a checkpoint or export folder, in a few words, or None."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: the folder is incomplete"
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


# Copied from train_mnist.weights_finite
def weights_finite(accelerator, model):
    """Whether every weight is finite, agreed by all processes (under FSDP each checks its own shards): one sync."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    nonfinite = torch.stack([(~torch.isfinite(p)).sum() for p in local]).sum().float()
    return accelerator.reduce(nonfinite, "sum").item() == 0


# Copied from train_mnist.whole_state
def whole_state(model, ema=None):
    """The model's state dict, with the EMA weights in place of its parameters, as whole tensors. Under FSDP every
    process must call it: it gathers the shards."""
    state = model.state_dict()
    if ema is not None:
        state.update(
            (name, shadow) for (name, _), shadow in zip(model.named_parameters(), ema.shadow_params, strict=True)
        )
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


# Copied from train_mnist.save_weights
def save_weights(state, model, folder):
    """`state` in save_pretrained layout: the model's config.json and diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True)
    model.save_config(folder)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        folder / "diffusion_pytorch_model.safetensors",
        metadata={"format": "pt"},
    )


def save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, write_sampling_files):
    """checkpoint-<step>: accelerate's state, the EMA UNet, the sampling files, the objective's RNG and `position`
    (epoch, batches of all processes in it), written under a temporary name."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    if not weights_finite(accelerator, unet):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, data sampler, the global RNGs of every process
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
            if ema is None:
                model.save_pretrained(tmp / "unet")
            else:
                save_weights(whole_state(model, ema), model, tmp / "unet_ema")
                state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            write_sampling_files(tmp)
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: never a half-written checkpoint-<step>
    except OSError as e:  # a full disk, a lost mount: the previous checkpoints stay intact
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


# Copied from train_mnist.list_checkpoints
def list_checkpoints(output_dir):
    """Complete checkpoints (those with a manifest), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# Copied from train_mnist.find_checkpoint
def find_checkpoint(accelerator, args):
    """The checkpoint to resume from, or None. "latest" skips damaged checkpoints; a damaged path is an error."""
    if not args.resume_from_checkpoint:
        return None
    choice = [None]
    if accelerator.is_main_process:  # the others take its answer
        if args.resume_from_checkpoint != "latest":
            choice = [Path(args.resume_from_checkpoint)]
            if problem := manifest_problem(choice[0]):
                fail(f"--resume_from_checkpoint {choice[0]}: damaged ({problem}); pass an intact one or latest")
        else:
            found = list_checkpoints(args.output_dir)
            for path in reversed(found):
                if not (problem := manifest_problem(path)):
                    choice = [path]
                    break
                accelerator.print(f"warning: {path} is damaged ({problem}); trying the one before")
            if found and choice[0] is None:
                fail(f"--resume_from_checkpoint latest: every checkpoint in {args.output_dir} is damaged")
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


def restore_train_rng(accelerator, path, train_rng, state, seed):
    """The objective's random stream as saved; a new one if the checkpoint comes from another number of processes
    or another device type (a CUDA generator's state does not fit a CPU one)."""
    rank, saved = accelerator.process_index, state.get("num_processes", 1)
    if saved == accelerator.num_processes:
        rng_state = load_file(path / f"train_rng_{rank}.safetensors")["state"]
        if rng_state.numel() == train_rng.get_state().numel():
            train_rng.set_state(rng_state)
            return
        why = "on another device type"
    else:
        why = f"by {saved} processes, resumed on {accelerator.num_processes}"
    accelerator.print(f"warning: {path} was written {why}: new random streams for the objective (not bitwise)")
    train_rng.manual_seed(seed * 1000 + rank + 7919 * state["global_step"])


def load_checkpoint(accelerator, path, unet, ema, train_rng, args):
    """Restore what save_checkpoint wrote; returns training_state.json."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != "train_mnist.py":
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not train_mnist.py")
    if ema is not None and state["ema"] is None:
        fail(f"--resume_from_checkpoint {path}: saved without EMA; resume with --no-use_ema")
    accelerator.load_state(str(path))
    restore_train_rng(accelerator, path, train_rng, state, args.seed)
    if ema is not None:  # load_state_dict keeps the tensors it is given: load them onto the EMA's device
        weights = load_file(
            path / "unet_ema" / "diffusion_pytorch_model.safetensors", device=str(ema.shadow_params[0].device)
        )
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(unet).named_parameters()]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def write_sampling_files(sampler, args, text_encoder_name, folder):
    """The sampler and export_config.json: with the UNet, all that --sample_from needs."""
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


def model_card(text_encoder_name, global_step):
    """README.md of the export: the Hub's metadata, the training command and how to sample."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="diffusers", license="other", datasets=["ylecun/mnist"], tags=["mnist"])
    return f"""---
{data.to_yaml()}
---

# Text-to-digit diffusion (train_mnist.py)

A `UNet2DConditionModel` trained {global_step} steps, conditioned on the text encoder `{text_encoder_name}`.

```bash
{" ".join(["python train_mnist.py", *sys.argv[1:]])}
python train_mnist.py --sample_from THIS_FOLDER --output_dir samples
```

![samples](samples.png)
"""


def export_model(unet, write_sampling_files, output_dir, card, grid):
    """The UNet, sampler, export_config.json and model card, each renamed into place; manifest.json last."""
    (output_dir / MANIFEST).unlink(missing_ok=True)  # visibly incomplete until the new manifest
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


# Copied from train_mnist.RunLock
class RunLock:
    """One run per output folder. The lock of a dead process (this host), or one whose heartbeat is older than
    `stale_after` seconds (another host), is taken over."""

    def __init__(self, output_dir, stale_after=300):
        self.path, self.stale_after = Path(output_dir) / LOCK, stale_after
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.done = threading.Event()

    def acquire(self):
        try:
            other = json.loads(self.path.read_text())
        except FileNotFoundError:
            other = self.me  # no lock: nothing to take over
        except ValueError:  # cut short: nobody can prove it is alive
            other = {}
        if other.get("pid") != self.me["pid"]:
            if self.alive(other):
                fail(
                    f"--output_dir {self.path.parent}: another run (PID {other['pid']} on {other['host']}) trains "
                    f"there; stop it or pick another --output_dir"
                )
            print(f"warning: taking over the stale lock of PID {other.get('pid')} on {other.get('host')}")
        self.write()
        threading.Thread(target=self.beat, daemon=True).start()

    def alive(self, other):
        if other.get("host") != self.me["host"] or not other.get("pid"):
            return time.time() - other.get("heartbeat", 0) < self.stale_after
        try:
            os.kill(other["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            pass
        return True

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


# Copied from train_mnist.claim_output_dir
def claim_output_dir(args):
    """Take the run lock; refuse a new run among another run's checkpoints."""
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(output_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        fail(f"--output_dir {output_dir}: cannot write there; pass a writable folder")
    lock = RunLock(output_dir)
    lock.acquire()
    atexit.register(lock.release)
    old = sorted(output_dir.glob("checkpoint-*")) + sorted(output_dir.glob(".checkpoint-*.tmp"))
    if old and not args.resume_from_checkpoint:
        if not args.overwrite_output_dir:
            lock.release()
            fail(
                f"--output_dir {output_dir}: holds another run's checkpoints ({old[-1].name}); continue it with "
                f"--resume_from_checkpoint latest, or delete them with --overwrite_output_dir"
            )
        for path in old:
            shutil.rmtree(path)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    return lock


# Copied from train_mnist.write_run_config
def write_run_config(args, accelerator):
    """run_config.json: the flags, the git commit, the processes, the precision used and the package versions."""
    import accelerate
    import diffusers
    import transformers

    try:
        git = ["git", "rev-parse", "HEAD"]
        commit = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        commit = ""
    config = {
        "args": vars(args),
        "git_commit": commit.strip() or None,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # from the flag, accelerate's config or the launcher
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, diffusers, transformers, accelerate)},
    }
    (Path(args.output_dir) / "run_config.json").write_text(json.dumps(config, indent=2))


# Copied from train_mnist.StopRequest
class StopRequest:
    """SIGTERM/SIGINT: checkpoint at the next step, then exit 0. The save is collective, so every process must stop
    at the same step: each step reads the previous step's non-blocking all-reduce of the flags over a CPU group."""

    def __init__(self, accelerator):
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        self.group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None
        self.flag, self.pending = torch.zeros(1), None

    def __call__(self):
        if self.group is None:
            return self.event.is_set()
        agreed = False
        if self.pending is not None:  # a finished work is let go: one left alive at exit can abort the process
            self.pending.wait()
            self.pending, agreed = None, bool(self.flag.item())
        if not agreed:
            self.flag.fill_(float(self.event.is_set()))
            self.pending = torch.distributed.all_reduce(
                self.flag, torch.distributed.ReduceOp.MAX, self.group, async_op=True
            )
        return agreed

    def close(self):
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


# ---- Main ----
def generate_from_export(args, accelerator):
    """--sample_from: the validation grid and, with --num_eval_samples, eval_samples.npz."""
    export, output_dir = Path(args.sample_from), Path(args.output_dir)
    config = json.loads((export / EXPORT_CONFIG).read_text())
    args.caption_template = config["caption_template"]
    prompts = encode_prompts(
        *load_text_encoder(args.text_encoder_name_or_path or config["text_encoder_name_or_path"]),
        captions(args.caption_template),
        config["tokenizer_max_length"],
        accelerator.device,
    )
    subfolder = "unet" if (export / "unet").is_dir() else "unet_ema"  # an export, or a checkpoint with EMA
    unet = UNet2DConditionModel.from_pretrained(export, subfolder=subfolder).to(accelerator.device).eval()
    sampler = DPMSolverMultistepScheduler.from_pretrained(export / "scheduler")
    if accelerator.is_main_process:
        log_validation(unet, sampler, prompts, args, output_dir / "samples" / "export.png")
        if args.num_eval_samples:
            seconds = write_eval_samples(unet, sampler, prompts, args, output_dir / "eval_samples.npz")
            print(f"wrote {output_dir / 'eval_samples.npz'} in {seconds:.1f}s")


def main(args):
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Without CUDA, "auto" is the CPU; several CPU processes then talk over gloo.
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, "logs")),
        # The order of epoch e depends on (seed, e) only, so a resume can skip into the middle of it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    check_accelerator(accelerator)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.sample_from:
        return generate_from_export(args, accelerator)
    with accelerator.main_process_first():  # one process downloads MNIST, the others then read it
        dataset = build_dataset(args)
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        # a full batch for every process, else every epoch is empty
        drop_last=len(dataset) >= args.train_batch_size * accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    text_encoder_name = args.text_encoder_name_or_path or "openai/clip-vit-base-patch32"
    prompts = encode_prompts(  # the ten captions and the empty prompt, encoded once
        *load_text_encoder(text_encoder_name),
        captions(args.caption_template),
        args.tokenizer_max_length,
        accelerator.device,
    )
    # The data and the frozen encoder loaded: only now is the folder claimed, so a bad input changes nothing there.
    if accelerator.is_main_process:
        claim_output_dir(args)
        write_run_config(args, accelerator)
    stop = StopRequest(accelerator)  # from here on, a signal means: checkpoint at the next step, exit 0
    set_seed(args.seed)  # the same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)

    unet = build_unet(args, cross_attention_dim=prompts[0].shape[-1])
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.set_attn_processor(XFormersTextMask())
    noise_scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction_type, clip_sample=False
    )
    # DPM-Solver++ with its x0 clipped to the pixel range: near t=T the squared-cosine schedule has alpha ~ 1e-3,
    # and x0 = (x_t - sigma * eps) / alpha would multiply the errors of eps by ~1000.
    sampler = DPMSolverMultistepScheduler.from_config(
        noise_scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=True,
        sample_max_value=1.0,
    )
    sampling_files = functools.partial(write_sampling_files, sampler, args, text_encoder_name)
    # Fused AdamW: one kernel, and it can skip a non-finite step on the device (found_inf below).
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True,
    )
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    ema = None
    if args.use_ema:  # on the device of the prepared model
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power, foreach=True)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # The objective draws from its own generator, saved in checkpoints: each DataLoader iterator draws from the
    # global RNG, which therefore does not resume exactly.
    train_rng = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, unet, ema, train_rng, args)
        global_step, first_epoch = state["global_step"], state["epoch"]
        # The data position in batches of this run's processes, whose number may differ from the saved run's.
        batches_to_skip = state["epoch_batches"] // accelerator.num_processes
        if batches_to_skip >= len(train_dataloader):
            first_epoch, batches_to_skip = first_epoch + 1, 0
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    # Not prepared: it counts optimizer steps whatever the number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        last_epoch=global_step - 1,
    )
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})

    # The host reads device values only every --logging_steps.
    metrics_path = output_dir / "metrics.jsonl"
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_main_process, desc="train")
    bin_sums = torch.zeros(2, 4, device=accelerator.device)  # loss sum and count per quarter of the timesteps
    # Steps with a non-finite gradient: in all, in the current streak, and the longest streak since the last log.
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=accelerator.device).unbind()
    window_start, window_samples = time.perf_counter(), 0
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        unet.train()
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for epoch_batches, (images, labels) in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(unet):
                loss, timesteps = training_step(unet, noise_scheduler, images, labels, prompts, args, train_rng)
                accelerator.backward(loss.mean())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm or float("inf"))
                    # A non-finite norm (the same on every process) skips the update on the device: the fused
                    # AdamW leaves weights and moments alone where found_inf is 1. With fp16 the GradScaler sets
                    # found_inf itself, on the same steps.
                    nonfinite = (~torch.isfinite(grad_norm)).float()
                    if accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bins = timesteps * 4 // noise_scheduler.config.num_train_timesteps
            bin_sums[0].index_add_(0, bins, loss.detach().float())
            bin_sums[1].index_add_(0, bins, torch.ones_like(loss, dtype=torch.float))
            window_samples += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            lr_scheduler.step()
            nonfinite_steps += nonfinite
            nonfinite_run.mul_(nonfinite).add_(nonfinite)
            torch.maximum(longest_run, nonfinite_run, out=longest_run)
            if ema is not None:  # a skipped step left the weights alone: averaging them again is harmless
                ema.step(unet.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                sums, counts = accelerator.reduce(bin_sums, "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                row = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": (sums.sum() / counts.sum()).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": window_samples / max(time.perf_counter() - window_start, 1e-9),
                    "nonfinite_steps": int(total_nonfinite),
                    **{f"loss_t{i}": (sums[i] / counts[i]).item() for i in range(4) if counts[i] > 0},
                }
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    progress.set_postfix(loss=row["loss"])
                accelerator.log(row, step=global_step)
                bin_sums.zero_()
                longest_run.copy_(nonfinite_run)
                window_start, window_samples = time.perf_counter(), 0
                if longest >= args.max_nonfinite_steps:  # the same on every process
                    accelerator.print(
                        f"error: {int(longest)} steps in a row with a non-finite gradient before step "
                        f"{global_step}; lower --learning_rate. The last checkpoint is intact."
                    )
                    sys.exit(1)

            stop_now = stop() and global_step < max_train_steps  # at the last step the run finishes as usual
            position = (epoch, epoch_batches * accelerator.num_processes)
            if (global_step % args.checkpointing_steps == 0 or stop_now) and global_step < max_train_steps:
                path = save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
                accelerator.print(f"\nsaved {path}")
            if stop_now:
                accelerator.print(f"stop requested at step {global_step}; resume with --resume_from_checkpoint latest")
                accelerator.end_training()
                return
            validate = global_step % args.validation_steps == 0 or global_step == max_train_steps
            if validate and accelerator.is_main_process:  # with the EMA weights
                if ema is not None:
                    ema.store(unet.parameters())
                    ema.copy_to(unet.parameters())
                grid = output_dir / "samples" / f"step-{global_step}.png"
                model = accelerator.unwrap_model(unet).eval()
                log_validation(model, sampler, prompts, args, grid, accelerator.trackers, global_step)
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

    save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
    if accelerator.is_main_process:  # export the model validated at the last step, with the EMA weights
        model.eval()
        if ema is not None:
            ema.copy_to(model.parameters())
        export_model(model, sampling_files, output_dir, model_card(text_encoder_name, global_step), grid)
        summary = {"global_step": global_step, "train_seconds": train_seconds}
        if args.num_eval_samples:
            summary["sample_seconds"] = write_eval_samples(
                model, sampler, prompts, args, output_dir / "eval_samples.npz"
            )
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"done: {global_step} steps in {train_seconds / 60:.1f} min; export in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
