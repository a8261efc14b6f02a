"""Train one MMDiT on images and captions: text-to-image, image-to-text and joint generation.

Images (pixel or VAE-latent patches) follow rectified flow, MSE on the velocity eps - x_0; captions follow masked
discrete diffusion (MDLM), cross-entropy on the masked tokens weighted by 1/t. Each modality has its own timestep
and is sometimes clean or dropped, so one network learns both directions and both guidance branches.

    python train_image_discrete.py --data-root ./data --output-dir out
    accelerate launch train_image_discrete.py --data-root coco --text-encoder-name-or-path bert-base-uncased
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

SCRIPT = "train_image_discrete.py"
KIND = "masked discrete text diffusion"  # the model card's title and tag
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
MIN_TEXT_T = 1e-3  # smallest masking rate drawn: bounds the 1/t weight
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last: size and hash of every file
LOCK = "run.lock"  # one training run per output folder


# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Copied from train_mnist.float_list
def float_list(text):
    return [float(x) for x in text.split(",") if x.strip()]


# ---- Args ----
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data_root",
        help="Folder with MNIST/raw, {split}_data.json (COCO-style), metadata.jsonl or index.json (shards).",
    )
    g.add_argument(
        "--dataset",
        choices="auto mnist coco imagefolder precomputed".split(),
        default="auto",
        help="Layout of --data_root.",
    )
    g.add_argument("--split", default="train", help="COCO-style: reads {split}_data.json.")
    g.add_argument("--caption_column", default="text", help="imagefolder: caption key in metadata.jsonl.")
    g.add_argument("--caption_template", default="a handwritten digit {}", help="MNIST caption; {} is the word.")
    g.add_argument("--resolution", type=int, default=32, help="Image side for COCO/imagefolder (MNIST: 28).")
    g.add_argument("--max_samples", type=int, help="Train on the first N examples.")
    g.add_argument("--num_validation_images", type=int, default=8, help="Held-out images captioned at validation.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("models")
    g.add_argument("--vae_name_or_path", help="AutoencoderKL: diffuse its latents, not pixels.")
    g.add_argument("--patch_size", type=int, default=4)
    g.add_argument("--dim_image", type=int, default=128, help="Width of the image stream and of attention.")
    g.add_argument("--dim_text", type=int, help="Text stream width (None: 128, or the frozen encoder's).")
    g.add_argument("--depth", type=int, default=6, help="MMDiT blocks.")
    g.add_argument("--num_heads", type=int, default=4)
    g.add_argument("--mlp_ratio", type=float, default=4.0)
    g.add_argument("--stem_channels", type=int, default=4, help="3x3 conv channels before the patchify (0: none).")
    g.add_argument("--tokenizer", default="bert-base-uncased")
    g.add_argument(
        "--text_encoder_name_or_path", default="learned", help='"learned" (trained here) or a frozen BERT-family model.'
    )
    g.add_argument("--tokenizer_max_length", type=int, default=16, help="Caption tokens, special tokens included.")

    g = parser.add_argument_group("objective")
    g.add_argument("--text_loss_weight", type=float, default=4.0)
    g.add_argument("--image_clean_prob", type=float, default=0.4, help="Share of clean images (image-to-text).")
    g.add_argument("--text_clean_prob", type=float, default=0.45, help="Share of clean captions (text-to-image).")
    g.add_argument(
        "--cond_dropout_prob",
        type=float,
        default=0.0625,
        help="Per modality: share dropped (guidance's unconditional).",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="output_image_discrete")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", "--batch_size", type=int, default=64, help="Per process.")
    g.add_argument("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=10)
    g.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--lr_scheduler", default="cosine", help="A diffusers get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=200)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_nonfinite_steps", type=int, default=10, help="Stop after N non-finite gradients in a row.")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema_decay", type=float, default=0.999, help="Largest EMA decay, reached after the warmup.")
    g.add_argument("--ema_power", type=float, default=0.75, help="Exponent of the EMA warmup.")

    g = parser.add_argument_group("speed and memory")
    g.add_argument("--mixed_precision", choices="no fp16 bf16".split(), help="Default: accelerate's config.")
    g.add_argument("--device", choices="auto cpu cuda".split(), default="auto")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")

    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument("--guidance_scale", type=float, default=7.0, help="Text-to-image guidance (1: none).")
    g.add_argument("--text_guidance_scale", type=float, default=1.5, help="Image-to-text guidance (1: none).")
    g.add_argument("--validation_guidance_scales", type=float_list, default=[1.0, 2.0, 4.0], help="Grid columns.")
    g.add_argument("--num_inference_steps", type=int, default=20, help="Euler steps of the image flow.")
    g.add_argument("--text_inference_steps", type=int, help="Caption unmasking steps (default: its length).")
    g.add_argument(
        "--text_sampler",
        choices=["ancestral", "confidence"],
        default="confidence",
        help="ancestral: MDLM posterior; confidence: most confident tokens first.",
    )
    g.add_argument("--sample_from", help="Only generate, from an export or checkpoint-N: the grid and the files below.")
    g.add_argument("--prompts_file", help="One prompt per line: text-to-image into prompt_samples.npz.")
    g.add_argument(
        "--images_file",
        help="uint8 `images` [N, H, W(, C)] at the training size in an .npz: image-to-text into captions.jsonl.",
    )
    g.add_argument("--num_joint_samples", type=int, default=0, help="Image-caption pairs into joint_samples.npz.")
    g.add_argument("--eval_batch_size", type=int, default=250, help="Batch size of the three above.")

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument("--validation_steps", type=int, default=1000)
    g.add_argument("--checkpointing_steps", type=int, default=1000)
    g.add_argument("--checkpoints_total_limit", type=int, help="Keep the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", help='A checkpoint folder, or "latest".')
    g.add_argument("--overwrite_output_dir", action="store_true", help="Delete another run's checkpoints there.")
    g.add_argument("--report_to", choices="none tensorboard wandb all".split(), default="none")
    g.add_argument("--tracker_project_name", default="train_image_discrete")

    argv = sys.argv[1:] if argv is None else list(argv)
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


# Copied from train_mnist.check_shared_flags
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
    """Cheap checks of the flags, before any dataset or model is loaded."""
    check_shared_flags(args)
    for name in "prompts_file images_file num_joint_samples".split():
        if getattr(args, name) and not args.sample_from:
            fail(f"--{name} {getattr(args, name)}: only with --sample_from")
    if args.num_joint_samples < 0:
        fail(f"--num_joint_samples {args.num_joint_samples}: must be >= 0")
    if args.sample_from:
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(f"--sample_from {args.sample_from}: no {EXPORT_CONFIG}; pass a run's output_dir or checkpoint-N")
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged ({problem}); pass an intact export")
    elif args.data_root is None:
        fail("--data_root is required: a folder with MNIST/raw, {split}_data.json, metadata.jsonl or index.json")
    else:
        args.dataset = detect_dataset(args)
    if "{}" not in args.caption_template:
        fail(f"--caption_template {args.caption_template!r}: must contain {{}} for the digit's word")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU; use cpu or auto")
    for name in ("image_clean_prob", "text_clean_prob"):
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name} {getattr(args, name)}: must be in [0, 1)")
    if args.image_clean_prob + args.text_clean_prob + 2 * args.cond_dropout_prob > 1:
        fail("--image_clean_prob + --text_clean_prob + 2 * --cond_dropout_prob must be at most 1")
    if args.stem_channels < 0:
        fail(f"--stem_channels {args.stem_channels}: must be >= 0")
    if args.dim_image % args.num_heads:
        fail(f"--dim_image {args.dim_image}: must be divisible by --num_heads {args.num_heads}")
    if args.resolution % args.patch_size:
        fail(f"--resolution {args.resolution}: must be divisible by --patch_size {args.patch_size}")
    if args.tokenizer_max_length < 3:
        fail(f"--tokenizer_max_length {args.tokenizer_max_length}: needs room for [CLS], a word and [SEP]")
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
def detect_dataset(args):
    """--dataset, or the first layout whose marker file is in --data_root."""
    root = Path(args.data_root)
    if not root.is_dir():
        fail(f"--data_root {root}: no such folder")
    markers = dict(
        precomputed="index.json", coco=f"{args.split}_data.json", imagefolder="metadata.jsonl", mnist="MNIST/raw/"
    )
    found = [kind for kind, name in markers.items() if (root / name).exists()]
    if args.dataset != "auto":
        if args.dataset not in found:
            fail(f"--data_root {root}: --dataset {args.dataset} needs {markers[args.dataset]} there")
        return args.dataset
    if not found:
        fail(f"--data_root {root}: found none of {', '.join(markers.values())}")
    return found[0]


@dataclass
class Data:
    """The training set and the held-out images."""

    kind: str  # "pixels" (uint8) or "latents" (a VAE posterior)
    tensors: tuple  # (pixels or posterior mean, posterior std, index into `captions`), one row per example
    captions: list  # the distinct captions
    shape: tuple  # [C, H, W] of one image in the model's space
    val_pixels: torch.Tensor | None
    val_latent_mean: torch.Tensor | None
    val_captions: list
    val_source: str  # where the held-out images come from, for the logs
    vae_info: dict | None  # the VAE of precomputed shards


def load_mnist(root, train, template, n=None):
    """The first n MNIST images (uint8 [n, 1, 28, 28], white on black) and their captions."""
    import torchvision

    try:
        mnist = torchvision.datasets.MNIST(root, train=train, download=False)
    except RuntimeError as e:
        fail(f"--data_root {root}: cannot read MNIST/raw ({e})")
    return mnist.data[:n].unsqueeze(1), [template.format(DIGIT_WORDS[int(d)]) for d in mnist.targets[:n]]


def load_image(path, resolution):
    """RGB uint8 [3, r, r], resized and centre-cropped; None when missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
            image = image.resize((w, h), Image.BICUBIC)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
    except (OSError, ValueError):
        return None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def read_pairs(args, root, split):
    """(image path, caption) pairs of {split}_data.json (COCO-style) or metadata.jsonl."""
    pairs = []
    if args.dataset == "coco":
        for r in json.loads((root / f"{split}_data.json").read_text()):
            path = next((r[k] for k in "image image_path file_name filepath path".split() if k in r), None)
            caption = next((r[k] for k in "caption text captions".split() if k in r), None)
            if path is None or caption is None:
                fail(
                    f"--data_root {root / f'{split}_data.json'}: a record needs 'image' and 'caption'; got {sorted(r)}"
                )
            pairs += [(root / path, str(c)) for c in (caption if isinstance(caption, list) else [caption])]
        return pairs
    for line in (root / "metadata.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if args.caption_column not in r:
                fail(f"--caption_column {args.caption_column}: not in {root / 'metadata.jsonl'} (keys {sorted(r)})")
            pairs.append((root / r["file_name"], str(r[args.caption_column])))
    return pairs


def load_pairs(pairs, resolution, what):
    """Missing or unreadable images are skipped and counted, never replaced by a blank image."""
    images, captions = [], []
    for path, caption in pairs:
        image = load_image(path, resolution)
        if image is not None:
            images.append(image)
            captions.append(caption)
    if skipped := len(pairs) - len(images):
        print(f"warning: {what}: skipped {skipped} of {len(pairs)} images (missing or unreadable)", file=sys.stderr)
    if not images:
        fail(f"--data_root: none of the {len(pairs)} images of {what} could be read")
    return torch.stack(images), captions


def load_precomputed(root, max_samples):
    """Shards of prepare_data_multi_gpu.py: VAE posteriors and captions."""
    from safetensors import safe_open

    index = json.loads((root / "index.json").read_text())
    if index.get("format") != "precomputed-diffusion-shards" or index.get("version") != 1:
        fail(f"--data_root {root}: index.json is not version 1 of the precomputed-diffusion-shards format")
    if not index.get("vae"):
        fail(f"--data_root {root}: the shards hold no images; prepare them with --vae, or pass the images")
    means, stds, captions = [], [], []
    for shard in index["shards"]:
        with safe_open(str(root / shard["file"]), framework="pt") as f:
            shard_captions = json.loads((f.metadata() or {}).get("captions") or "null")
            if shard_captions is None:
                fail(f"--data_root {root / shard['file']}: no 'captions' in the shard's metadata")
            means.append(f.get_tensor("latent_mean").float())
            stds.append(f.get_tensor("latent_std").float())
            captions += shard_captions
        if max_samples is not None and len(captions) >= max_samples:
            break
    return torch.cat(means)[:max_samples], torch.cat(stds)[:max_samples], captions[:max_samples], index["vae"]


def caption_table(captions):
    """Distinct captions (first-seen order) and each example's index into them."""
    table = {}
    ids = torch.tensor([table.setdefault(c, len(table)) for c in captions])
    return list(table), ids


def build_dataset(args, vae):
    """The training data and the held-out images, per the layout of --data_root."""
    root, n_val, vae_info = Path(args.data_root), args.num_validation_images, None
    if args.dataset == "mnist":
        images, captions = load_mnist(root, True, args.caption_template, args.max_samples)
        val_pixels, val_captions = load_mnist(root, False, args.caption_template, n_val)
        val_source = "MNIST test images"
    elif args.dataset in ("coco", "imagefolder"):
        pairs = read_pairs(args, root, args.split)[: args.max_samples]
        images, captions = load_pairs(pairs, args.resolution, f"--data_root {root}")
        if args.dataset == "coco" and args.split != "val" and (root / "val_data.json").is_file():
            val_pairs = read_pairs(args, root, "val")[:n_val]
            val_pixels, val_captions = load_pairs(val_pairs, args.resolution, "val_data.json")
            val_source = "val_data.json"
        else:
            val_pixels, val_captions = images[:n_val], captions[:n_val]
            val_source = "training images (no held-out split)"
    else:
        mean, std, captions, vae_info = load_precomputed(root, args.max_samples)
        val_pixels, val_captions, val_latent_mean = None, captions[:n_val], mean[:n_val]
        val_source = "training examples (shards hold no held-out split)"
    table, caption_ids = caption_table(captions)
    if args.dataset != "precomputed":
        mean, std = (images, torch.zeros(len(images), 0)) if vae is None else encode_images(vae, images)
        val_latent_mean = None if vae is None else encode_images(vae, val_pixels)[0]
    return Data(
        kind="latents" if (vae is not None or args.dataset == "precomputed") else "pixels",
        tensors=(mean, std, caption_ids),
        captions=table,
        shape=tuple(mean.shape[1:]),
        val_pixels=val_pixels,
        val_latent_mean=val_latent_mean,
        val_captions=val_captions,
        val_source=val_source,
        vae_info=vae_info,
    )


@torch.no_grad()
def encode_images(vae, pixels, batch_size=32):
    """uint8 images -> the VAE posterior's mean and std; each step draws a fresh latent from them."""
    means, stds = [], []
    for batch in pixels.split(batch_size):
        batch = batch.expand(-1, vae.config.in_channels, -1, -1) if batch.shape[1] == 1 else batch
        posterior = vae.encode(batch.float().div(127.5).sub(1).to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def load_vae(name_or_path, what="--vae_name_or_path"):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(name_or_path).requires_grad_(False).eval()
    except (OSError, ValueError) as e:
        fail(f"{what} {name_or_path}: cannot load an AutoencoderKL there ({type(e).__name__})")


def latent_scaling(vae):
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def to_model_input(mean, std, kind, scaling, generator):
    """A batch in the model's space: pixels in [-1, 1], or a scaled latent drawn from the posterior."""
    if kind == "pixels":
        return mean.float().div(127.5).sub(1.0)
    scale, shift = scaling
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * noise - shift) * scale


def to_images(x, kind, vae, scaling):
    """Model-space images -> uint8 [n, C, H, W]."""
    if kind == "latents":
        scale, shift = scaling
        x = vae.decode((x / scale + shift).to(vae.device, vae.dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def validation_images(data, scaling):
    """Held-out images in the model's space (the posterior mean for latents), or None."""
    if data.val_latent_mean is not None:
        scale, shift = scaling
        return (data.val_latent_mean - shift) * scale
    if data.val_pixels is None:
        return None
    return data.val_pixels.float().div(127.5).sub(1.0)


# ---- Models: the two-stream MMDiT ----
class ImagePatchEncoder(nn.Module):
    """Conv2d patchify + fixed 2-D sin-cos positions; a 3x3 conv stem lets a patch see its neighbours' edges."""

    def __init__(self, in_channels, image_size, patch_size, dim, stem_channels=0):
        super().__init__()
        self.stem = (
            nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, padding=1), nn.GELU())
            if stem_channels
            else nn.Identity()
        )
        self.proj = nn.Conv2d(stem_channels or in_channels, dim, kernel_size=patch_size, stride=patch_size)
        pos = get_2d_sincos_pos_embed(dim, image_size // patch_size, base_size=image_size // patch_size)
        self.register_buffer("pos", pos.float().unsqueeze(0), persistent=False)

    def forward(self, x):
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2) + self.pos


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class StreamBlock(nn.Module):
    """One modality's weights in an MMDiT block: adaLN, LayerNorm, QKV with QK RMS-norm, MLP."""

    def __init__(self, dim, attn_dim, num_heads, cond_dim, mlp_ratio):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, attn_dim // num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * attn_dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.out = nn.Linear(attn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def pre_attention(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=-1)
        b, n, _ = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, head_dim]
        return self.q_norm(q), self.k_norm(k), v, (gate1, shift2, scale2, gate2)

    def post_attention(self, x, attn, mods):
        gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.out(attn)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class MMDiTBlock(nn.Module):
    """Two streams, one joint attention over [image; text] (key_mask: True = attend)."""

    def __init__(self, dim_image, dim_text, num_heads, mlp_ratio):
        super().__init__()
        self.image = StreamBlock(dim_image, dim_image, num_heads, dim_image, mlp_ratio)
        self.text = StreamBlock(dim_text, dim_image, num_heads, dim_image, mlp_ratio)

    def forward(self, x, y, c, key_mask):
        qi, ki, vi, mods_i = self.image.pre_attention(x, c)
        qt, kt, vt, mods_t = self.text.pre_attention(y, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qi, qt), (ki, kt), (vi, vt)))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).flatten(2)
        n = x.shape[1]
        return self.image.post_attention(x, attn[:, :n], mods_i), self.text.post_attention(y, attn[:, n:], mods_t)


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.adaln(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """Image [b, C, H, W] and text [b, L, dim_text] in, both predictions out. The adaLN condition sums the two
    timestep embeddings and, with pooled_text, an MLP of the mean attended text (SD3)."""

    def __init__(
        self,
        in_channels,
        image_size,
        patch_size,
        dim_image,
        dim_text,
        text_out_dim,
        depth,
        num_heads,
        mlp_ratio=4.0,
        pooled_text=False,
        stem_channels=0,
        adaln_zero=True,
    ):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.patch_encoder = ImagePatchEncoder(in_channels, image_size, patch_size, dim_image, stem_channels)
        self.image_time = nn.Sequential(Timesteps(256, True, 0), TimestepEmbedding(256, dim_image))
        self.text_time = nn.Sequential(Timesteps(256, True, 0), TimestepEmbedding(256, dim_image))
        self.text_pool = (
            nn.Sequential(nn.Linear(dim_text, dim_image), nn.SiLU(), nn.Linear(dim_image, dim_image))
            if pooled_text
            else None
        )
        self.blocks = nn.ModuleList(MMDiTBlock(dim_image, dim_text, num_heads, mlp_ratio) for _ in range(depth))
        self.image_final = FinalLayer(dim_image, patch_size * patch_size * in_channels, dim_image)
        self.text_final = FinalLayer(dim_text, text_out_dim, dim_image)
        self.gradient_checkpointing = False
        if adaln_zero:  # DiT's zero init, else PyTorch's
            self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        zeroed = [m.adaln[-1] for m in self.modules() if isinstance(m, (StreamBlock, FinalLayer))]
        for linear in zeroed + [self.image_final.linear, self.text_final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, image, t_image, text, t_text, key_mask=None):
        """t_image, t_text in [0, 1] (0 = clean); key_mask [b, n_image + L] bool or None."""
        x = self.patch_encoder(image)
        c = self.image_time(t_image * 1000) + self.text_time(t_text * 1000)
        if self.text_pool is not None:  # mean over the attended text tokens: a dropped caption stays unseen
            if key_mask is None:
                pooled = text.mean(1)
            else:
                keep = key_mask[:, -text.shape[1] :, None].to(text.dtype)
                pooled = (text * keep).sum(1) / keep.sum(1).clamp(min=1)
            c = c + self.text_pool(pooled)
        y = text
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, y = torch.utils.checkpoint.checkpoint(block, x, y, c, key_mask, use_reentrant=False)
            else:
                x, y = block(x, y, c, key_mask)
        b, _, h, w = image.shape
        p = self.patch_size
        out = self.image_final(x, c).view(b, h // p, w // p, p, p, self.in_channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.in_channels, h, w)
        return out, self.text_final(y, c)


# ---- Models: caption tokens ----
def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        fail(f"--tokenizer {name_or_path}: cannot load it ({type(e).__name__}); pass a local folder or a hub id")


class Vocabulary:
    """The captions' token ids and the special tokens renumbered 0..K-1; the mask K is an input only (K logits).
    `ids` maps compact -> tokenizer ids, the mask (the tokenizer's [MASK], else a new id) last."""

    def __init__(self, ids, pad_token_id):
        self.ids = torch.as_tensor(ids)
        self.size = self.mask_id = len(self.ids) - 1  # K
        self.pad_id = self.ids.tolist().index(pad_token_id)
        self.lookup = torch.full((int(self.ids.max()) + 1,), self.mask_id)
        self.lookup[self.ids[:-1]] = torch.arange(self.size)

    @classmethod
    def from_captions(cls, tokenizer, token_ids):
        special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id]
        used = sorted({int(i) for i in token_ids.unique()} | {i for i in special if i is not None})
        tokenizer_mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else len(tokenizer)
        return cls(used + [tokenizer_mask], tokenizer.pad_token_id)

    def compact(self, token_ids):
        return self.lookup[token_ids.clamp(max=len(self.lookup) - 1)]

    def decode(self, tokenizer, compact_ids):
        return [
            tokenizer.decode(self.ids[row[row < self.size]], skip_special_tokens=True).strip()
            for row in compact_ids.cpu()
        ]


def tokenize(tokenizer, captions, max_length):
    """Token ids [n, max_length]; pads are diffused too, so the model learns the length."""
    if tokenizer.pad_token_id is None:
        fail(f"--tokenizer {tokenizer.name_or_path}: it has no pad token; use a BERT-family tokenizer")
    return tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


class TextTokenEncoder(nn.Module):
    """Learned token + position embeddings of the (partly masked) caption."""

    def __init__(self, num_tokens, max_length, dim):
        super().__init__()
        self.token = nn.Embedding(num_tokens, dim)
        self.position = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)

    def forward(self, ids):
        return self.token(ids) + self.position[:, : ids.shape[1]]


class BertTextEncoder(nn.Module):
    """A frozen BERT-family encoder as the input embedding: compact ids in, last hidden states (fp32) out."""

    def __init__(self, name_or_path, vocabulary):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(name_or_path).requires_grad_(False).eval()
        self.register_buffer("to_tokenizer", vocabulary.ids.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, ids):
        return self.model(input_ids=self.to_tokenizer[ids]).last_hidden_state.float()


class TextImageModel(ModelMixin, ConfigMixin):
    """What is trained and exported: the MMDiT and, with num_text_tokens, the learned caption embedding (a frozen
    encoder is not part of it: export_config.json names it)."""

    @register_to_config
    def __init__(
        self,
        in_channels,
        image_size,
        patch_size,
        dim_image,
        dim_text,
        text_out_dim,
        depth,
        num_heads,
        mlp_ratio=4.0,
        stem_channels=0,
        num_text_tokens=None,
        max_text_length=16,
    ):
        super().__init__()
        self.mmdit = MMDiT(
            in_channels,
            image_size,
            patch_size,
            dim_image,
            dim_text,
            text_out_dim,
            depth,
            num_heads,
            mlp_ratio,
            pooled_text=True,
            stem_channels=stem_channels,
            adaln_zero=False,
        )
        self.text_input = TextTokenEncoder(num_text_tokens, max_text_length, dim_text) if num_text_tokens else None

    def forward(self, image, t_image, text, t_text, key_mask=None):
        y = self.text_input(text) if self.text_input is not None else text
        return self.mmdit(image, t_image, y, t_text, key_mask)


def resolve_dim_text(args):
    """The text stream's width: a frozen encoder's hidden size, read before its weights load."""
    if args.text_encoder_name_or_path == "learned":
        return args.dim_text or 128
    from transformers import AutoConfig

    flag = f"--text_encoder_name_or_path {args.text_encoder_name_or_path}"
    try:
        hidden = AutoConfig.from_pretrained(args.text_encoder_name_or_path).hidden_size
    except (OSError, ValueError) as e:
        fail(f"{flag}: cannot load it ({type(e).__name__}); pass a folder with config.json, or a hub id")
    if args.dim_text is not None and args.dim_text != hidden:
        fail(
            f"--dim_text {args.dim_text} does not match the hidden size of {flag} ({hidden}): pass --dim_text {hidden}"
        )
    return hidden


def build_model(mmdit_config, text_encoder, num_tokens, max_text_length):
    num_text_tokens = num_tokens if text_encoder == "learned" else None
    return TextImageModel(**mmdit_config, num_text_tokens=num_text_tokens, max_text_length=max_text_length)


def text_states(frozen_encoder, ids):
    """What the text stream reads: the ids (learned embedding), or the frozen encoder's states."""
    return ids if frozen_encoder is None else frozen_encoder(ids)


def num_image_tokens(model, x):
    p = getattr(model, "module", model).mmdit.patch_size
    return (x.shape[-2] // p) * (x.shape[-1] // p)


# ---- Objective ----
def key_padding_mask(keep_image, keep_text, num_image_tokens, text_length):
    """[b, n_image + L] bool, False for the tokens of a dropped modality."""
    return torch.cat(
        [keep_image[:, None].expand(-1, num_image_tokens), keep_text[:, None].expand(-1, text_length)], dim=1
    )


def training_step(model, frozen_encoder, x0, ids, vocabulary, args, generator):
    """Rectified flow on the image, MDLM on the caption; returns per-example image and text losses."""
    n, device = x0.shape[0], x0.device
    # Per example: image clean (image-to-text), caption clean (text-to-image), caption or image dropped
    # (unconditional), else both noised at independent timesteps (joint).
    u = torch.rand(n, generator=generator, device=device)
    shares = [args.image_clean_prob, args.text_clean_prob, args.cond_dropout_prob, args.cond_dropout_prob]
    bucket = sum(u >= edge for edge in np.cumsum(shares))
    image_clean, text_clean, text_dropped, image_dropped = (bucket == i for i in range(4))
    # Image: x_t = (1 - t) x0 + t eps, target eps - x0; t logit-normal (SD3), 0 when clean, 1 when dropped.
    t_image = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=0.0, logit_std=1.0, device=device, generator=generator
    )
    t_image = torch.where(image_clean, 0.0, torch.where(image_dropped, 1.0, t_image))
    eps = torch.randn(x0.shape, generator=generator, device=device)
    t4 = t_image.view(-1, 1, 1, 1)
    x_t = (1 - t4) * x0 + t4 * eps
    # Caption: each token masked with probability t; antithetic t over the batch (one uniform, shifted by i/n).
    u = torch.rand(1, generator=generator, device=device)
    t_text = (u + torch.arange(n, device=device) / n) % 1.0 * (1 - MIN_TEXT_T) + MIN_TEXT_T
    weight = 1 / t_text  # MDLM's -alpha'_t / (1 - alpha_t) for alpha_t = 1 - t
    t_text = torch.where(text_clean, 0.0, torch.where(text_dropped, 1.0, t_text))
    masked = torch.rand(ids.shape, generator=generator, device=device) < t_text[:, None]
    noisy_ids = torch.where(masked, vocabulary.mask_id, ids)
    key_mask = None  # decided from the flag: reading the draws would make the host wait for the device
    if args.cond_dropout_prob > 0:
        key_mask = key_padding_mask(~image_dropped, ~text_dropped, num_image_tokens(model, x0), ids.shape[1])
    pred, logits = model(x_t, t_image, text_states(frozen_encoder, noisy_ids), t_text, key_mask)
    image_loss = F.mse_loss(pred.float(), (eps - x0).float(), reduction="none").mean(dim=(1, 2, 3))
    image_loss = image_loss * (~image_clean & ~image_dropped)
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
    text_loss = (ce * masked).sum(dim=1) / ids.shape[1] * weight
    text_loss = text_loss * (~text_clean & ~text_dropped)
    return image_loss, text_loss


# ---- Sampling ----
@torch.no_grad()
def sample_images(model, frozen_encoder, ids, shape, guidance_scale, num_steps, generator):
    """Text-to-image: Euler on the flow ODE from t=1 to 0; guidance's unconditional branch drops the caption."""
    n, device = ids.shape[0], ids.device
    x = torch.randn((n, *shape), generator=generator, device=device)
    states, t_text, key_mask = text_states(frozen_encoder, ids), torch.zeros(n, device=device), None
    guided = guidance_scale != 1.0
    if guided:
        cond = torch.arange(2 * n, device=device) >= n  # [uncond; cond]
        key_mask = key_padding_mask(torch.ones_like(cond), cond, num_image_tokens(model, x), ids.shape[1])
        states, t_text = torch.cat([states, states]), (~cond).float()
    grid = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        v, _ = model(torch.cat([x, x]) if guided else x, t.expand(len(t_text)), states, t_text, key_mask)
        if guided:
            uncond, cond_v = v.float().chunk(2)
            v = uncond + guidance_scale * (cond_v - uncond)
        x = x + (s - t) * v.float()
    return x


def unmask_step(ids, log_probs, t, s, steps_left, sampler, mask_id, generator):
    """One reverse step from masking rate t to s < t; unmasked tokens stay. ancestral: each masked token is revealed
    with probability (t - s) / t, drawn from the model (MDLM); confidence: the most confident ones, argmax."""
    masked = ids == mask_id
    if sampler == "ancestral":
        uniform = torch.rand(log_probs.shape, generator=generator, device=ids.device).clamp(1e-20, 1 - 1e-7)
        proposal = (log_probs - torch.log(-torch.log(uniform))).argmax(-1)  # Gumbel-max
        reveal = masked & (torch.rand(ids.shape, generator=generator, device=ids.device) < (t - s) / t)
    else:
        confidence, proposal = log_probs.max(-1)
        count = torch.ceil(masked.sum(1, keepdim=True) / steps_left).long()
        confidence = confidence.masked_fill(~masked, -math.inf)
        rank = confidence.argsort(dim=1, descending=True).argsort(dim=1)
        reveal = masked & (rank < count)
    return torch.where(reveal, proposal, ids)


@torch.no_grad()
def sample_captions(model, frozen_encoder, x0, vocabulary, length, guidance_scale, num_steps, sampler, generator):
    """Image-to-text: unmask an all-mask caption in num_steps; guidance's unconditional branch drops the image."""
    n, device = x0.shape[0], x0.device
    ids = torch.full((n, length), vocabulary.mask_id, device=device)
    images, t_image, key_mask = x0, torch.zeros(n, device=device), None
    if guidance_scale != 1.0:
        cond = torch.arange(2 * n, device=device) >= n  # [uncond; cond]
        key_mask = key_padding_mask(cond, torch.ones_like(cond), num_image_tokens(model, x0), length)
        images, t_image = torch.cat([x0, x0]), (~cond).float()
    for i in range(num_steps):
        t, s = 1 - i / num_steps, 1 - (i + 1) / num_steps
        states = text_states(frozen_encoder, ids.repeat(len(images) // n, 1))
        _, logits = model(images, t_image, states, torch.full((len(images),), t, device=device), key_mask)
        log_probs = logits.float().log_softmax(-1)
        if guidance_scale != 1.0:  # guided in log space, renormalised
            uncond, cond_lp = log_probs.chunk(2)
            log_probs = (uncond + guidance_scale * (cond_lp - uncond)).log_softmax(-1)
        ids = unmask_step(ids, log_probs, t, s, num_steps - i, sampler, vocabulary.mask_id, generator)
    return ids


@torch.no_grad()
def sample_joint(model, frozen_encoder, n, shape, vocabulary, length, guidance_scale, num_steps, text_steps, generator):
    """Caption first, the image dropped, then the image from it, guided: both halves stay in states training covers
    often (one time grid for both would cross both-noisy states, which it covers rarely)."""
    device = next(model.parameters()).device
    ids = torch.full((n, length), vocabulary.mask_id, device=device)
    no_image, ones = torch.zeros((n, *shape), device=device), torch.ones(n, device=device)  # dropped: t=1
    key_mask = key_padding_mask(ones < 1, ones > 0, num_image_tokens(model, no_image), length)
    for i in range(text_steps):
        t, s = 1 - i / text_steps, 1 - (i + 1) / text_steps
        _, logits = model(no_image, ones, text_states(frozen_encoder, ids), t * ones, key_mask)
        log_probs = logits.float().log_softmax(-1)
        ids = unmask_step(ids, log_probs, t, s, text_steps - i, "ancestral", vocabulary.mask_id, generator)
    return sample_images(model, frozen_encoder, ids, shape, guidance_scale, num_steps, generator), ids


# ---- Validation ----
@dataclass
class Sampling:
    """What the samplers and the validation need besides the model."""

    tokenizer: object
    vocabulary: Vocabulary
    frozen_encoder: nn.Module | None
    tokenizer_max_length: int
    device: torch.device
    shape: tuple  # image [C, H, W] in the model's space
    kind: str  # pixels or latents
    vae: nn.Module | None
    scaling: tuple | None
    dataset: str
    caption_template: str
    val_x0: torch.Tensor | None  # held-out images in the model's space
    val_captions: list
    val_source: str
    text_guidance_scale: float
    text_sampler: str
    text_inference_steps: int


def validation_prompts(ctx):
    if ctx.dataset == "mnist":
        return [ctx.caption_template.format(w) for w in DIGIT_WORDS]
    return ctx.val_captions[:8]


def generate_images(model, ctx, prompts, guidance_scale, seed, num_steps):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    ids = ctx.vocabulary.compact(tokenize(ctx.tokenizer, prompts, ctx.tokenizer_max_length)).to(ctx.device)
    x = sample_images(model, ctx.frozen_encoder, ids, ctx.shape, guidance_scale, num_steps, generator)
    return to_images(x, ctx.kind, ctx.vae, ctx.scaling)


def generate_captions(model, ctx, x0, seed):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    ids = sample_captions(
        model,
        ctx.frozen_encoder,
        x0.to(ctx.device),
        ctx.vocabulary,
        ctx.tokenizer_max_length,
        ctx.text_guidance_scale,
        ctx.text_inference_steps,
        ctx.text_sampler,
        generator,
    )
    return ctx.vocabulary.decode(ctx.tokenizer, ids)


def generate_joint(model, ctx, n, guidance_scale, seed, num_steps):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    x, ids = sample_joint(
        model,
        ctx.frozen_encoder,
        n,
        ctx.shape,
        ctx.vocabulary,
        ctx.tokenizer_max_length,
        guidance_scale,
        num_steps,
        ctx.text_inference_steps,
        generator,
    )
    return to_images(x, ctx.kind, ctx.vae, ctx.scaling), ctx.vocabulary.decode(ctx.tokenizer, ids)


def show(images):
    """uint8 [C, H, W] -> array for imshow."""
    image = images.permute(1, 2, 0).numpy()
    return image[..., 0] if image.shape[-1] == 1 else image[..., :3]


def log_validation(model, ctx, args, step, trackers=(), per_prompt=4):
    """samples/step-<step>.png (prompts x guidance scales, also to the trackers) and .txt (generated captions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples_dir = Path(args.output_dir) / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    prompts, scales = validation_prompts(ctx), args.validation_guidance_scales
    size = (1.3 * per_prompt * len(scales), 1.3 * len(prompts))
    fig, axes = plt.subplots(len(prompts), len(scales), figsize=size, squeeze=False)
    for j, scale in enumerate(scales):
        repeated = [p for p in prompts for _ in range(per_prompt)]
        images = generate_images(model, ctx, repeated, scale, args.seed, args.num_inference_steps)
        for i, prompt in enumerate(prompts):
            row, ax = images[i * per_prompt : (i + 1) * per_prompt], axes[i, j]
            ax.imshow(np.concatenate([show(im) for im in row], axis=1), cmap="gray", vmin=0, vmax=255)
            ax.set(xticks=[], yticks=[])
            if i == 0:
                ax.set_title(f"guidance {scale:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel(prompt[:40], fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(samples_dir / f"step-{step}.png", dpi=80)
    plt.close(fig)
    if trackers:
        caption = f"rows: {' | '.join(prompts)}; guidance {', '.join(f'{s:g}' for s in scales)}"
        log_image(trackers, samples_dir / f"step-{step}.png", step, caption)

    lines = [
        f"# step {step}: captions generated for {ctx.val_source} (text guidance {ctx.text_guidance_scale:g}, "
        f"{ctx.text_sampler} sampler, {ctx.text_inference_steps} steps)"
    ]
    if ctx.val_x0 is not None:
        generated = generate_captions(model, ctx, ctx.val_x0, args.seed)
        pairs = enumerate(zip(ctx.val_captions, generated, strict=True))
        lines += [f"{i}\ttrue: {true}\tgenerated: {gen}" for i, (true, gen) in pairs]
    _, joint = generate_joint(model, ctx, 4, args.guidance_scale, args.seed, args.num_inference_steps)
    lines += ["# joint samples (a caption, then an image from it)"]
    lines += [f"joint {i}\t{c}" for i, c in enumerate(joint)]
    (samples_dir / f"step-{step}.txt").write_text("\n".join(lines) + "\n")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    if not rows:  # validation before the first logging step
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "image_loss", "text_loss"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def read_sampling_inputs(args, config, vae):
    """--prompts_file and --images_file, checked before the MMDiT loads: the prompts and uint8 [N, C, H, W], or None."""
    prompts, images = None, None
    for flag, path in (("--prompts_file", args.prompts_file), ("--images_file", args.images_file)):
        if path and not Path(path).is_file():
            fail(f"{flag} {path}: no such file")
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts_file {args.prompts_file}: cannot read it ({type(e).__name__}); pass UTF-8 text")
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            fail(f"--prompts_file {args.prompts_file}: no prompt in it; write one prompt per line")
    if args.images_file:
        path, save = args.images_file, "save one with numpy.savez(path, images=...)"
        try:
            npz = np.load(path)
            images = npz["images"] if isinstance(npz, np.lib.npyio.NpzFile) and "images" in npz.files else None
        except (OSError, ValueError) as e:
            fail(f"--images_file {path}: not a readable .npz ({type(e).__name__}); {save}")
        if images is None:
            fail(f"--images_file {path}: no `images` array in it; {save}")
        c, h, w = config["shape"]
        if vae is not None:  # a latent model takes images of the size its VAE decodes to
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            c, h, w = vae.config.in_channels, h * factor, w * factor
        channels_ok = images.shape[3:] in ((), (1,), (c,))
        if images.dtype != np.uint8 or not images.size or images.shape[1:3] != (h, w) or not channels_ok:
            wanted = f"uint8 [N, {h}, {w}]" + (f" or [N, {h}, {w}, {c}]" if c > 1 else "") + ", N >= 1"
            fail(f"--images_file {path}: `images` is {images.dtype} {list(images.shape)}; pass {wanted}")
        images = torch.from_numpy(images.reshape(len(images), h, w, -1)).permute(0, 3, 1, 2).expand(-1, c, -1, -1)
    return prompts, images


def write_samples(model, ctx, args, prompts, images):
    """prompt_samples.npz (images, prompts), captions.jsonl (index, caption) and joint_samples.npz (images, captions)
    in --output_dir, images uint8 [N, H, W(, C)]; batch i is seeded with --seed + i (+ 1 for prompts, + 1000 joint)."""
    output_dir, size, steps = Path(args.output_dir), args.eval_batch_size, args.num_inference_steps
    if prompts:
        x = [
            generate_images(model, ctx, prompts[i : i + size], args.guidance_scale, args.seed + 1 + i // size, steps)
            for i in range(0, len(prompts), size)
        ]
        x = torch.cat(x).permute(0, 2, 3, 1).squeeze(-1).numpy()
        np.savez_compressed(output_dir / "prompt_samples.npz", images=x, prompts=np.array(prompts))
        print(f"wrote {len(x)} images to {output_dir / 'prompt_samples.npz'}")
    if images is not None:
        with (output_dir / "captions.jsonl").open("w", encoding="utf-8") as f:
            for i, batch in enumerate(images.split(size)):
                x0 = batch.float().div(127.5).sub(1.0)  # the model's space: pixels in [-1, 1], or scaled latents
                if ctx.kind == "latents":
                    x0 = (encode_images(ctx.vae, batch)[0] - ctx.scaling[1]) * ctx.scaling[0]
                for j, caption in enumerate(generate_captions(model, ctx, x0, args.seed + i)):
                    f.write(json.dumps({"index": i * size + j, "caption": caption}, ensure_ascii=False) + "\n")
        print(f"wrote {len(images)} captions to {output_dir / 'captions.jsonl'}")
    if args.num_joint_samples:
        batches = torch.arange(args.num_joint_samples).split(size)
        pairs = [
            generate_joint(model, ctx, len(b), args.guidance_scale, args.seed + 1000 + i, steps)
            for i, b in enumerate(batches)
        ]
        x = torch.cat([p[0] for p in pairs]).permute(0, 2, 3, 1).squeeze(-1).numpy()
        captions = [c for p in pairs for c in p[1]]
        np.savez_compressed(output_dir / "joint_samples.npz", images=x, captions=np.array(captions))
        print(f"wrote {len(x)} image-caption pairs to {output_dir / 'joint_samples.npz'}")


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


def save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, write_sampling_files):
    """checkpoint-<step>: accelerate's state, the EMA model (or mmdit/), what --sample_from needs, the objective's RNG
    and the data position, written to a temporary folder, the manifest last, then renamed."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    if not weights_finite(accelerator, model):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, data sampler, every process's global RNGs
        save_file({"state": train_rng.get_state()}, tmp / f"train_rng_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            state = dict(
                script=SCRIPT,
                global_step=global_step,
                num_processes=accelerator.num_processes,
                epoch=position[0],
                epoch_batches=position[1],
                ema=None,
            )
            if ema is not None:
                save_weights(whole_state(unwrapped, ema), unwrapped, tmp / "mmdit_ema")
                state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            else:
                unwrapped.save_pretrained(tmp / "mmdit")
            write_sampling_files(tmp)
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:  # a full disk, a lost mount: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        print(
            f"error: step {global_step}: checkpoint not written ({reason}); resume from the previous ones with "
            f"--resume_from_checkpoint latest",
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


# Copied from train_mnist.restore_train_rng
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


def load_checkpoint(accelerator, path, model, ema, train_rng, args):
    """Restore what save_checkpoint wrote (nothing loaded can run code); returns training_state.json."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != SCRIPT:
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not {SCRIPT}")
    if ema is not None and state["ema"] is None:
        fail(f"--resume_from_checkpoint {path}: saved without EMA; resume with --no-use_ema")
    accelerator.load_state(str(path))
    restore_train_rng(accelerator, path, train_rng, state, args.seed)
    if ema is not None:  # loaded onto the EMA's device: load_state_dict keeps the tensors it is given
        device = str(ema.shadow_params[0].device)
        weights = load_file(path / "mmdit_ema" / "diffusion_pytorch_model.safetensors", device=device)
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(model).named_parameters()]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def write_sampling_files(config, folder):
    (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def model_card(args, global_step, metrics_path):
    """README.md of the export: the Hub's YAML front matter, how it was trained and how to sample it."""
    from huggingface_hub import ModelCardData

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else dict(loss=math.nan, image_loss=math.nan, text_loss=math.nan)
    mnist = args.dataset == "mnist"
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        datasets=["ylecun/mnist"] if mnist else None,
        tags="diffusers mmdit text-to-image image-to-text".split() + [KIND.replace(" ", "-")] + ["mnist"] * mnist,
    )
    space = f"the latents of the VAE `{args.vae_name_or_path}`" if args.vae_name_or_path else "pixels"
    return f"""---
{data.to_yaml()}
---

# MMDiT text-image model, {KIND} ({SCRIPT})

One MMDiT trained from scratch on {args.dataset} images (in {space}) and their captions (text encoder
`{args.text_encoder_name_or_path}`): text-to-image, image-to-text, or both.
{global_step} optimizer steps; final loss {last["loss"]:.4f} (image {last["image_loss"]:.4f}, text
{last["text_loss"]:.4f}).

```bash
{" ".join(["python", SCRIPT, *sys.argv[1:]])}
python {SCRIPT} --sample_from THIS_FOLDER --output_dir samples  # sample the EMA weights
```

![samples at guidance {", ".join(f"{s:g}" for s in args.validation_guidance_scales)}](samples.png)
"""


def export_model(model, write_sampling_files, output_dir, card, grid):
    """mmdit/, export_config.json, README.md and samples.png, moved in from a temporary folder; manifest.json last."""
    (output_dir / MANIFEST).unlink(missing_ok=True)  # visibly incomplete until the new manifest
    tmp = output_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "mmdit")
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


def write_run_config(args, accelerator):
    import accelerate
    import diffusers
    import transformers

    try:
        git = "git rev-parse HEAD".split()
        commit = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        commit = ""
    config = dict(
        args=vars(args),
        git_commit=commit.strip() or None,
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,  # resolved from the flag, accelerate's config or launcher
        versions={m.__name__: m.__version__ for m in (torch, diffusers, transformers, accelerate)},
    )
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
def build_sampling(args, config, tokenizer, vocabulary, frozen, vae, device, val):
    """The Sampling of a training run or an export, from its export config; val: (images, captions, source)."""
    return Sampling(
        tokenizer=tokenizer,
        vocabulary=vocabulary,
        frozen_encoder=frozen,
        tokenizer_max_length=config["max_text_length"],
        device=device,
        shape=tuple(config["shape"]),
        kind=config["kind"],
        vae=vae,
        scaling=config["latent_scaling"],
        dataset=config["dataset"],
        caption_template=config["caption_template"],
        val_x0=val[0],
        val_captions=val[1],
        val_source=val[2],
        text_guidance_scale=args.text_guidance_scale,
        text_sampler=args.text_sampler,
        text_inference_steps=args.text_inference_steps or config["max_text_length"],
    )


def generate_from_export(args, accelerator):
    """--sample_from: the validation files and the samples of --prompts_file, --images_file, --num_joint_samples."""
    export, device = Path(args.sample_from), accelerator.device
    config = json.loads((export / EXPORT_CONFIG).read_text())
    if config.get("script") != SCRIPT:
        fail(f"--sample_from {export}: exported by {config.get('script')}, not {SCRIPT}")
    vae = load_vae(config["vae"]).to(device) if config["vae"] else None
    prompts, images = read_sampling_inputs(args, config, vae)
    tokenizer = load_tokenizer(config["tokenizer"])
    vocabulary = Vocabulary(config["vocabulary"], tokenizer.pad_token_id)
    subfolder = "mmdit" if (export / "mmdit").is_dir() else "mmdit_ema"  # an export, or a checkpoint with EMA
    model = TextImageModel.from_pretrained(export, subfolder=subfolder).to(device).eval()
    frozen = None if config["text_encoder"] == "learned" else BertTextEncoder(config["text_encoder"], vocabulary)
    args.data_root = args.data_root or config["data_root"]
    val = None, config["validation_prompts"], "no held-out images"
    if config["dataset"] == "mnist" and Path(args.data_root or "", "MNIST", "raw").is_dir():
        pixels, captions = load_mnist(
            Path(args.data_root), False, config["caption_template"], args.num_validation_images
        )
        val = pixels.float().div(127.5).sub(1.0), captions, "MNIST test images"
    ctx = build_sampling(args, config, tokenizer, vocabulary, frozen and frozen.to(device), vae, device, val)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        log_validation(model, ctx, args, "export")
        write_samples(model, ctx, args, prompts, images)


def main(args):
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # "auto" is the CPU without CUDA; several processes then talk over gloo.
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, "logs")),
        # The shuffle of epoch e depends only on (seed, e), so the data position can be restored mid-epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    check_accelerator(accelerator)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.sample_from:
        return generate_from_export(args, accelerator)
    dim_text = resolve_dim_text(args)
    tokenizer = load_tokenizer(args.tokenizer)
    device = accelerator.device

    # Data: images (or VAE posteriors), the distinct captions tokenized once
    vae_name = args.vae_name_or_path
    vae = load_vae(vae_name).to(device) if vae_name else None
    data = build_dataset(args, vae)
    if data.vae_info is not None:  # shards: their VAE decodes the samples
        vae_name = vae_name or data.vae_info["name_or_path"]
        vae = vae or load_vae(vae_name, "--data_root index.json vae").to(device)
    scaling = latent_scaling(vae) if vae is not None else None
    if data.shape[-1] % args.patch_size or data.shape[-2] % args.patch_size:
        fail(f"--patch_size {args.patch_size}: does not divide the {data.shape[-2]}x{data.shape[-1]} image grid")
    token_ids = tokenize(tokenizer, data.captions, args.tokenizer_max_length)
    vocabulary = Vocabulary.from_captions(tokenizer, token_ids)
    caption_tokens = vocabulary.compact(token_ids).to(device)  # [distinct captions, L]
    train_dataloader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*data.tensors),
        batch_size=args.train_batch_size,
        shuffle=True,
        # a full batch for every process, else every epoch is empty
        drop_last=len(data.tensors[0]) >= args.train_batch_size * accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )

    # Models: a frozen caption encoder (or none), the MMDiT and its EMA
    frozen = None
    if args.text_encoder_name_or_path != "learned":  # in the run's precision; its states are fp32
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        frozen = BertTextEncoder(args.text_encoder_name_or_path, vocabulary).to(device, dtype=weight_dtype)
    # Only now is the folder claimed: a bad input changes nothing there.
    if accelerator.is_main_process:
        claim_output_dir(args)
        write_run_config(args, accelerator)
    stop = StopRequest(accelerator)
    set_seed(args.seed)  # the same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)
    mmdit_config = dict(
        in_channels=data.shape[0],
        image_size=data.shape[-1],
        patch_size=args.patch_size,
        dim_image=args.dim_image,
        dim_text=dim_text,
        text_out_dim=vocabulary.size,
        depth=args.depth,
        num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio,
        stem_channels=args.stem_channels,
    )
    model = build_model(mmdit_config, args.text_encoder_name_or_path, vocabulary.size + 1, args.tokenizer_max_length)
    model.mmdit.gradient_checkpointing = args.gradient_checkpointing
    ema = None
    if args.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_decay,
            use_ema_warmup=True,
            power=args.ema_power,
            foreach=True,
        )
        ema.to(device)
    accelerator.print(
        f"MMDiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M trained parameters; "
        f"{len(data.tensors[0])} examples ({args.dataset}, {data.kind} {data.shape}), "
        f"{len(data.captions)} distinct captions, {vocabulary.size} caption tokens"
    )
    # export_config.json: what --sample_from needs besides the weights
    config = dict(
        script=SCRIPT,
        mmdit=mmdit_config,
        tokenizer=args.tokenizer,
        text_encoder=args.text_encoder_name_or_path,
        max_text_length=args.tokenizer_max_length,
        vocabulary=vocabulary.ids.tolist(),
        dataset=args.dataset,
        data_root=args.data_root,
        caption_template=args.caption_template,
        kind=data.kind,
        shape=list(data.shape),
        vae=vae_name,
        latent_scaling=list(scaling) if scaling else None,
        guidance_scale=args.guidance_scale,
        text_guidance_scale=args.text_guidance_scale,
        num_inference_steps=args.num_inference_steps,
        text_sampler=args.text_sampler,
        text_inference_steps=args.text_inference_steps or args.tokenizer_max_length,
    )
    val = validation_images(data, scaling), data.val_captions, data.val_source
    ctx = build_sampling(args, config, tokenizer, vocabulary, frozen, vae, device, val)
    config["validation_prompts"] = validation_prompts(ctx)
    sampling_files = functools.partial(write_sampling_files, config)

    # Fused AdamW skips a step with a non-finite gradient on the device (found_inf below)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # The objective's draws, saved in checkpoints (the global RNG also seeds each DataLoader iterator: no exact resume)
    train_rng = torch.Generator(device).manual_seed(args.seed * 1000 + accelerator.process_index)

    # Resume
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, model, ema, train_rng, args)
        global_step, first_epoch = state["global_step"], state["epoch"]
        batches_to_skip = state["epoch_batches"] // accelerator.num_processes  # in this run's batches
        if batches_to_skip >= len(train_dataloader):
            first_epoch, batches_to_skip = first_epoch + 1, 0
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    # Not prepared (accelerate would step it once per process): rebuilt at the resumed step, nothing to load.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        last_epoch=global_step - 1,
    )
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})

    # Training loop: the host reads device values only every --logging_steps
    metrics_path = output_dir / "metrics.jsonl"
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_main_process, desc="train")
    sums = torch.zeros(3, device=device)  # image loss, text loss, examples
    # Non-finite gradient steps: in total, in the current run, the longest run since the last log.
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=device).unbind()
    window_start, window_samples = time.perf_counter(), 0
    position = (first_epoch, batches_to_skip * accelerator.num_processes)
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        model.train()
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for epoch_batches, (mean, std, caption_index) in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(model):
                x0 = to_model_input(mean, std, data.kind, scaling, train_rng)
                image_loss, text_loss = training_step(
                    model, frozen, x0, caption_tokens[caption_index], vocabulary, args, train_rng
                )
                accelerator.backward((image_loss.sum() + args.text_loss_weight * text_loss.sum()) / x0.shape[0])
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    # found_inf = 1 (the same on every process) makes fused AdamW skip the step; fp16's GradScaler
                    # sets it itself.
                    nonfinite = (~torch.isfinite(grad_norm)).float()
                    if accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # new_full fills on the device: a tensor from a host number would be a sync
            sums += torch.stack([image_loss.detach().sum(), text_loss.detach().sum(), image_loss.new_full((), len(x0))])
            window_samples += x0.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            lr_scheduler.step()
            nonfinite_steps += nonfinite
            nonfinite_run.mul_(nonfinite).add_(nonfinite)
            torch.maximum(longest_run, nonfinite_run, out=longest_run)
            if ema is not None:  # a skipped step left the weights alone: averaging them again is harmless
                ema.step(model.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                totals = accelerator.reduce(sums, "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                image_l, text_l = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
                row = dict(
                    step=global_step,
                    epoch=epoch,
                    loss=image_l + args.text_loss_weight * text_l,
                    image_loss=image_l,
                    text_loss=text_l,
                    lr=lr_scheduler.get_last_lr()[0],
                    grad_norm=grad_norm.item(),
                    samples_per_s=window_samples / max(time.perf_counter() - window_start, 1e-9),
                    nonfinite_steps=int(total_nonfinite),
                )
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    progress.set_postfix(image=f"{image_l:.4f}", text=f"{text_l:.4f}")
                accelerator.log(row, step=global_step)
                sums.zero_()
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
                path = save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, sampling_files)
                accelerator.print(f"\nsaved {path}")
            if stop_now:
                accelerator.print(f"stop requested at step {global_step}; resume with --resume_from_checkpoint latest")
                accelerator.end_training()
                return
            validate = global_step % args.validation_steps == 0 and global_step < max_train_steps
            if validate and accelerator.is_main_process:
                if ema is not None:
                    ema.store(model.parameters())
                    ema.copy_to(model.parameters())
                log_validation(accelerator.unwrap_model(model).eval(), ctx, args, global_step, accelerator.trackers)
                plot_loss(metrics_path, output_dir / "loss.png")
                if ema is not None:
                    ema.restore(model.parameters())
                model.train()
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    stop.close()
    progress.close()
    train_seconds = time.perf_counter() - train_start

    # Final checkpoint, samples and export, with the EMA weights
    save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, sampling_files)
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model).eval()
        if ema is not None:
            ema.copy_to(final_model.parameters())
        log_validation(final_model, ctx, args, global_step, accelerator.trackers)
        plot_loss(metrics_path, output_dir / "loss.png")
        card = model_card(args, global_step, metrics_path)
        export_model(final_model, sampling_files, output_dir, card, output_dir / "samples" / f"step-{global_step}.png")
        summary = dict(global_step=global_step, train_seconds=train_seconds)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"done: step {global_step}, {train_seconds / 60:.1f} min of training; export in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
