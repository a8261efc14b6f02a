"""Fine-tune the UNet of a Stable Diffusion pipeline on image-caption pairs (or train a new one from scratch).

MSE on the noise (or v) of frozen-VAE latents, conditioned on frozen text states; caption dropout for classifier-free
guidance. Exports a StableDiffusionPipeline (EMA UNet, fp32).

    accelerate launch train_ldm_sd.py --dataset_name lambdalabs/naruto-blip-captions --mixed_precision bf16
    python train_ldm_sd.py --sample_from sd-model-finetuned/checkpoint-500 --output_dir samples-500
"""

import argparse
import atexit
import bisect
import errno
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import random
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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_DATASET = "lambdalabs/naruto-blip-captions"
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last: size and hash of every file
LOCK = "run.lock"

# --unet_from_scratch sizes (diffusers' defaults otherwise; up blocks mirror down blocks); the VAE and text encoder
# set the channels, cross_attention_dim and sample_size.
UNET_PRESETS = {
    "sd15": dict(
        block_out_channels=[320, 640, 1280, 1280], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    ),
    "small": dict(
        block_out_channels=[64, 128, 256],
        layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
    ),
    "mnist-small": dict(
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        attention_head_dim=16,
        norm_num_groups=8,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
    ),
    "tiny": dict(
        block_out_channels=[16, 32],
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    ),
}


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
    """Flags shared with diffusers' train_text_to_image.py keep its defaults unless the help says why."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument

    # Models
    add("--pretrained_model_name_or_path", help=f"Stable Diffusion hub id or folder; default {DEFAULT_MODEL}.")
    add("--revision")
    add("--variant", help="Weights variant, e.g. fp16.")
    add("--cache_dir")
    add("--unet_from_scratch", action="store_true", help="Train a new UNet of --unet_config.")
    add("--unet_config", default="small", help=f"UNet config JSON or one of {', '.join(UNET_PRESETS)}.")
    add("--vae_name_or_path", help="Instead of the folder's VAE.")
    add("--text_encoder_name_or_path", help="Instead of the folder's text encoder and tokenizer: CLIP, BERT or T5.")
    add("--tokenizer_max_length", type=int, help="Tokens per caption; default: the tokenizer's.")
    # Data: one source
    add("--dataset_name", help=f"datasets hub id, local dataset or save_to_disk folder; default {DEFAULT_DATASET}.")
    add("--dataset_config_name")
    add("--streaming", action="store_true", help="Stream --dataset_name (needs --max_train_steps).")
    add("--train_data_dir", help="Imagefolder with metadata.jsonl captions.")
    add("--precomputed_data_dir", help="Shards of prepare_data_multi_gpu.py.")
    add("--image_column", default="image")
    add("--caption_column", default="text")
    add("--max_samples", "--max_train_samples", type=int, help="Train on the first N examples.")
    add("--resolution", type=int, default=512)
    add("--dataloader_num_workers", type=int, default=0)
    add(
        "--image_interpolation_mode",
        default="lanczos",
        choices=[mode.name.lower() for mode in transforms.InterpolationMode],
    )
    add("--center_crop", action="store_true", help="Instead of a random crop.")
    add("--random_flip", action="store_true")
    # Objective
    add("--prediction_type", choices=["epsilon", "v_prediction"], help="Default: the folder's.")
    add("--snr_gamma", type=float, help="Min-SNR loss weighting, e.g. 5.")
    add("--noise_offset", type=float, default=0.0)
    add("--input_perturbation", type=float, default=0.0, help="Noise the input with eps + p * N(0, 1).")
    add("--rescale_betas_zero_snr", action="store_true", help="Zero terminal SNR; needs v_prediction.")
    add(
        "--cond_dropout_prob",
        "--proportion_empty_prompts",
        type=float,
        default=0.1,
        help="Probability of the empty prompt; on by default for classifier-free guidance.",
    )
    # Optimisation
    add("--output_dir", default="sd-model-finetuned")
    add("--seed", type=int, default=0, help="Fixed by default, so that resuming is exact.")
    add("--train_batch_size", "--batch_size", type=int, default=16, help="Per process.")
    add("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=100)
    add("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_warmup_steps", type=int, default=500)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_grad_norm", type=float, default=1.0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--scale_lr", action="store_true", help="Multiply --learning_rate by the total batch size.")
    add("--lr_scheduler", default="constant", help="constant, constant_with_warmup, linear, cosine, ...")
    add("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA).")
    add("--max_nonfinite_steps", type=int, default=10, help="Stop after N non-finite gradients in a row.")
    add(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Validate and export the UNet's EMA; on by default: it samples better.",
    )
    add("--ema_decay", type=float, default=0.9999, help="Largest decay.")
    add("--ema_power", type=float, default=2 / 3, help="Warmup: decay = 1 - (1 + step) ** -power.")
    add("--offload_ema", action="store_true", help="Keep the EMA in CPU memory.")
    add("--ema_update_every", type=int, default=1, help="Update the EMA every N steps, with their decay.")
    add("--foreach_ema", action="store_true", help="One torch._foreach call per EMA update (more memory).")
    # Speed and memory
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's config.")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--allow_tf32", action="store_true")
    add("--gradient_checkpointing", action="store_true")
    add("--enable_xformers_memory_efficient_attention", action="store_true")
    # Validation and sampling
    add("--validation_prompts", nargs="+", help="Default: the first 4 training captions.")
    add("--num_validation_images", type=int, default=2, help="Per prompt and guidance scale.")
    add("--validation_guidance_scales", type=float_list, default=[1.0, 3.0, 7.5], help="Columns of the grid.")
    add("--num_inference_steps", type=int, default=25, help="DPM-Solver++ steps.")
    add("--validation_epochs", type=int, help="Default 5.")
    add("--validation_steps", type=int, help="Instead of --validation_epochs.")
    add("--sample_from", help="Sample an export or checkpoint-N instead of training.")
    # Logging and checkpoints
    add("--logging_steps", type=int, default=10)
    add("--checkpointing_steps", type=int, default=500)
    add("--logging_dir", default="logs", help="TensorBoard folder in --output_dir.")
    add("--report_to", choices=["none", "tensorboard", "wandb", "all"], default="tensorboard")
    add("--tracker_project_name", default="text2image-fine-tune")
    add("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", help="A checkpoint folder, or latest in --output_dir.")
    add("--overwrite_output_dir", action="store_true", help="Delete another run's checkpoints in --output_dir.")
    for action in parser._actions:  # argparse shows the default of a flag with a help text only
        action.help = action.help or "(default: %(default)s)"
    return parser.parse_args(map(underscore_flag, sys.argv[1:] if argv is None else argv))


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
    """Cheap checks of flags and paths, before any data or model loads."""
    check_shared_flags(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    args.report_to = installed_trackers(args.report_to)
    if args.sample_from:  # generation only: the other flags do not apply
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(f"--sample_from {args.sample_from}: no {EXPORT_CONFIG}; pass a run's output_dir or checkpoint-N")
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged ({problem}); pass an intact export")
        return
    sources = [s for s in "dataset_name train_data_dir precomputed_data_dir".split() if getattr(args, s)]
    if len(sources) > 1:
        fail(f"--{', --'.join(sources)}: give one of them")
    args.dataset_name = args.dataset_name or (None if sources else DEFAULT_DATASET)
    args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or DEFAULT_MODEL
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        fail(f"--train_data_dir {args.train_data_dir}: no such folder")
    if args.train_data_dir and not any(p.is_file() for p in Path(args.train_data_dir).rglob("*")):
        fail(f"--train_data_dir {args.train_data_dir}: empty; pass a folder of images + metadata.jsonl")
    if args.precomputed_data_dir and not (Path(args.precomputed_data_dir) / "index.json").is_file():
        fail(f"--precomputed_data_dir {args.precomputed_data_dir}: no index.json; run prepare_data_multi_gpu.py")
    if args.streaming and not (args.dataset_name and args.max_train_steps):
        fail("--streaming: needs --dataset_name and --max_train_steps")
    if args.resolution % 8:
        fail(f"--resolution {args.resolution}: must be a multiple of 8")
    for flag in ("validation_epochs", "ema_update_every"):
        if (value := getattr(args, flag)) is not None and value < 1:
            fail(f"--{flag} {value}: must be at least 1")
    if args.validation_steps is None:
        args.validation_epochs = args.validation_epochs or 5
    elif args.validation_epochs is not None:
        fail("--validation_epochs and --validation_steps: give one of them")
    if args.unet_from_scratch and args.unet_config not in UNET_PRESETS and not Path(args.unet_config).is_file():
        fail(f"--unet_config {args.unet_config}: neither a JSON file nor one of {', '.join(UNET_PRESETS)}")
    for flag, package in (
        ("enable_xformers_memory_efficient_attention", "xformers"),
        ("use_8bit_adam", "bitsandbytes"),
    ):
        if getattr(args, flag) and not importlib.util.find_spec(package):
            fail(f"--{flag}: {package} is not installed (pip install {package})")


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
def decode_image(raw, mode):
    """A PIL image in `mode` from a datasets {"path", "bytes"} dict, a PIL image or a path; None when unreadable.
    16-bit images are scaled to 8 bits and transparent pixels become white (convert() would clip the one and
    blacken the other); CMYK and palette images are converted."""
    try:
        if isinstance(raw, dict):
            raw = io.BytesIO(raw["bytes"]) if raw.get("bytes") else raw["path"]
        image = raw if isinstance(raw, Image.Image) else Image.open(raw)
        image.load()
        if image.mode.startswith("I"):  # 16-bit grey: 0..65535 to 0..255
            image = image.convert("I").point(lambda v: v / 257)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        return image.convert(mode)
    except Exception:  # truncated, not an image, missing file: skipped and counted
        return None


class ImageCaptions:
    """Rows to examples: resize, crop, tokenize. Crops and caption choices are seeded by (seed, example, epoch), so
    resuming repeats them."""

    def __init__(self, args, tokenizer, max_length, mode):
        self.args, self.tokenizer, self.max_length, self.mode = args, tokenizer, max_length, mode
        self.resize = transforms.Resize(
            args.resolution, transforms.InterpolationMode[args.image_interpolation_mode.upper()]
        )
        self.epoch = 0

    def crop(self, image, caption, position):
        rng = random.Random((self.args.seed * 1_000_003 + position) * 10_007 + self.epoch)
        if isinstance(caption, (list, tuple)):
            caption = rng.choice(caption) if caption else ""
        image = self.resize(image)
        (w, h), r = image.size, self.args.resolution
        if self.args.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = rng.randint(0, h - r), rng.randint(0, w - r)
        return image.crop((left, top, left + r, top + r)), caption or ""

    def examples(self, crops):
        """[(image, caption)] -> examples; pixels in [-1, 1]."""
        tokens = self.tokenizer(
            [c for _, c in crops],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        pixels = np.stack([np.asarray(image, dtype=np.uint8).reshape(*image.size[::-1], -1) for image, _ in crops])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div(255).sub_(0.5).div_(0.5)
        return [
            {"pixel_values": pixels[k], "input_ids": tokens.input_ids[k], "attention_mask": tokens.attention_mask[k]}
            for k in range(len(crops))
        ]


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A datasets.Dataset; an unreadable image is replaced by the next readable one and counted (num_bad)."""

    def __init__(self, ds, make):
        self.ds, self.make = ds, make

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.make.epoch = epoch

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        args = self.make.args
        rows = self.ds[list(indices)]  # the selected columns, one read per batch
        crops, bad = [], []
        for k, i in enumerate(indices):
            row, j = {c: v[k] for c, v in rows.items()}, i
            while (image := decode_image(row[args.image_column], self.make.mode)) is None:
                j = (j + 1) % len(self.ds)
                if j == i:
                    raise RuntimeError("no image of the dataset is readable")
                row = self.ds[j]
            crops.append(self.make.crop(image, row[args.caption_column], j))
            bad.append((j - i) % len(self.ds))
        return [{**e, "num_bad": n} for e, n in zip(self.make.examples(crops), bad, strict=True)]


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    def __init__(self, ds, make):
        self.ds, self.make = ds, make

    def set_epoch(self, epoch):
        self.make.epoch = epoch
        self.ds.set_epoch(epoch)

    def __iter__(self):
        args, bad = self.make.args, 0
        for position, row in enumerate(self.ds):
            image = decode_image(row[args.image_column], self.make.mode)
            if image is None:
                bad += 1
                continue
            example = self.make.examples([self.make.crop(image, row[args.caption_column], position)])[0]
            yield {**example, "num_bad": bad}
            bad = 0


class PrecomputedDataset(torch.utils.data.Dataset):
    """Rows of prepare_data_multi_gpu.py's shards, read through mmap."""

    def __init__(self, root, index, max_samples):
        self.files = [Path(root) / s["file"] for s in index["shards"]]
        self.offsets = [0, *itertools.accumulate(s["num_examples"] for s in index["shards"])]
        self.length = min(max_samples or self.offsets[-1], self.offsets[-1])
        flipped = ["latent_mean_flipped", "latent_std_flipped"] if index.get("random_flip") else []
        self.keys = {k: k for k in ["latent_mean", "latent_std", *flipped]}  # item key: shard key
        self.keys["hidden_states"] = f"{index['text_encoders'][0]['key']}.hidden_states"
        self.handles = {}

    def __len__(self):
        return self.length

    def __getstate__(self):  # safetensors handles do not pickle: each DataLoader worker opens its own
        return {**self.__dict__, "handles": {}}

    def __getitem__(self, i):
        s = bisect.bisect_right(self.offsets, i) - 1
        if s not in self.handles:
            self.handles[s] = safe_open(str(self.files[s]), framework="pt")
        f, r = self.handles[s], i - self.offsets[s]
        return {k: f.get_slice(key)[r : r + 1][0] for k, key in self.keys.items()}

    def captions(self, k):
        with safe_open(str(self.files[0]), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("captions", "[]"))[:k]


def read_precomputed_index(args):
    index = json.loads((Path(args.precomputed_data_dir) / "index.json").read_text())
    flag = f"--precomputed_data_dir {args.precomputed_data_dir}"
    if index.get("format") != "precomputed-diffusion-shards" or index.get("version") != 1:
        fail(f"{flag}: not a version-1 folder of prepare_data_multi_gpu.py")
    if not index.get("vae") or not index.get("text_encoders"):
        fail(f"{flag}: the shards need VAE latents and text states; run prepare_data_multi_gpu.py with both models")
    if args.random_flip and not index.get("random_flip"):
        fail(f"{flag}: --random_flip needs flipped latents; prepare the shards with --random_flip")
    check_shards_text_encoder(args, index)
    return index


def local_name(name_or_path):
    """An existing path made absolute ("sd" is "./sd/"), a hub id unchanged."""
    return str(Path(name_or_path).resolve()) if name_or_path and Path(name_or_path).exists() else name_or_path


def text_encoder_source(args):
    """(name_or_path, subfolder, flag), as vae_source."""
    if args.text_encoder_name_or_path:
        return args.text_encoder_name_or_path, "", "--text_encoder_name_or_path"
    return args.pretrained_model_name_or_path, "text_encoder", "--pretrained_model_name_or_path"


def check_shards_text_encoder(args, index):
    """The shards' captions must be encoded by this run's text encoder and tokenizer, at its length."""
    entry = index["text_encoders"][0]
    path, sub, option = text_encoder_source(args)
    ours, our_tokenizer = (f"{path}/{sub}", f"{path}/tokenizer") if sub else (path, path)
    theirs, their_tokenizer = entry.get("name_or_path"), entry.get("tokenizer") or our_tokenizer
    if (local_name(theirs), local_name(their_tokenizer)) != (local_name(ours), local_name(our_tokenizer)):
        parent, _, last = str(theirs).rpartition("/")
        if last == "text_encoder" and parent:
            fix = f"--pretrained_model_name_or_path {parent} without --text_encoder_name_or_path"
        else:
            fix = f"--text_encoder_name_or_path {theirs}"
        fail(
            f"--precomputed_data_dir {args.precomputed_data_dir}: captions encoded by {theirs} (tokenizer "
            f"{entry.get('tokenizer')}), not {ours} ({option}); pass {fix}, or re-encode the shards"
        )
    if args.tokenizer_max_length not in (None, entry["max_length"]):
        fail(f"--tokenizer_max_length {args.tokenizer_max_length}: the shards hold {entry['max_length']} tokens")


def check_shards_fit(args, index, text_encoder, vae):
    """The shards' text states and latents must fit this run's text encoder and VAE."""
    flag, enc = f"--precomputed_data_dir {args.precomputed_data_dir}", index["text_encoders"][0]
    hidden, channels = text_encoder.config.hidden_size, vae.config.latent_channels
    if (enc["hidden_size"], index["vae"]["latent_channels"]) != (hidden, channels):
        fail(f"{flag}: {enc['hidden_size']}-d text and {index['vae']['latent_channels']}-channel latents do not fit")
    mask = text_uses_mask(text_encoder)
    if enc.get("use_attention_mask", mask) != mask or enc.get("prefix"):
        fail(
            f"{flag}: text states encoded with another attention mask or a prefix; prepare them with "
            "--text_encoder_attention_mask auto, no --text_prefix"
        )
    if not math.isclose(index["vae"]["scaling_factor"], vae.config.scaling_factor, rel_tol=1e-6):
        fail(f"{flag}: encoded with a VAE of another scaling factor; re-encode the shards")


def vae_source(args, index):
    """(name_or_path, subfolder, flag): index.json's VAE (older shards have no subfolder), --vae_name_or_path or
    the folder's."""
    if index is not None:
        name, sub = index["vae"]["name_or_path"], index["vae"].get("subfolder")
        full = f"{name}/{sub}" if sub else name
        if args.vae_name_or_path and local_name(args.vae_name_or_path) != local_name(full):
            fail(f"--vae_name_or_path {args.vae_name_or_path}: the shards were encoded by {full}; drop the flag")
        return name, sub, f"--precomputed_data_dir {args.precomputed_data_dir} (index.json's VAE)"
    if args.vae_name_or_path:
        return args.vae_name_or_path, None, "--vae_name_or_path"
    return args.pretrained_model_name_or_path, "vae", "--pretrained_model_name_or_path"


def load_hf_dataset(args):
    """The datasets.Dataset (or IterableDataset) of --dataset_name or --train_data_dir, images undecoded."""
    import datasets

    flag = "--train_data_dir" if args.train_data_dir else "--dataset_name"
    try:
        if args.train_data_dir:
            ds = datasets.load_dataset(
                "imagefolder", data_dir=args.train_data_dir, split="train", cache_dir=args.cache_dir
            )
        elif (Path(args.dataset_name) / "state.json").is_file():
            ds = datasets.load_from_disk(args.dataset_name)  # a Dataset; load_dataset reads a DatasetDict's folder
        else:
            ds = datasets.load_dataset(
                args.dataset_name,
                args.dataset_config_name,
                split="train",
                streaming=args.streaming,
                cache_dir=args.cache_dir,
            )
    except (OSError, ValueError) as e:
        fail(
            f"{flag} {args.train_data_dir or args.dataset_name}: cannot load it "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        )
    columns = list(ds.column_names or ds.features or {})
    for flag in ("image_column", "caption_column"):
        if getattr(args, flag) not in columns:
            fail(f"--{flag} {getattr(args, flag)!r}: not a column; pass one of {', '.join(columns)}")
    ds = ds.select_columns([args.image_column, args.caption_column])
    ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
    if args.streaming:
        ds = ds.shuffle(seed=args.seed, buffer_size=1000)
        return ds.take(args.max_samples) if args.max_samples else ds
    if len(ds) == 0:
        fail("the dataset is empty")
    return ds.select(range(min(args.max_samples, len(ds)))) if args.max_samples else ds


def build_dataset(args, tokenizer, max_length, vae_channels, index):
    """The training dataset and up to 4 of its captions (default validation prompts)."""
    if index is not None:
        dataset = PrecomputedDataset(args.precomputed_data_dir, index, args.max_samples)
        return dataset, dataset.captions(4)
    ds = load_hf_dataset(args)
    make = ImageCaptions(args, tokenizer, max_length, "L" if vae_channels == 1 else "RGB")
    first = [r[args.caption_column] for r in ds.take(4)] if args.streaming else ds[:4][args.caption_column]
    first = [(c[0] if c else "") if isinstance(c, list) else str(c or "") for c in first]  # several, or none
    return (StreamingImageCaptionDataset if args.streaming else ImageCaptionDataset)(ds, make), first


# ---- Models ----
def load_text_encoder(args):
    """(tokenizer, frozen text encoder)"""
    path, sub, flag = text_encoder_source(args)
    try:
        config = AutoConfig.from_pretrained(path, subfolder=sub, revision=args.revision, cache_dir=args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder="tokenizer" if sub else "", revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as e:
        fail(f"{flag} {path}: cannot load a text encoder and tokenizer from it ({type(e).__name__})")
    model_cls = {"clip": CLIPTextModel, "t5": T5EncoderModel}.get(config.model_type, AutoModel)  # their text parts
    model = model_cls.from_pretrained(
        path, subfolder=sub, revision=args.revision, variant=args.variant if sub else None, cache_dir=args.cache_dir
    )
    return tokenizer, model.requires_grad_(False).eval()


def load_vae(args, source):
    """The frozen AutoencoderKL that vae_source names."""
    path, sub, flag = source
    try:
        vae = AutoencoderKL.from_pretrained(
            path, subfolder=sub, revision=args.revision, variant=args.variant if sub else None, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as e:
        fail(f"{flag} {path}: cannot load an AutoencoderKL from it (subfolder {sub}; {type(e).__name__})")
    return vae.requires_grad_(False).eval()


def latent_scale(vae):
    """z = latent * scaling_factor, unshifted: StableDiffusionPipeline adds no shift_factor back when decoding."""
    return {
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": 0.0,
        "vae_shift_factor_not_applied": vae.config.get("shift_factor") or 0.0,
    }


def build_unet(args, latent_channels, latent_size, cross_attention_dim):
    """The folder's UNet, or a new one of --unet_config."""
    if not args.unet_from_scratch:
        try:
            unet = UNet2DConditionModel.from_pretrained(
                args.pretrained_model_name_or_path,
                subfolder="unet",
                revision=args.revision,
                variant=args.variant,
                cache_dir=args.cache_dir,
            )
        except (OSError, ValueError) as e:
            fail(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no loadable unet/ "
                f"({type(e).__name__}); or train a new one with --unet_from_scratch"
            )
        if (unet.config.in_channels, unet.config.cross_attention_dim) != (latent_channels, cross_attention_dim):
            fail(
                f"--pretrained_model_name_or_path: its UNet takes {unet.config.in_channels} channels and "
                f"{unet.config.cross_attention_dim}-d text, not {latent_channels} and {cross_attention_dim}; use "
                "matching components or --unet_from_scratch"
            )
        return unet
    if args.unet_config in UNET_PRESETS:
        config = dict(UNET_PRESETS[args.unet_config])
        config["up_block_types"] = [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]
    else:
        config = {k: v for k, v in json.loads(Path(args.unet_config).read_text()).items() if not k.startswith("_")}
    halvings = len(config["block_out_channels"]) - 1
    if latent_size % 2**halvings:
        fail(f"--resolution {args.resolution}: the UNet of --unet_config halves the latents {halvings} times")
    config.update(
        in_channels=latent_channels,
        out_channels=latent_channels,
        sample_size=latent_size,
        cross_attention_dim=cross_attention_dim,
    )
    return UNet2DConditionModel(**config)


def build_noise_scheduler(args):
    """The folder's DDPM schedule with --prediction_type and --rescale_betas_zero_snr."""
    try:
        config = DDPMScheduler.load_config(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as e:
        fail(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no scheduler/ ({type(e).__name__})"
        )
    overrides = {"prediction_type": args.prediction_type or config.get("prediction_type", "epsilon")}
    if args.rescale_betas_zero_snr:
        # At zero terminal SNR the last input is pure noise: predicting the noise says nothing of the image.
        if overrides["prediction_type"] == "epsilon":
            fail("--rescale_betas_zero_snr: cannot learn --prediction_type epsilon; use --prediction_type v_prediction")
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDPMScheduler.from_config(config, **overrides)


def build_sampler(noise_scheduler):
    """The validation and export sampler."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2)


def text_uses_mask(text_encoder):
    """As StableDiffusionPipeline: the attention mask only when the config says so."""
    return bool(getattr(text_encoder.config, "use_attention_mask", False))


class StridedEMA(EMAModel):
    """EMAModel whose update may stand for several steps (--ema_update_every), with the product of their decays."""

    stride = 1

    def get_decay(self, optimization_step):
        return math.prod(map(super().get_decay, range(optimization_step, optimization_step + self.stride)))

    def step_over(self, parameters, steps):
        self.stride = steps
        try:
            self.step(parameters)
        finally:
            self.stride = 1
        self.optimization_step += steps - 1


@dataclass
class TrainState:
    """What the EMA updates and validation read."""

    accelerator: Accelerator
    unet: torch.nn.Module
    params: list  # the UNet's parameters, as the optimizer holds them
    ema: StridedEMA | None
    ema_inputs: list  # params, or their CPU copies with --offload_ema
    global_step: int
    ema_step: int  # the optimizer step whose weights the EMA averaged last
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: object
    sampler: DPMSolverMultistepScheduler
    prompts: list


def catch_up_ema(state):
    """Average the current weights into the EMA for every step since its last update."""
    steps = state.global_step - state.ema_step
    if state.ema is None or steps <= 0:
        return
    if state.ema_inputs is not state.params:
        with torch.no_grad():
            torch._foreach_copy_(state.ema_inputs, state.params)
    state.ema.step_over(state.ema_inputs, steps)
    state.ema_step = state.global_step


# ---- Objective ----
def coin(n, p, generator, device):
    return torch.rand(n, generator=generator, device=device) < p


@torch.no_grad()
def batch_to_latents(batch, vae, latent_info, args, generator, weight_dtype):
    """z_0 = (mean + std * N(0, 1)) * scaling_factor: a fresh posterior draw at every step."""
    device = generator.device
    if "pixel_values" in batch:
        x = batch["pixel_values"].to(device)
        if args.random_flip:
            x = torch.where(coin(len(x), 0.5, generator, device)[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x.to(weight_dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
    else:
        mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
        if args.random_flip:
            flip = coin(len(mean), 0.5, generator, device)[:, None, None, None]
            mean = torch.where(flip, batch["latent_mean_flipped"].to(device).float(), mean)
            std = torch.where(flip, batch["latent_std_flipped"].to(device).float(), std)
    eps = torch.randn(mean.shape, generator=generator, device=device)
    return (mean + std * eps) * latent_info["scaling_factor"]


@torch.no_grad()
def batch_to_text_states(batch, text_encoder, empty_states, args, generator):
    """Caption states, each the empty prompt's with probability --cond_dropout_prob."""
    device = generator.device
    if "hidden_states" in batch:
        states = batch["hidden_states"].to(device).float()
    else:
        mask = batch["attention_mask"].to(device) if text_uses_mask(text_encoder) else None
        states = text_encoder(batch["input_ids"].to(device), attention_mask=mask)[0].float()
    drop = coin(len(states), args.cond_dropout_prob, generator, device)[:, None, None]
    return torch.where(drop, empty_states.to(states.dtype), states)


def training_step(unet, noise_scheduler, latents, states, args, generator):
    """Per-sample losses at random timesteps, and the timesteps."""
    n, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    model_input_noise = noise
    if args.input_perturbation:  # the target stays `noise`
        model_input_noise = noise + args.input_perturbation * torch.randn(
            noise.shape, generator=generator, device=device
        )
    noisy = noise_scheduler.add_noise(latents, model_input_noise, timesteps)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=states).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma:
        per_sample = per_sample * min_snr_weight(noise_scheduler, timesteps, args.snr_gamma)
    return per_sample, timesteps


def min_snr_weight(noise_scheduler, timesteps, gamma):
    """Min-SNR: min(SNR, gamma) over the target's own weight, SNR (epsilon) or SNR + 1 (v)."""
    snr = compute_snr(noise_scheduler, timesteps)
    base = snr if noise_scheduler.config.prediction_type == "epsilon" else snr + 1
    return snr.clamp(max=gamma) / base


# ---- Sampling ----
def make_pipeline(vae, text_encoder, tokenizer, unet, sampler):
    pipeline = StableDiffusionPipeline(
        vae,
        text_encoder,
        tokenizer,
        unet,
        sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_from_export(args, accelerator):
    """--sample_from: the grid of an export, or of a checkpoint's UNet with the VAE and text encoder it names."""
    export = Path(args.sample_from)
    config = json.loads((export / EXPORT_CONFIG).read_text())
    if (export / "model_index.json").is_file():
        pipeline = StableDiffusionPipeline.from_pretrained(export, safety_checker=None, cache_dir=args.cache_dir)
        pipeline.set_progress_bar_config(disable=True)
    else:
        for part in ("text_encoder", "vae"):
            path = config[part]["name_or_path"]
            if Path(path).is_absolute() and not Path(path).exists():
                fail(f"--sample_from {export}: its {part}, {path}, is gone; sample the finished run's export")
        text = config["text_encoder"]
        base = argparse.Namespace(
            pretrained_model_name_or_path=config["pretrained_model_name_or_path"],
            text_encoder_name_or_path=None if text["subfolder"] else text["name_or_path"],
            revision=config["revision"],
            variant=config["variant"],
            cache_dir=args.cache_dir,
        )
        tokenizer, text_encoder = load_text_encoder(base)
        tokenizer.model_max_length = config["tokenizer_max_length"]
        vae = load_vae(base, (config["vae"]["name_or_path"], config["vae"]["subfolder"], f"--sample_from {export}"))
        subfolder = "unet" if (export / "unet").is_dir() else "unet_ema"  # a checkpoint without or with EMA
        unet = UNet2DConditionModel.from_pretrained(export, subfolder=subfolder, cache_dir=args.cache_dir).eval()
        sampler = DPMSolverMultistepScheduler.from_pretrained(export / "scheduler", cache_dir=args.cache_dir)
        pipeline = make_pipeline(vae, text_encoder, tokenizer, unet, sampler)
    pipeline.to(accelerator.device)
    args.resolution = config["resolution"]
    path = Path(args.output_dir) / "samples" / "export.png"
    if accelerator.is_main_process:
        log_validation(pipeline, args.validation_prompts or config["validation_prompts"], args, path, accelerator)
        print(f"wrote {path}")


# ---- Validation ----
def validation_due(args, global_step, max_train_steps, epoch_end=None):
    """Every --validation_steps after a step, or every --validation_epochs after epoch `epoch_end`; not at the end."""
    if global_step >= max_train_steps:
        return False
    if epoch_end is None:
        return bool(args.validation_steps) and global_step % args.validation_steps == 0
    return bool(args.validation_epochs) and (epoch_end + 1) % args.validation_epochs == 0


@torch.no_grad()
def log_validation(pipeline, prompts, args, path, accelerator, trackers=(), step=0):
    """A row per prompt, a column per guidance scale, fixed seed; to `path` and the trackers (wandb: per prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales, k = args.validation_guidance_scales, args.num_validation_images
    fig, axes = plt.subplots(
        len(prompts), len(scales), figsize=(2.2 * k * len(scales), 2.4 * len(prompts)), squeeze=False
    )
    rows = [[] for _ in prompts]  # per prompt: its strip at every guidance scale
    for col, scale in enumerate(scales):
        with accelerator.autocast():
            images = pipeline(
                [p for p in prompts for _ in range(k)],
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=scale,
                generator=torch.Generator(accelerator.device).manual_seed(args.seed),  # same noise in every panel
                output_type="np",
            ).images
        for row, prompt in enumerate(prompts):
            strip = np.hstack(images[row * k : (row + 1) * k])
            rows[row].append(strip)
            ax = axes[row][col]
            ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
            if row == 0:
                ax.set_title(f"guidance {scale:g}", fontsize=9)
            if col == 0:
                ax.set_ylabel(prompt[:40], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    guidance = f"guidance {', '.join(f'{s:g}' for s in scales)}"
    log_image([t for t in trackers if t.name != "wandb"], path, step, f"rows: {' | '.join(prompts)}; {guidance}")
    for tracker in [t for t in trackers if t.name == "wandb"]:
        import wandb

        images = [
            wandb.Image(
                (np.hstack(strips) * 255).round().astype(np.uint8).squeeze(),
                caption=f"{prompt} ({guidance})",
            )
            for prompt, strips in zip(prompts, rows, strict=True)
        ]
        tracker.log({"validation": images}, step=step)


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

    if not metrics_path.is_file():  # validation before the first logging step
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for key in ["loss", *sorted(k for k in rows[-1] if k.startswith("loss_t"))]:  # and per timestep quarter
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=None if key == "loss" else 0.8, label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


# Copied from train_dit.sampling_copy
def sampling_copy(model_cls, config, state, device):
    """A plain (unsharded) model of `config` holding the whole weights `state`, for sampling."""
    copy = model_cls.from_config(config)
    copy.load_state_dict(state)
    return copy.to(device).eval()


def validate(state, args):
    """The EMA weights' grid to samples/step-N.png and the trackers; the loss plot."""
    catch_up_ema(state)  # on every process: the EMA stays the same everywhere
    model = state.accelerator.unwrap_model(state.unet)
    weights = whole_state(model, state.ema)  # on every process: FSDP gathers the shards
    if not state.accelerator.is_main_process:
        return
    unet = sampling_copy(UNet2DConditionModel, model.config, weights, state.accelerator.device)
    output_dir = Path(args.output_dir)
    log_validation(
        make_pipeline(state.vae, state.text_encoder, state.tokenizer, unet, state.sampler),
        state.prompts,
        args,
        output_dir / "samples" / f"step-{state.global_step}.png",
        state.accelerator,
        state.accelerator.trackers,
        state.global_step,
    )
    plot_loss(output_dir / "metrics.jsonl", output_dir / "loss.png")


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
    """save_state plus the EMA UNet, sampling files, objective RNG and data position; manifest last, atomic rename."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    model = accelerator.unwrap_model(unet)
    if not weights_finite(accelerator, model):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    weights = whole_state(model, ema)  # on every process: FSDP gathers the shards
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, sampler and global RNGs of every process
        save_file({"state": train_rng.get_state()}, tmp / f"train_rng_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            state = {
                "script": "train_ldm_sd.py",
                "global_step": global_step,
                "num_processes": accelerator.num_processes,
                "epoch": position[0],
                "epoch_batches": position[1],
                "ema": None,
            }
            save_weights(weights, model, tmp / ("unet" if ema is None else "unet_ema"))
            if ema is not None:
                state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            write_sampling_files(tmp)
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:  # a full disk, a lost mount: the previous checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        print(
            f"error: step {global_step}: checkpoint not written ({reason}); the previous ones are intact",
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


def load_checkpoint(accelerator, path, unet, ema, train_rng, args):
    """Restore save_checkpoint's files; returns training_state.json. Another process count gets new random streams."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != "train_ldm_sd.py":
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not train_ldm_sd.py")
    if ema is not None and state["ema"] is None:
        fail(f"--resume_from_checkpoint {path}: saved without EMA; resume with --no-use_ema")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if any(path.glob("pytorch_model_fsdp*")) != fsdp:  # the model's files differ: whole weights in one file or not
        fail(f"--resume_from_checkpoint {path}: written {'without' if fsdp else 'with'} FSDP; resume it the same way")
    try:
        accelerator.load_state(str(path))  # safetensors + torch.load(weights_only=True)
    except RuntimeError as e:
        fail(f"--resume_from_checkpoint {path}: does not fit this model ({str(e).splitlines()[0][:160]})")
    restore_train_rng(accelerator, path, train_rng, state, args.seed)
    if ema is not None:  # onto the EMA's device: load_state_dict keeps the tensors it is given
        device = str(ema.shadow_params[0].device)
        weights = load_file(path / "unet_ema" / "diffusion_pytorch_model.safetensors", device=device)
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(unet).named_parameters()]
        if hasattr(ema.shadow_params[0], "device_mesh"):  # FSDP: each process keeps its shards
            from torch.distributed.tensor import distribute_tensor

            shadow = [
                distribute_tensor(w, s.device_mesh, s.placements)
                for w, s in zip(shadow, ema.shadow_params, strict=True)
            ]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def export_config(args, vae_from, max_length, prompts):
    """What --sample_from needs besides the UNet and sampler: VAE and text encoder by name, prompt length, resolution,
    prompts."""
    text, sub, _ = text_encoder_source(args)
    return {
        "script": "train_ldm_sd.py",
        "pretrained_model_name_or_path": local_name(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "text_encoder": {
            "name_or_path": local_name(text),
            "subfolder": sub,
            "tokenizer_subfolder": sub and "tokenizer",
        },
        "vae": {"name_or_path": local_name(vae_from[0]), "subfolder": vae_from[1]},
        "tokenizer_max_length": max_length,
        "resolution": args.resolution,
        "validation_prompts": list(prompts),
    }


def write_sampling_files(sampler, config, folder):
    sampler.save_pretrained(folder / "scheduler")
    (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def model_card(args, global_step, metrics_path):
    """README.md of the export: Hub metadata, how it was trained and how to sample it."""
    from huggingface_hub import ModelCardData

    loss = json.loads(metrics_path.read_text().splitlines()[-1])["loss"]
    base = args.pretrained_model_name_or_path
    hub_base = not Path(base).exists()
    dataset = args.dataset_name if args.dataset_name and not Path(args.dataset_name).exists() else None
    data = ModelCardData(
        library_name="diffusers",
        license=sd_license(base),
        base_model=base if hub_base else None,
        datasets=[dataset] if dataset else None,
        tags=["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "diffusers-training"],
    )
    how = (
        "a new UNet trained with the VAE and text encoder of" if args.unet_from_scratch else "the UNet fine-tuned from"
    )
    return f"""---
{data.to_yaml()}
---

# Text-to-image: Stable Diffusion fine-tuning (train_ldm_sd.py)

A `StableDiffusionPipeline`: {how} `{local_name(base)}`, {global_step} optimizer steps, final loss
{loss:.4f}{f", on the dataset `{dataset}`" if dataset else ""}. The UNet holds the EMA weights (fp32).

```bash
{" ".join(["python train_ldm_sd.py", *sys.argv[1:]])}
```

```python
from diffusers import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.from_pretrained("THIS_FOLDER", safety_checker=None)
image = pipeline("a prompt").images[0]
```

![samples at guidance {", ".join(f"{s:g}" for s in args.validation_guidance_scales)}](samples.png)
"""


def sd_license(name_or_path):
    """CreativeML OpenRAIL-M for a hub Stable Diffusion v1, else "other"."""
    hub_id = not Path(name_or_path).exists()
    return "creativeml-openrail-m" if hub_id and "stable-diffusion-v1" in name_or_path.lower() else "other"


def export_model(pipeline, write_sampling_files, output_dir, card, grid):
    """The pipeline, sampling files and model card, each part renamed into place; the manifest last."""
    (output_dir / MANIFEST).unlink(missing_ok=True)  # visibly incomplete until the new one
    tmp = output_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp)
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


def write_run_config(args, accelerator, extra):
    import accelerate
    import datasets
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
        "mixed_precision": accelerator.mixed_precision,  # what accelerate resolved: flag, config or launcher
        **extra,
        "versions": {m.__name__: m.__version__ for m in (torch, diffusers, transformers, accelerate, datasets)},
    }
    (Path(args.output_dir) / "run_config.json").write_text(json.dumps(config, indent=2, default=str))


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
def main(args):
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.device == "cpu" or not torch.cuda.is_available(),  # then several processes talk over gloo
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
        # Shuffling depends only on (seed, epoch): resumable mid-epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    check_accelerator(accelerator, fsdp=True)
    if accelerator.distributed_type == DistributedType.FSDP:
        for flag in ("offload_ema", "use_8bit_adam"):
            if getattr(args, flag):
                fail(f"--{flag}: not supported with FSDP; drop it")
    device = accelerator.device
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.sample_from:
        return generate_from_export(args, accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # Frozen VAE and text encoder, noise schedule; shards fix the resolution and text length
    index = read_precomputed_index(args) if args.precomputed_data_dir else None
    vae_from = vae_source(args, index)
    noise_scheduler = build_noise_scheduler(args)  # configs only: its checks come before any model loads
    sampler = build_sampler(noise_scheduler)
    tokenizer, text_encoder = load_text_encoder(args)
    vae = load_vae(args, vae_from)
    hidden = text_encoder.config.hidden_size
    max_length = args.tokenizer_max_length or min(
        tokenizer.model_max_length, getattr(text_encoder.config, "max_position_embeddings", 512)
    )
    if index is not None:
        check_shards_fit(args, index, text_encoder, vae)
        args.resolution, max_length = index["resolution"], index["text_encoders"][0]["max_length"]
    for frozen in (vae, text_encoder):
        frozen.to(device)
        if weight_dtype != torch.float32:
            frozen.to(weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        vae.enable_xformers_memory_efficient_attention()
    latent_size = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    latent_info = latent_scale(vae)

    # Data
    dataset, first_captions = build_dataset(args, tokenizer, max_length, vae.config.in_channels, index)
    prompts = args.validation_prompts or first_captions
    sampling_files = functools.partial(
        write_sampling_files, sampler, export_config(args, vae_from, max_length, prompts)
    )
    streaming = args.streaming
    if not streaming and len(dataset) == 0:
        fail("the dataset is empty")
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=not streaming,
        # a full batch for every process, else every epoch is empty
        drop_last=not streaming and len(dataset) >= args.train_batch_size * accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )
    if index is not None:
        empty = load_file(Path(args.precomputed_data_dir) / "empty_prompt.safetensors")
        empty_states = empty[dataset.keys["hidden_states"]].to(device).float()
    else:  # as StableDiffusionPipeline encodes it
        with torch.no_grad():
            tokens = tokenizer([""], padding="max_length", max_length=max_length, return_tensors="pt")
            mask = tokens.attention_mask.to(device) if text_uses_mask(text_encoder) else None
            empty_states = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()

    # Claimed only now that the inputs loaded: a bad input changes nothing in the folder.
    if accelerator.is_main_process:
        claim_output_dir(args)
    stop = StopRequest(accelerator)
    set_seed(args.seed)  # same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)

    # UNet, EMA
    unet = build_unet(args, vae.config.latent_channels, latent_size, hidden)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    accelerator.print(
        f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters "
        f"({'from scratch' if args.unet_from_scratch else 'fine-tuned'}); latents "
        f"{vae.config.latent_channels}x{latent_size}x{latent_size}; text "
        f"{max_length}x{hidden}; data: {'precomputed' if index else 'encoded online'}"
    )
    if accelerator.is_main_process:
        write_run_config(args, accelerator, {"tokenizer_max_length": max_length, "latent": latent_info})

    # Optimizer: fused AdamW skips a non-finite step on the device (found_inf); 8-bit AdamW cannot.
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls, options = bnb.optim.AdamW8bit, {}
    else:
        optimizer_cls, options = torch.optim.AdamW, {"fused": True}
    optimizer = optimizer_cls(
        unet.parameters(),
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **options,
    )
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    if accelerator.distributed_type == DistributedType.FSDP and weight_dtype != torch.float32:
        # FSDP2 computes with bf16 or fp16 weights; the activations get autocast, as under DDP
        unet.forward = torch.autocast(accelerator.device.type, dtype=weight_dtype)(unet.forward)
    params = list(unet.parameters())  # the Parameter objects the optimizer and the EMA hold
    ema, ema_inputs = None, params
    if args.use_ema:  # of the prepared parameters: under FSDP each process averages its shards
        if args.offload_ema and device.type != "cpu":  # filled device to host per update
            ema_inputs = [
                torch.empty_like(p, device="cpu", pin_memory=True).requires_grad_(p.requires_grad) for p in params
            ]
            with torch.no_grad():
                torch._foreach_copy_(ema_inputs, params)
        ema = StridedEMA(
            ema_inputs,
            decay=args.ema_decay,
            use_ema_warmup=True,
            power=args.ema_power,
            foreach=args.foreach_ema,
        )
    # A stream has no length: check_args asks for --max_train_steps.
    max_train_steps = args.max_train_steps or args.num_train_epochs * max(
        1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    )
    # The objective's RNG, checkpointed (the global one also seeds the DataLoader).
    train_rng = torch.Generator(device).manual_seed(args.seed * 1000 + accelerator.process_index)

    # Resume
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        resumed = load_checkpoint(accelerator, resume_path, unet, ema, train_rng, args)
        global_step, first_epoch = resumed["global_step"], resumed["epoch"]
        # in this run's batches: the number of processes may differ
        batches_to_skip = resumed["epoch_batches"] // accelerator.num_processes
        if not streaming and batches_to_skip >= len(train_dataloader):
            first_epoch, batches_to_skip = first_epoch + 1, 0
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    # Not prepared: accelerate would step it once per process; resumed at its step (last_epoch).
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        last_epoch=global_step - 1,
    )
    if args.report_to:
        accelerator.init_trackers(args.tracker_project_name, config={k: str(v) for k, v in vars(args).items()})
    state = TrainState(
        accelerator=accelerator,
        unet=unet,
        params=params,
        ema=ema,
        ema_inputs=ema_inputs,
        global_step=global_step,
        ema_step=global_step,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        sampler=sampler,
        prompts=prompts,
    )

    # Training loop: the host reads device values only every --logging_steps
    metrics_path = output_dir / "metrics.jsonl"
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_main_process, desc="train")
    num_bins = 4  # loss per quarter of the timestep range
    bin_sums = torch.zeros(2, num_bins, device=device)  # loss sum, sample count
    # Non-finite gradient steps: total, current streak, longest streak since the last log.
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=device).unbind()
    num_bad, warned_bad = 0, False
    window_start, window_samples = time.perf_counter(), 0
    position = (first_epoch, batches_to_skip * accelerator.num_processes)
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        unet.train()
        train_dataloader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):  # crops and captions per epoch; accelerate calls it for 1 process only
            dataset.set_epoch(epoch)
        epoch_batches = batches_to_skip if epoch == first_epoch else 0  # per process, for the data position
        batches = accelerator.skip_first_batches(train_dataloader, epoch_batches) if epoch_batches else train_dataloader
        for batch in batches:
            epoch_batches += 1
            if "num_bad" in batch:  # summed on the device, read at logging steps
                num_bad = num_bad + batch["num_bad"].sum()
            with accelerator.accumulate(unet):
                latents = batch_to_latents(batch, vae, latent_info, args, train_rng, weight_dtype)
                states = batch_to_text_states(batch, text_encoder, empty_states, args, train_rng)
                per_sample, timesteps = training_step(unet, noise_scheduler, latents, states, args, train_rng)
                accelerator.backward(per_sample.mean())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
                    # The norm is all-reduced, so the same everywhere; with fp16 the GradScaler skips the step.
                    nonfinite = (~torch.isfinite(grad_norm)).float()
                    if accelerator.scaler is None and args.use_8bit_adam:  # the step is taken with zero gradients
                        for p in params:
                            if p.grad is not None:
                                p.grad.masked_fill_(nonfinite.bool(), 0.0)
                    elif accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bins = (timesteps * num_bins // noise_scheduler.config.num_train_timesteps).clamp(max=num_bins - 1)
            bin_sums[0].index_add_(0, bins, per_sample.detach().float())
            bin_sums[1].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float))
            window_samples += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done
            global_step = state.global_step = global_step + 1
            progress.update(1)
            lr_scheduler.step()
            nonfinite_steps += nonfinite
            nonfinite_run.mul_(nonfinite).add_(nonfinite)
            torch.maximum(longest_run, nonfinite_run, out=longest_run)
            if global_step % args.ema_update_every == 0:
                catch_up_ema(state)

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                totals = accelerator.reduce(bin_sums, "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                row = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": (totals[0].sum() / totals[1].sum().clamp(min=1)).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": window_samples / max(time.perf_counter() - window_start, 1e-9),
                    "nonfinite_steps": int(total_nonfinite),
                    **{f"loss_t{i}": (totals[0, i] / totals[1, i]).item() for i in range(num_bins) if totals[1, i]},
                }
                if not warned_bad and int(num_bad):
                    accelerator.print(f"warning: unreadable images are skipped ({int(num_bad)} so far)")
                    warned_bad = True
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    progress.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
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
                catch_up_ema(state)
                path = save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
                accelerator.print(f"\nsaved {path}")
            if stop_now:
                accelerator.print(
                    f"stop requested: exiting at step {global_step}; resume with --resume_from_checkpoint latest"
                )
                accelerator.end_training()
                return
            if validation_due(args, global_step, max_train_steps):
                validate(state, args)
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
        if streaming and epoch_batches == 0:
            raise RuntimeError(f"the stream of --dataset_name {args.dataset_name} gave no example in epoch {epoch}")
        if validation_due(args, global_step, max_train_steps, epoch_end=epoch):
            validate(state, args)
    stop.close()
    progress.close()
    train_seconds = time.perf_counter() - train_start
    num_bad = int(accelerator.reduce(torch.as_tensor(num_bad, device=device), "sum"))
    if num_bad:
        accelerator.print(f"warning: {num_bad} unreadable images were skipped")

    # Final checkpoint; the export: EMA UNet and the frozen parts reloaded, in fp32
    catch_up_ema(state)
    save_checkpoint(accelerator, args, unet, ema, train_rng, global_step, position, sampling_files)
    model = accelerator.unwrap_model(unet)
    weights = whole_state(model, ema)  # on every process: FSDP gathers the shards
    if accelerator.is_main_process:
        final_unet = sampling_copy(UNet2DConditionModel, model.config, weights, device)
        tokenizer.model_max_length = max_length  # the pipeline pads prompts to this, as training did
        text_encoder = load_text_encoder(args)[1]
        pipeline = make_pipeline(load_vae(args, vae_from), text_encoder, tokenizer, final_unet, sampler).to(device)
        grid = output_dir / "samples" / f"step-{global_step}.png"
        log_validation(pipeline, prompts, args, grid, accelerator, accelerator.trackers, global_step)
        plot_loss(metrics_path, output_dir / "loss.png")
        export_model(pipeline, sampling_files, output_dir, model_card(args, global_step, metrics_path), grid)
        summary = {"global_step": global_step, "train_seconds": train_seconds, "num_bad_images": num_bad}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(
            f"done: step {global_step}, {train_seconds / 60:.1f} min; StableDiffusionPipeline in {output_dir}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
