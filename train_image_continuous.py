"""Train one MMDiT on images and captions: joint continuous diffusion of images and caption embeddings.

Captions are a frozen text encoder's hidden states, standardised and projected on their top principal directions;
images are pixel or VAE-latent patches. Both are noised at independent timesteps (the caption's SNR divided by
--text_shift^2), MSE on the predicted v (or epsilon) of each, as in UniDiffuser: one network draws an image from a
caption, a caption from an image (the nearest training caption), or both.

    python train_image_continuous.py --data-root ./data --output-dir out
    accelerate launch train_image_continuous.py --data_root coco_dir --text_encoder_name_or_path intfloat/e5-base
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
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

SCRIPT = "train_image_continuous.py"
KIND = "continuous text-embedding diffusion"  # the model card's title and tag
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last: size and hash of every file
LOCK = "run.lock"  # one training run per output folder
TEXT_CLIP = 5.0  # samplers clip the caption's predicted x0 to +-this, in standardised units
CAPTION_CHUNK = 4096  # captions at a time through the caption table, which stays on the host


# ---- Args ----
# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Copied from train_mnist.float_list
def float_list(text):
    return [float(x) for x in text.split(",") if x.strip()]


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
    g.add_argument("--dim_text", type=int, help="The text encoder's hidden size (checked early).")
    g.add_argument(
        "--text_latent_dim",
        type=int,
        help="Text stream width: the caption's top-N principal directions (0: all; default: up to 64).",
    )
    g.add_argument("--depth", type=int, default=6, help="MMDiT blocks.")
    g.add_argument("--num_heads", type=int, default=4)
    g.add_argument("--mlp_ratio", type=float, default=4.0)
    g.add_argument("--stem_channels", type=int, default=32, help="3x3 conv channels before the patchify (0: none).")
    g.add_argument(
        "--text_encoder_name_or_path", default="bert-base-uncased", help="Frozen transformers AutoModel and tokenizer."
    )
    g.add_argument("--text_prefix", default="", help='Prepended to every caption, e.g. "query: " for e5 models.')
    g.add_argument("--tokenizer_max_length", type=int, default=16, help="Caption tokens, special tokens included.")

    g = parser.add_argument_group("objective")
    g.add_argument("--text_loss_weight", type=float, default=1.0)
    g.add_argument("--image_clean_prob", type=float, default=0.4, help="Share of clean images (image-to-text).")
    g.add_argument("--text_clean_prob", type=float, default=0.4, help="Share of clean captions (text-to-image).")
    g.add_argument(
        "--cond_dropout_prob",
        type=float,
        default=0.075,
        help="Per modality: share at full noise (guidance's unconditional).",
    )
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_schedule", default="squaredcos_cap_v2", help="DDPMScheduler beta schedule.")
    g.add_argument("--prediction_type", default="v_prediction", choices=["v_prediction", "epsilon"])
    g.add_argument(
        "--text_shift",
        type=float,
        default=40.0,
        help="Divides every SNR of the caption's schedule by shift^2 (1: none).",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="output_image_continuous")
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
    g.add_argument("--guidance_scale", type=float, default=4.5, help="Text-to-image guidance (1: none).")
    g.add_argument("--text_guidance_scale", type=float, default=3.0, help="Image-to-text guidance (1: none).")
    g.add_argument("--validation_guidance_scales", type=float_list, default=[1.0, 2.0, 4.0], help="Grid columns.")
    g.add_argument("--num_inference_steps", type=int, default=20, help="DPM-Solver++ steps (both modalities).")
    g.add_argument(
        "--text_decoder",
        choices=["retrieval", "mlm"],
        default="retrieval",
        help="Caption from embeddings: the nearest training caption, or the encoder's masked-LM head.",
    )
    g.add_argument("--max_retrieval_captions", type=int, default=20000)
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
    g.add_argument("--tracker_project_name", default="train_image_continuous")

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
    shares = (args.image_clean_prob, args.text_clean_prob, 2 * args.cond_dropout_prob)
    if min(shares) < 0 or sum(shares) > 1:
        fail("--image_clean_prob + --text_clean_prob + 2 * --cond_dropout_prob: each >= 0, the sum at most 1")
    if args.text_shift <= 0:
        fail(f"--text_shift {args.text_shift}: must be > 0")
    if args.dim_image % args.num_heads:
        fail(f"--dim_image {args.dim_image}: must be divisible by --num_heads {args.num_heads}")
    if args.resolution % args.patch_size:
        fail(f"--resolution {args.resolution}: must be divisible by --patch_size {args.patch_size}")
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


# Copied from train_image_discrete.detect_dataset
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


# ---- Data ----
# Copied from train_image_discrete.Data
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


# Copied from train_image_discrete.load_mnist
def load_mnist(root, train, template, n=None):
    """The first n MNIST images (uint8 [n, 1, 28, 28], white on black) and their captions."""
    import torchvision

    try:
        mnist = torchvision.datasets.MNIST(root, train=train, download=False)
    except RuntimeError as e:
        fail(f"--data_root {root}: cannot read MNIST/raw ({e})")
    return mnist.data[:n].unsqueeze(1), [template.format(DIGIT_WORDS[int(d)]) for d in mnist.targets[:n]]


# Copied from train_image_discrete.load_image
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


# Copied from train_image_discrete.read_pairs
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


# Copied from train_image_discrete.load_pairs
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


# Copied from train_image_discrete.load_precomputed
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


# Copied from train_image_discrete.caption_table
def caption_table(captions):
    """Distinct captions (first-seen order) and each example's index into them."""
    table = {}
    ids = torch.tensor([table.setdefault(c, len(table)) for c in captions])
    return list(table), ids


# Copied from train_image_discrete.build_dataset
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


# Copied from train_image_discrete.encode_images
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


# Copied from train_image_discrete.load_vae
def load_vae(name_or_path, what="--vae_name_or_path"):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(name_or_path).requires_grad_(False).eval()
    except (OSError, ValueError) as e:
        fail(f"{what} {name_or_path}: cannot load an AutoencoderKL there ({type(e).__name__})")


# Copied from train_image_discrete.latent_scaling
def latent_scaling(vae):
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


# Copied from train_image_discrete.to_model_input
def to_model_input(mean, std, kind, scaling, generator):
    """A batch in the model's space: pixels in [-1, 1], or a scaled latent drawn from the posterior."""
    if kind == "pixels":
        return mean.float().div(127.5).sub(1.0)
    scale, shift = scaling
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * noise - shift) * scale


# Copied from train_image_discrete.to_images
def to_images(x, kind, vae, scaling):
    """Model-space images -> uint8 [n, C, H, W]."""
    if kind == "latents":
        scale, shift = scaling
        x = vae.decode((x / scale + shift).to(vae.device, vae.dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ---- Models ----
# Copied from train_image_discrete.ImagePatchEncoder
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


# Copied from train_image_discrete.modulate
def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


# Copied from train_image_discrete.StreamBlock
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


# Copied from train_image_discrete.MMDiTBlock
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


# Copied from train_image_discrete.FinalLayer
class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.adaln(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# Copied from train_image_discrete.MMDiT
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


class BertTextEncoder(nn.Module):
    """A frozen transformers AutoModel with its tokenizer: captions -> last hidden states [n, L, D]."""

    def __init__(self, name_or_path, prefix, max_length):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            name = f"--text_encoder_name_or_path {name_or_path}"
            fail(f"{name}: cannot load it ({type(e).__name__}); pass a folder or hub id")
        model = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model  # T5
        self.model = model.requires_grad_(False).eval()
        self.name_or_path, self.prefix, self.max_length = name_or_path, prefix, max_length

    @torch.no_grad()
    def forward(self, captions, batch_size=256):
        device, states = next(self.model.parameters()).device, []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                [self.prefix + c for c in captions[i : i + batch_size]],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            output = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            states.append(output.last_hidden_state.float().cpu())  # a large dataset's table stays on the host
        return torch.cat(states)


def resolve_dim_text(args):
    """The encoder's hidden size, read before its weights load."""
    from transformers import AutoConfig

    name = args.text_encoder_name_or_path
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        fail(f"--text_encoder_name_or_path {name}: cannot load it ({type(e).__name__}); pass a folder or hub id")
    hidden = getattr(config, "hidden_size", None) or config.d_model
    if args.dim_text is not None and args.dim_text != hidden:
        fail(
            f"--dim_text {args.dim_text} does not match the hidden size of --text_encoder_name_or_path {name} "
            f"({hidden}): pass --dim_text {hidden}"
        )
    if args.text_latent_dim is not None and not 0 <= args.text_latent_dim <= hidden:
        fail(f"--text_latent_dim {args.text_latent_dim}: must be in [0, {hidden}] (the encoder's width)")
    return hidden


def caption_chunks(table, caption_ids, device, size=CAPTION_CHUNK):
    """The caption table [n, L, D] and each caption's number of examples, a chunk of captions at a time on
    `device`: a large dataset's table (COCO: 29 GB at L=16, D=768) never sits there whole."""
    weights = torch.bincount(caption_ids.cpu(), minlength=len(table)).float()
    for i in range(0, len(table), size):
        yield table[i : i + size].to(device), weights[i : i + size].to(device)


def text_statistics(table, caption_ids, device):
    """Per-dimension mean and std of the caption states over every token of every example."""
    count = len(caption_ids) * table.shape[1]
    mean = sum((x * w[:, None, None]).sum(dim=(0, 1)) for x, w in caption_chunks(table, caption_ids, device)) / count
    squares = sum(
        ((x - mean) ** 2 * w[:, None, None]).sum(dim=(0, 1)) for x, w in caption_chunks(table, caption_ids, device)
    )
    return mean, (squares / count).sqrt().clamp(min=1e-4)


def text_basis(table, mean, std, caption_ids, latent_dim, device):
    """The top latent_dim principal directions [D, latent_dim] of the standardised caption tokens (0: the
    identity) and the share of the variance they hold. Orthonormal, so distances between captions are kept."""
    dim = table.shape[-1]
    if latent_dim == 0:
        return torch.eye(dim, device=device), 1.0
    covariance = 0
    for x, w in caption_chunks(table, caption_ids, device):
        tokens = ((x - mean) / std).double().flatten(0, 1)  # [chunk * L, D]
        covariance = covariance + (tokens * w.double().repeat_interleave(x.shape[1])[:, None]).T @ tokens
    values, vectors = torch.linalg.eigh(covariance / (len(caption_ids) * table.shape[1]))  # ascending eigenvalues
    kept = float(values.flip(-1)[:latent_dim].sum() / values.sum().clamp(min=1e-12))
    return vectors.flip(-1)[:, :latent_dim].float().contiguous(), kept


class TextImageModel(ModelMixin, ConfigMixin):
    """The MMDiT, a learned position embedding of the caption tokens, and as buffers the caption's standardisation
    (text_mean, text_std) and projection (text_basis [encoder_dim, dim_text])."""

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
        max_text_length=16,
        encoder_dim=768,
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
        # At high noise nothing else tells the text stream which token is which.
        self.text_position = nn.Parameter(torch.randn(1, max_text_length, dim_text) * 0.02)
        self.register_buffer("text_mean", torch.zeros(encoder_dim))
        self.register_buffer("text_std", torch.ones(encoder_dim))
        self.register_buffer("text_basis", torch.eye(encoder_dim, dim_text))

    def forward(self, image, t_image, text, t_text, key_mask=None):
        return self.mmdit(image, t_image, text + self.text_position[:, : text.shape[1]], t_text, key_mask)

    def standardise(self, states):
        """Encoder states [.., D] -> latent [.., dim_text]."""
        return ((states - self.text_mean) / self.text_std) @ self.text_basis

    def unstandardise(self, e):
        return (e @ self.text_basis.T) * self.text_std + self.text_mean

    def clip_text(self, e, clip):
        """Clip a caption latent to +-clip in standardised units of the encoder's dimensions."""
        return (e @ self.text_basis.T).clamp(-clip, clip) @ self.text_basis


def load_mlm_head(name_or_path):
    """The encoder's trained masked-LM head (e.g. BertForMaskedLM's `cls`), or None."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a folder without a head is the common case, not a warning
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True)
    except (OSError, ValueError, KeyError):
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    if head is None or any(k.startswith(("cls.", "lm_head.")) for k in info["missing_keys"]):
        return None  # transformers would have initialised it randomly
    return head.requires_grad_(False).eval()


def nearest_caption_index(generated, table):
    """The row of `table` (caption latents) nearest in L2 to each generated caption."""
    return torch.cdist(generated.flatten(1).float(), table.flatten(1).float()).argmin(dim=1)


def nearest_captions(generated, table, captions):
    return [captions[i] for i in nearest_caption_index(generated, table).tolist()]


# ---- Objective ----
def build_noise_scheduler(args):
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        clip_sample=False,
    )


def text_betas(config, shift):
    """The caption's betas: the image's with every SNR divided by shift^2 (None at shift 1), as if the caption were
    scaled by 1 / shift (Chen et al. 2023)."""
    if shift == 1.0:
        return None
    abar = DDPMScheduler(
        num_train_timesteps=config["num_train_timesteps"], beta_schedule=config["beta_schedule"]
    ).alphas_cumprod.double()
    abar = abar / (abar + shift**2 * (1 - abar))
    return (1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])).tolist()


def noise_modality(noise_scheduler, x0, clean, dropped, generator):
    """x_t at a uniform timestep; exactly x0 at t=0 where clean, the last timestep where dropped."""
    n, num_t = x0.shape[0], noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (n,), generator=generator, device=x0.device)
    t = torch.where(clean, 0, torch.where(dropped, num_t - 1, t))
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = noise_scheduler.add_noise(x0, eps, t)
    x_t = torch.where(clean.view(-1, *[1] * (x0.ndim - 1)), x0, x_t)
    return x_t, eps, t


def training_target(noise_scheduler, x0, eps, t):
    if noise_scheduler.config.prediction_type == "epsilon":
        return eps
    return noise_scheduler.get_velocity(x0, eps, t)


def training_step(model, noise_scheduler, text_scheduler, x0, e0, encoder_dim, args, generator):
    """Per-example image and caption losses; a clean or dropped modality has none."""
    n, num_t = x0.shape[0], noise_scheduler.config.num_train_timesteps
    # Per example: image clean (image-to-text), caption clean (text-to-image), caption or image at full noise
    # (unconditional), else both noised at independent timesteps (joint).
    u = torch.rand(n, generator=generator, device=x0.device)
    shares = [args.image_clean_prob, args.text_clean_prob, args.cond_dropout_prob, args.cond_dropout_prob]
    bucket = sum(u >= edge for edge in np.cumsum(shares))
    image_clean, text_clean, text_dropped, image_dropped = (bucket == i for i in range(4))
    x_t, eps_image, t_image = noise_modality(noise_scheduler, x0, image_clean, image_dropped, generator)
    e_t, eps_text, t_text = noise_modality(text_scheduler, e0, text_clean, text_dropped, generator)
    pred_image, pred_text = model(x_t, t_image.float() / num_t, e_t, t_text.float() / num_t)
    target_image = training_target(noise_scheduler, x0, eps_image, t_image)
    target_text = training_target(text_scheduler, e0, eps_text, t_text)
    image_loss = F.mse_loss(pred_image.float(), target_image.float(), reduction="none").mean(dim=(1, 2, 3))
    # Divided by the encoder's hidden size, not the latent's: the caption weighs the same whatever
    # --text_latent_dim is (averaged over the latent, it outweighs the image).
    text_loss = F.mse_loss(pred_text.float(), target_text.float(), reduction="none").sum(dim=(1, 2))
    text_loss = text_loss / (e0.shape[1] * encoder_dim)
    return image_loss * (~image_clean & ~image_dropped), text_loss * (~text_clean & ~text_dropped)


# ---- Sampling ----
def build_sampler(noise_scheduler_config):
    """DPM-Solver++ (2nd order) stepping on the x0 the samplers compute and clip; one per modality."""
    return DPMSolverMultistepScheduler.from_config(
        noise_scheduler_config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        prediction_type="sample",
    )


def x0_from_prediction(x_t, pred, t, alphas_cumprod, prediction_type, clip=None):
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), or sqrt(abar) x_t - sqrt(1 - abar) v; clipped to +-clip."""
    abar = alphas_cumprod[t].to(x_t.device).view(-1, *[1] * (x_t.ndim - 1))
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
    else:
        x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * pred
    return x0 if clip is None else x0.clamp(-clip, clip)


@torch.no_grad()
def sample(model, ctx, given, draw_image, guidance_scale, num_steps, generator, given_t=0.0):
    """The image from the caption latents `given` (draw_image), or the caption latents from the image `given` at
    timestep given_t (0: clean). Guidance's unconditional branch has `given` at full noise."""
    n, device, num_t = given.shape[0], given.device, ctx.sampler.config.num_train_timesteps
    shape = ctx.shape if draw_image else (model.config.max_text_length, model.config.dim_text)
    x = torch.randn((n, *shape), generator=generator, device=device)
    t_given = torch.full((n,), given_t, device=device)
    guided = guidance_scale != 1.0
    if guided:
        given = torch.cat([torch.randn(given.shape, generator=generator, device=device), given])
        t_given = torch.cat([torch.full((n,), (num_t - 1) / num_t, device=device), t_given])
    sampler = DPMSolverMultistepScheduler.from_config((ctx.sampler if draw_image else ctx.text_sampler).config)
    sampler.set_timesteps(num_steps, device=device)
    alphas_cumprod = sampler.alphas_cumprod.to(device)  # on the CPU, while the timesteps are on `device`
    for t in sampler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        t_x = (t.float() / num_t).expand(len(x_in))
        pred = model(x_in, t_x, given, t_given)[0] if draw_image else model(given, t_given, x_in, t_x)[1]
        if guided:
            uncond, cond = pred.float().chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        clip = 1.0 if draw_image and ctx.kind == "pixels" else None
        x0 = x0_from_prediction(x, pred.float(), t.expand(n), alphas_cumprod, ctx.prediction_type, clip)
        x = sampler.step(x0 if draw_image else model.clip_text(x0, TEXT_CLIP), t, x).prev_sample
    return x


@torch.no_grad()
def sample_joint(model, ctx, n, guidance_scale, num_steps, generator):
    """Caption first, the image at full noise, snapped to the nearest training caption, then the image from it,
    guided: states training covers most. Returns the images and the captions' rows in ctx.retrieval_table."""
    num_t = ctx.sampler.config.num_train_timesteps
    no_image = torch.randn((n, *ctx.shape), generator=generator, device=ctx.device)
    e = sample(model, ctx, no_image, False, 1.0, num_steps, generator, given_t=(num_t - 1) / num_t)
    index = nearest_caption_index(e, ctx.retrieval_table)
    e = ctx.retrieval_table[index].to(e)
    return sample(model, ctx, e, True, guidance_scale, num_steps, generator), index


# ---- Validation ----
@dataclass
class Sampling:
    """What the samplers and the validation need besides the model."""

    text_encoder: BertTextEncoder
    retrieval_table: torch.Tensor  # caption latents [n, L, dim_text] of retrieval_captions
    retrieval_captions: list
    mlm_head: nn.Module | None
    text_decoder: str
    sampler: DPMSolverMultistepScheduler  # the image's
    text_sampler: DPMSolverMultistepScheduler  # the caption's
    prediction_type: str
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
    num_inference_steps: int


# Copied from train_image_discrete.validation_prompts
def validation_prompts(ctx):
    if ctx.dataset == "mnist":
        return [ctx.caption_template.format(w) for w in DIGIT_WORDS]
    return ctx.val_captions[:8]


# Copied from train_image_discrete.validation_images
def validation_images(data, scaling):
    """Held-out images in the model's space (the posterior mean for latents), or None."""
    if data.val_latent_mean is not None:
        scale, shift = scaling
        return (data.val_latent_mean - shift) * scale
    if data.val_pixels is None:
        return None
    return data.val_pixels.float().div(127.5).sub(1.0)


def generate_images(model, ctx, prompts, guidance_scale, seed, num_steps):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    e0 = model.standardise(ctx.text_encoder(prompts).to(ctx.device))
    x = sample(model, ctx, e0, True, guidance_scale, num_steps, generator)
    return to_images(x, ctx.kind, ctx.vae, ctx.scaling)


def generate_captions(model, ctx, x0, seed, decoder=None):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    e = sample(model, ctx, x0.to(ctx.device), False, ctx.text_guidance_scale, ctx.num_inference_steps, generator)
    if (decoder or ctx.text_decoder) == "mlm":  # the head's argmax token at each position, up to [SEP]
        ids = ctx.mlm_head.to(e.device)(model.unstandardise(e)).argmax(-1).tolist()
        tokenizer, sep = ctx.text_encoder.tokenizer, ctx.text_encoder.tokenizer.sep_token_id
        rows = [row[: row.index(sep)] if sep in row else row for row in ids]
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    return nearest_captions(e, ctx.retrieval_table, ctx.retrieval_captions)


def generate_joint(model, ctx, n, guidance_scale, seed, num_steps):
    generator = torch.Generator(ctx.device).manual_seed(seed)
    x, index = sample_joint(model, ctx, n, guidance_scale, num_steps, generator)
    return to_images(x, ctx.kind, ctx.vae, ctx.scaling), [ctx.retrieval_captions[i] for i in index.tolist()]


# Copied from train_image_discrete.show
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
    fig, axes = plt.subplots(
        len(prompts), len(scales), figsize=(1.3 * per_prompt * len(scales), 1.3 * len(prompts)), squeeze=False
    )
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

    decoders = ["retrieval"] + (["mlm"] if ctx.mlm_head is not None else [])
    lines = [
        f"# step {step}: captions generated for {ctx.val_source} (text guidance {ctx.text_guidance_scale:g}, "
        f"{ctx.num_inference_steps} steps; decoded by {' and '.join(decoders)})"
    ]
    if ctx.val_x0 is not None:
        generated = {d: generate_captions(model, ctx, ctx.val_x0, args.seed, d) for d in decoders}
        lines += [
            f"{i}\ttrue: {true}\t" + "\t".join(f"{d}: {generated[d][i]}" for d in decoders)
            for i, true in enumerate(ctx.val_captions)
        ]
    _, joint = generate_joint(model, ctx, 4, args.guidance_scale, args.seed, args.num_inference_steps)
    lines += ["# joint samples (a caption, then an image from it)"] + [f"joint {i}\t{c}" for i, c in enumerate(joint)]
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


# Copied from train_image_discrete.plot_loss
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


# Copied from train_image_discrete.read_sampling_inputs
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


# Copied from train_image_discrete.write_samples
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


# Copied from train_image_discrete.save_checkpoint
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


# Copied from train_image_discrete.load_checkpoint
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


def write_sampling_files(sampler, text_sampler, config, folder):
    """The image's sampler (scheduler/), the caption's (text_scheduler/) and export_config.json."""
    sampler.save_pretrained(folder / "scheduler")
    text_sampler.save_pretrained(folder / "text_scheduler")
    (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def model_card(args, global_step, metrics_path):
    """README.md of the export: the Hub's YAML front matter, how it was trained and how to sample it."""
    from huggingface_hub import ModelCardData

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
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

One MMDiT trained from scratch on {args.dataset} images ({space}) and captions (text encoder
`{args.text_encoder_name_or_path}`): it draws an image from a caption, a caption from an image, or both.
{global_step} optimizer steps; final loss {last["loss"]:.4f} (image {last["image_loss"]:.4f}, text
{last["text_loss"]:.4f}).

```bash
{" ".join(["python", SCRIPT, *sys.argv[1:]])}
python {SCRIPT} --sample_from THIS_FOLDER --output_dir samples
```

![samples at guidance {", ".join(f"{s:g}" for s in args.validation_guidance_scales)}](samples.png)
"""


# Copied from train_image_discrete.export_model
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


# Copied from train_image_discrete.write_run_config
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
def build_sampling(args, config, model, text_encoder, samplers, vae, table, val):
    """The Sampling of a training run or an export, from its export config; val: (images, captions, source)."""
    mlm_head = load_mlm_head(text_encoder.name_or_path)
    if args.text_decoder == "mlm" and mlm_head is None:
        fail(f"--text_decoder mlm: {text_encoder.name_or_path} has no masked-LM head weights; use retrieval")
    return Sampling(
        text_encoder=text_encoder,
        retrieval_table=table,
        retrieval_captions=config["retrieval_captions"],
        mlm_head=mlm_head,
        text_decoder=args.text_decoder,
        sampler=samplers[0],
        text_sampler=samplers[1],
        prediction_type=config["prediction_type"],
        device=table.device,
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
        num_inference_steps=args.num_inference_steps,
    )


def generate_from_export(args, accelerator):
    """--sample_from: the validation files and the samples of --prompts_file, --images_file, --num_joint_samples."""
    export, device = Path(args.sample_from), accelerator.device
    config = json.loads((export / EXPORT_CONFIG).read_text())
    if config.get("script") != SCRIPT:
        fail(f"--sample_from {export}: exported by {config.get('script')}, not {SCRIPT}")
    vae = load_vae(config["vae"]).to(device) if config["vae"] else None
    prompts, images = read_sampling_inputs(args, config, vae)
    subfolder = "mmdit" if (export / "mmdit").is_dir() else "mmdit_ema"  # an export, or a checkpoint with EMA
    model = TextImageModel.from_pretrained(export, subfolder=subfolder).to(device).eval()
    text_encoder = BertTextEncoder(config["text_encoder"], config["text_prefix"], config["max_text_length"]).to(device)
    table = model.standardise(text_encoder(config["retrieval_captions"]).to(device))
    args.data_root = args.data_root or config["data_root"]
    val = None, config["validation_prompts"], "no held-out images"
    if config["dataset"] == "mnist" and Path(args.data_root or "", "MNIST", "raw").is_dir():
        pixels, captions = load_mnist(
            Path(args.data_root), False, config["caption_template"], args.num_validation_images
        )
        val = pixels.float().div(127.5).sub(1.0), captions, "MNIST test images"
    samplers = [DPMSolverMultistepScheduler.from_pretrained(export / name) for name in ("scheduler", "text_scheduler")]
    ctx = build_sampling(args, config, model, text_encoder, samplers, vae, table, val)
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
    device = accelerator.device

    # Data: images (or VAE posteriors) and the distinct captions
    vae_name = args.vae_name_or_path
    vae = load_vae(vae_name).to(device) if vae_name else None
    data = build_dataset(args, vae)
    if data.vae_info is not None:  # shards: their VAE decodes the samples
        vae_name = vae_name or data.vae_info["name_or_path"]
        vae = vae or load_vae(vae_name, "--data_root index.json vae").to(device)
    scaling = latent_scaling(vae) if vae is not None else None
    if data.shape[-1] % args.patch_size or data.shape[-2] % args.patch_size:
        fail(f"--patch_size {args.patch_size}: does not divide the {data.shape[-2]}x{data.shape[-1]} image grid")
    train_dataloader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*data.tensors),
        batch_size=args.train_batch_size,
        shuffle=True,
        # a full batch for every process, else every epoch is empty
        drop_last=len(data.tensors[0]) >= args.train_batch_size * accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )

    # Models: the frozen encoder (the distinct captions encoded once), the MMDiT and its EMA
    text_encoder = BertTextEncoder(args.text_encoder_name_or_path, args.text_prefix, args.tokenizer_max_length)
    caption_states = text_encoder.to(device)(data.captions)  # [distinct captions, L, D], on the host
    # Only now is the folder claimed: a bad input changes nothing there.
    if accelerator.is_main_process:
        claim_output_dir(args)
        write_run_config(args, accelerator)
    stop = StopRequest(accelerator)
    set_seed(args.seed)  # the same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)
    latent_dim = min(64, dim_text) if args.text_latent_dim is None else args.text_latent_dim or dim_text
    model = TextImageModel(
        in_channels=data.shape[0],
        image_size=data.shape[-1],
        patch_size=args.patch_size,
        dim_image=args.dim_image,
        dim_text=latent_dim,
        text_out_dim=latent_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        mlp_ratio=args.mlp_ratio,
        stem_channels=args.stem_channels,
        max_text_length=args.tokenizer_max_length,
        encoder_dim=dim_text,
    ).to(device)
    model.text_mean, model.text_std = text_statistics(caption_states, data.tensors[2], device)
    model.text_basis, kept = text_basis(
        caption_states,
        model.text_mean,
        model.text_std,
        data.tensors[2],
        0 if latent_dim == dim_text else latent_dim,
        device,
    )
    caption_embeddings = torch.cat([model.standardise(x.to(device)) for x in caption_states.split(CAPTION_CHUNK)])
    model.mmdit.gradient_checkpointing = args.gradient_checkpointing
    noise_scheduler = build_noise_scheduler(args)
    text_scheduler = DDPMScheduler.from_config(
        noise_scheduler.config, trained_betas=text_betas(noise_scheduler.config, args.text_shift)
    )
    samplers = build_sampler(noise_scheduler.config), build_sampler(text_scheduler.config)
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
        f"{len(data.captions)} distinct captions, text states {tuple(caption_states.shape[1:])} diffused "
        f"in {latent_dim} dimensions ({100 * kept:.2f}% of their variance)"
    )
    # export_config.json: what --sample_from needs besides the weights
    config = dict(
        script=SCRIPT,
        text_encoder=args.text_encoder_name_or_path,
        text_prefix=args.text_prefix,
        max_text_length=args.tokenizer_max_length,
        prediction_type=args.prediction_type,
        text_shift=args.text_shift,
        retrieval_captions=data.captions[: args.max_retrieval_captions],
        dataset=args.dataset,
        data_root=args.data_root,
        caption_template=args.caption_template,
        kind=data.kind,
        shape=list(data.shape),
        vae=vae_name,
        latent_scaling=list(scaling) if scaling else None,
    )
    val = validation_images(data, scaling), data.val_captions, data.val_source
    table = caption_embeddings[: args.max_retrieval_captions]
    ctx = build_sampling(args, config, model, text_encoder, samplers, vae, table, val)
    config["validation_prompts"] = validation_prompts(ctx)
    sampling_files = functools.partial(write_sampling_files, *samplers, config)

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
                e0 = caption_embeddings[caption_index]
                image_loss, text_loss = training_step(
                    model, noise_scheduler, text_scheduler, x0, e0, dim_text, args, train_rng
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
                    progress.set_postfix(
                        image=f"{image_l:.4f}", text=f"{text_l:.4f}", samples_s=f"{row['samples_per_s']:.0f}"
                    )
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
