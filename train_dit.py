"""Train a Diffusion Transformer (DiT), class- or text-conditioned, with the DDPM or the rectified-flow objective.

Class conditioning uses diffusers' DiTTransformer2DModel (adaLN-Zero, Peebles & Xie 2023); text conditioning a
cross-attention DiT (PixArtTransformer2DModel) reading a frozen text encoder. Inputs are VAE latents (online,
or precomputed by prepare_data_multi_gpu.py) or pixels (`--vae_name_or_path none`, small images).
`--objective ddpm`: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, MSE on eps (as DiT, which also learns the
variance; we keep it fixed and sample with DPM-Solver++). `--objective flow`: x_s = (1 - s) x_0 + s eps,
MSE on the velocity eps - x_0, s drawn logit-normal (SD3). The condition is replaced by the null class (or
the empty prompt) with --cond_dropout_prob, so the unconditional branch that guidance uses is trained.

    python train_dit.py --dataset_name mnist --data_root ./dataset_cache --vae_name_or_path none --resolution 32
    accelerate launch train_dit.py --train_data_dir imagenet/train --model DiT-XL/2 --mixed_precision bf16
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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

# The paper's models (Peebles & Xie 2023, table 1): depth, hidden size, heads. "/p" in the name is the patch size.
PRESETS = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
MNIST_SIZE = 28
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last in a checkpoint or export: size and hash of every file, the commit point
LOCK = "run.lock"  # one training run per output folder
NEGATABLE = {"use_ema"}  # BooleanOptionalAction flags: --use_ema / --no-use_ema
DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"
PIPELINE_NULL_CLASS = 1000  # DiTPipeline hard-codes the null class id as 1000 (ImageNet's class count)


# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2, before any heavy work."""
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
    g = parser.add_argument_group("data (one of --dataset_name, --train_data_dir, --precomputed_data_dir)")
    g.add_argument(
        "--dataset_name",
        default=None,
        help='A datasets hub name or local dataset; "mnist" reads torchvision MNIST from --data_root.',
    )
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument(
        "--data_root",
        default="./dataset_cache",
        help="For --dataset_name mnist: the folder holding MNIST/raw (downloaded there when online).",
    )
    g.add_argument(
        "--train_data_dir",
        default=None,
        help="An ImageNet-style folder (one subfolder per class) and/or images with metadata.jsonl.",
    )
    g.add_argument(
        "--precomputed_data_dir",
        default=None,
        help="Shards written by prepare_data_multi_gpu.py: no VAE or text encoder runs during training.",
    )
    g.add_argument("--image_column", default="image")
    g.add_argument("--label_column", default="label")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--caption_template", default="A handwritten digit {}", help="MNIST captions; {} is the digit.")
    g.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Image side in pixels (resize + center crop; MNIST is padded from 28 to this size).",
    )
    g.add_argument(
        "--image_interpolation_mode",
        default="lanczos",
        choices=[
            f.lower()
            for f in dir(torchvision.transforms.InterpolationMode)
            if not f.startswith("__") and not f.endswith("__")
        ],
        help="The image interpolation method to use for resizing images.",
    )
    g.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random (as DiT).")
    g.add_argument("--max_samples", type=int, default=None, help="Truncate the training set to N examples.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("models")
    g.add_argument("--model", default="DiT-XL/2", help=f"Preset {sorted(PRESETS)} + '/2', '/4' or '/8' (patch size).")
    g.add_argument("--depth", type=int, default=None, help="Override the preset's number of blocks.")
    g.add_argument("--hidden_size", type=int, default=None, help="Override the preset's width.")
    g.add_argument("--num_heads", type=int, default=None, help="Override the preset's attention heads.")
    g.add_argument("--patch_size", type=int, default=None, help="Override the preset's patch size.")
    g.add_argument("--conditioning", choices=["class", "text"], default="class")
    g.add_argument(
        "--weight_init",
        choices=["adaln_zero", "pytorch"],
        default="adaln_zero",
        help="adaln_zero: DiT's (identity blocks, N(0, 0.02) embeddings), best in long runs; pytorch: "
        "diffusers' defaults, faster to pick up the class in short runs (docs/dit.md).",
    )
    g.add_argument("--num_classes", type=int, default=None, help="Class count; default: read from the data.")
    g.add_argument(
        "--vae_name_or_path",
        default="stabilityai/sd-vae-ft-ema",
        help='Frozen AutoencoderKL (hub id or folder, a "vae" subfolder is found); "none" = pixel space.',
    )
    g.add_argument(
        "--text_encoder_name_or_path",
        default=None,
        help="Frozen text encoder for --conditioning text (CLIP text, BERT family, T5 encoder). Default "
        f"{DEFAULT_TEXT_ENCODER}; with --precomputed_data_dir, the shards' encoder (index.json); "
        "with --sample_from, the export's encoder.",
    )
    g.add_argument(
        "--tokenizer_max_length",
        type=int,
        default=None,
        help="Tokens per caption (padded/truncated). Default 77; with --precomputed_data_dir, the shards'.",
    )

    g = parser.add_argument_group("objective")
    g.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon", help="ddpm only.")
    g.add_argument("--beta_schedule", default="linear", help="ddpm: DDPMScheduler betas (DiT: linear 1e-4..0.02).")
    g.add_argument("--snr_gamma", type=float, default=0.0, help="ddpm: min-SNR loss weighting; 0 = plain MSE.")
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument(
        "--weighting_scheme",
        choices=["logit_normal", "uniform", "mode"],
        default="logit_normal",
        help="flow: density of the noise level s during training (diffusers' SD3 helper).",
    )
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument(
        "--flow_shift",
        type=float,
        default=1.0,
        help="flow: s -> shift*s / (1 + (shift-1)*s) in training and sampling; > 1 favours high noise.",
    )
    g.add_argument(
        "--cond_dropout_prob",
        type=float,
        default=0.1,
        help="Probability of replacing the class by the null class (or the caption by the empty prompt).",
    )

    g = parser.add_argument_group("optimisation (defaults: DiT's AdamW 1e-4, constant, EMA 0.9999)")
    g.add_argument("--output_dir", default="output_dit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--train_batch_size",
        "--batch_size",
        type=int,
        default=32,
        help="Batch size per process (DiT: 256 in total over 8 GPUs).",
    )
    g.add_argument("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=80)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs when set.")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="Stop after this many optimizer steps in a row with a non-finite gradient (read when logging).",
    )
    g.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep an EMA of the weights (a copy at the start, with warmup) for samples and the export.",
    )
    g.add_argument("--ema_decay", type=float, default=0.9999, help="Largest EMA decay, reached after the warmup.")
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
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Default attention is PyTorch SDPA (flash/memory-efficient kernels on GPU).",
    )
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer's forward.")

    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=1.5,
        help="uncond + s * (cond - uncond) on all channels; 1 = no guidance. Used for --num_eval_samples.",
    )
    g.add_argument(
        "--guidance_interval",
        type=float_list,
        default=None,
        help="LO,HI: guide only while the noise level t/T is in [LO, HI] (Kynkaanniemi et al. 2024).",
    )
    g.add_argument(
        "--validation_guidance_scales", type=float_list, default=[1.0, 1.5, 4.0], help="Columns of the validation grid."
    )
    g.add_argument("--validation_class_ids", type=int_list, default=None, help="Rows of the grid (default 0..9).")
    g.add_argument(
        "--validation_prompts",
        nargs="+",
        default=None,
        help="Rows of the grid for --conditioning text (default: the first captions of the data).",
    )
    g.add_argument("--num_inference_steps", type=int, default=25, help="DPM-Solver++ (ddpm) or Euler (flow) steps.")
    g.add_argument(
        "--num_eval_samples",
        type=int,
        default=0,
        help="Write N samples (balanced over the classes) to <output_dir>/eval_samples.npz at the end.",
    )
    g.add_argument("--eval_batch_size", type=int, default=250)
    g.add_argument(
        "--sample_from",
        default=None,
        help="Generate from an export (a finished run's output_dir) or a checkpoint-N folder; no training.",
    )

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=100, help="Also how often the host reads device values.")
    g.add_argument("--validation_steps", type=int, default=5000)
    g.add_argument("--checkpointing_steps", type=int, default=5000)
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
    g.add_argument("--tracker_project_name", default="train_dit", help="Project (wandb) or run folder name.")

    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args([underscore_flag(a) for a in argv])


# Copied from train_mnist.underscore_flag
def underscore_flag(arg):
    """Every flag also accepts its hyphen spelling: --max-samples == --max_samples, --no-use-ema == --no-use_ema."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    negation = "no-" if name.startswith(("no-", "no_")) and name[3:].replace("-", "_") in NEGATABLE else ""
    return "--" + negation + name[len(negation) :].replace("-", "_") + eq + value


def model_shape(args):
    """(depth, hidden, heads, patch) from --model and the explicit overrides."""
    name, _, patch = args.model.partition("/")
    if name not in PRESETS or patch not in ("2", "4", "8"):
        fail(
            f"--model {args.model}: unknown preset; use one of "
            f"{', '.join(f'{n}/{p}' for n in PRESETS for p in (2, 4, 8))}"
        )
    depth, hidden, heads = PRESETS[name]
    return (args.depth or depth, args.hidden_size or hidden, args.num_heads or heads, args.patch_size or int(patch))


def check_args(args):
    """Cheap checks of the flags, before any dataset or model is loaded."""
    if args.sample_from:
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(
                f"--sample_from {args.sample_from}: no {EXPORT_CONFIG} there; pass the output_dir of a finished run "
                f"or one of its checkpoint-N folders"
            )
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged or incomplete ({problem}); pass an intact export")
    else:
        sources = [s for s in ("dataset_name", "train_data_dir", "precomputed_data_dir") if getattr(args, s)]
        if len(sources) != 1:
            fail(
                "give exactly one of --dataset_name, --train_data_dir, --precomputed_data_dir "
                f"(got {', '.join('--' + s for s in sources) or 'none'})"
            )
        for flag in ("train_data_dir", "precomputed_data_dir"):
            if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
                fail(f"--{flag} {getattr(args, flag)}: no such folder")
        if args.precomputed_data_dir and not (Path(args.precomputed_data_dir) / "index.json").is_file():
            fail(
                f"--precomputed_data_dir {args.precomputed_data_dir}: no index.json; write the folder with "
                f"prepare_data_multi_gpu.py (an interrupted run writes index.json only when all shards are done)"
            )
    depth, hidden, heads, patch = model_shape(args)
    if hidden % heads:
        fail(f"--hidden_size {hidden} is not divisible by --num_heads {heads}")
    if args.max_samples is not None and args.max_samples < 1:
        fail(f"--max_samples {args.max_samples}: must be at least 1 (leave it out to use the whole dataset)")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if not 0.0 <= args.cond_dropout_prob < 1.0:
        fail(f"--cond_dropout_prob {args.cond_dropout_prob}: must be in [0, 1)")
    if args.guidance_interval is not None and (
        len(args.guidance_interval) != 2 or not 0 <= args.guidance_interval[0] < args.guidance_interval[1] <= 1
    ):
        fail(f"--guidance_interval {args.guidance_interval}: give LO,HI with 0 <= LO < HI <= 1")
    if args.flow_shift <= 0:
        fail(f"--flow_shift {args.flow_shift}: must be positive")
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            fail(
                "--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers); "
                "without the flag the model uses PyTorch SDPA"
            )
    args.report_to = installed_trackers(args.report_to)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not (Path(args.resume_from_checkpoint) / "training_state.json").is_file():
            fail(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a checkpoint folder of this script")


# Copied from train_mnist.installed_trackers
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


# Copied from train_mnist.check_accelerator
def check_accelerator(accelerator):
    """Checks of what accelerate resolved from the flags, its config file and the launcher, before heavy work."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        fail("--mixed_precision fp16 (from the flag or accelerate's config) needs a CUDA GPU: use bf16 or no here")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fail("DeepSpeed is not supported by this script: launch it with DDP (accelerate launch --multi_gpu)")
    if accelerator.distributed_type == DistributedType.FSDP:
        fail("FSDP is not supported by this script (its EMA needs whole weights): launch it with DDP (--multi_gpu)")


# ----------------------------------------------------------------------------------------------------------------
# Data. Every example is a dict: "pixels" [C, R, R] in [-1, 1] (or, precomputed, "latent_mean"/"latent_std"),
# "label" (class id) and "caption" (or, precomputed, "text_states"/"text_mask"); an image folder's examples also
# carry "skipped" (1 when the drawn image was unreadable and the next readable one stands in for it).
# ----------------------------------------------------------------------------------------------------------------
class MNISTDataset(torch.utils.data.Dataset):
    """torchvision MNIST held in memory, each digit padded from 28 to the resolution on a black border."""

    def __init__(self, args, channels):
        try:
            mnist = torchvision.datasets.MNIST(args.data_root, train=True, download=False)
        except RuntimeError:
            try:
                mnist = torchvision.datasets.MNIST(args.data_root, train=True, download=True)
            except Exception as e:  # offline, proxy, disk full: all end the same way
                fail(
                    f"--data_root {args.data_root}: MNIST is not there and could not be downloaded "
                    f"({type(e).__name__}); point --data_root at a folder holding MNIST/raw"
                )
        n = len(mnist) if args.max_samples is None else min(args.max_samples, len(mnist))
        pad = (args.resolution - MNIST_SIZE) // 2
        images = mnist.data[:n].float().div(127.5).sub(1.0).unsqueeze(1)  # white digit on black, in [-1, 1]
        self.images = F.pad(images, (pad, pad, pad, pad), value=-1.0).expand(-1, channels, -1, -1)
        self.labels = mnist.targets[:n].long()
        self.label_names = [str(d) for d in range(10)]
        self.template = args.caption_template

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        return {"pixels": self.images[i], "label": label, "caption": self.template.format(label)}


def interpolation_mode(name):
    """--image_interpolation_mode as torchvision's InterpolationMode."""
    return getattr(torchvision.transforms.InterpolationMode, name.upper())


class HFImageDataset(torch.utils.data.Dataset):
    """A datasets table (hub, local, or imagefolder): images resized, center-cropped (as ADM/DiT), in [-1, 1].

    Images are decoded here, so an unreadable one is replaced instead of crashing the run: example i stands in
    with the next readable one (i + 1, i + 2, ...) and is counted as skipped. Every batch keeps its size, so every
    process runs every step (a process alone with an empty batch would leave the others waiting in the gradient
    all-reduce) and the data position of a checkpoint stays a count of batches."""

    max_unreadable_in_a_row = 64

    def __init__(self, table, args, channels):
        from datasets import Image

        self.table = table.cast_column(args.image_column, Image(decode=False))
        self.args, self.channels = args, channels
        feature = table.features.get(args.label_column)
        self.label_names = getattr(feature, "names", None)
        self.transform = torchvision.transforms.Compose(
            [
                torchvision.transforms.Resize(args.resolution, interpolation_mode(args.image_interpolation_mode)),
                torchvision.transforms.CenterCrop(args.resolution),
                torchvision.transforms.ToTensor(),
                torchvision.transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        for k in range(min(self.max_unreadable_in_a_row, len(self))):
            example = self.read((i + k) % len(self))
            if example is not None:
                return {**example, "skipped": int(k > 0)}
        raise RuntimeError(
            f"{self.max_unreadable_in_a_row} unreadable images in a row from example {i}: check the "
            f"files of the dataset (--train_data_dir, --dataset_name, --image_column)"
        )

    def read(self, i):
        """Example i, or None when its image cannot be decoded."""
        import io

        from PIL import Image, UnidentifiedImageError

        row = self.table[i]
        image = row[self.args.image_column]
        try:
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
            image = image.convert("RGB" if self.channels == 3 else "L")
            pixels = self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError):
            return None
        label = int(row[self.args.label_column]) if self.args.label_column in row else -1
        return {"pixels": pixels, "label": label, "caption": str(row.get(self.args.caption_column) or "")}


class PrecomputedDataset(torch.utils.data.Dataset):
    """Rows of the safetensors shards of prepare_data_multi_gpu.py (docs/precomputed_format.md), read lazily
    through memory maps: a dataset larger than RAM works. The latent itself is drawn later, in training_step."""

    def __init__(self, root, index, text_key, max_samples):
        self.root, self.text_key = Path(root), text_key
        self.files, counts = [], []
        for shard in index["shards"]:
            self.files.append(self.root / shard["file"])
            counts.append(shard["num_examples"])
        self.starts = np.cumsum([0] + counts)
        self.length = int(self.starts[-1]) if max_samples is None else min(max_samples, int(self.starts[-1]))
        self.keys = ["latent_mean", "latent_std"] + (
            ["latent_mean_flipped", "latent_std_flipped"] if index.get("random_flip") else []
        )
        self.keys += ["label"] if "label" in index["tensors"] else []
        if text_key:
            self.keys += [f"{text_key}.hidden_states", f"{text_key}.attention_mask"]
        self.label_names = index.get("label_names")
        self.handles = {}  # opened per process (a DataLoader worker cannot inherit them)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        if s not in self.handles:
            self.handles[s] = safe_open(str(self.files[s]), framework="pt")
        row, handle = i - int(self.starts[s]), self.handles[s]
        item = {k: handle.get_slice(k)[row : row + 1][0] for k in self.keys}
        out = {
            "latent_mean": item["latent_mean"].float(),
            "latent_std": item["latent_std"].float(),
            "label": int(item["label"]) if "label" in item else -1,
        }
        if "latent_mean_flipped" in item:
            out["latent_mean_flipped"] = item["latent_mean_flipped"].float()
            out["latent_std_flipped"] = item["latent_std_flipped"].float()
        if self.text_key:
            out["text_states"] = item[f"{self.text_key}.hidden_states"].float()
            out["text_mask"] = item[f"{self.text_key}.attention_mask"].long()
        return out


def collate(examples):
    """Stack a batch; "skipped" is the number of its examples that stand in for an unreadable image."""
    skipped = sum(e.get("skipped", 0) for e in examples)
    kept = [{k: v for k, v in e.items() if k != "skipped"} for e in examples]
    return {**torch.utils.data.default_collate(kept), "skipped": skipped}


def read_precomputed_index(args):
    index = json.loads((Path(args.precomputed_data_dir) / "index.json").read_text())
    flag = f"--precomputed_data_dir {args.precomputed_data_dir}"
    if index.get("format") != "precomputed-diffusion-shards" or index.get("version") != 1:
        fail(f"{flag}: index.json is not version 1 of prepare_data_multi_gpu.py's format")
    if index.get("vae") is None:
        fail(f"{flag}: the shards hold no VAE latents; run prepare_data_multi_gpu.py with a VAE")
    if args.conditioning == "text" and not index.get("text_encoders"):
        fail(f"{flag}: no text encoder states in the shards; prepare them with --text_encoder_name_or_path")
    if args.conditioning == "class" and "label" not in index.get("tensors", {}):
        fail(f"{flag}: the shards hold no class labels; use --conditioning text or a labelled source")
    return index


def text_convention(args, index):
    """How a caption becomes the text states the model reads: encoder, tokenizer, prefix, length, and whether the
    encoder sees the padding mask. Online: the flags (mask on, no prefix). Precomputed: what the shards were
    encoded with (index.json), so that the export encodes prompts the same way; a flag that contradicts the
    shards, or shards without the padding mask that the cross-attention needs, are refused."""
    if index is None:
        name = args.text_encoder_name_or_path or DEFAULT_TEXT_ENCODER
        return {
            "text_encoder": name,
            "tokenizer": name,
            "prefix": "",
            "use_attention_mask": True,
            "tokenizer_max_length": args.tokenizer_max_length or 77,
        }
    flag = f"--precomputed_data_dir {args.precomputed_data_dir}"
    entry = index["text_encoders"][0]
    key, tensors = entry.get("key"), index.get("tensors", {})
    mask_shape = tensors.get(f"{key}.attention_mask", {}).get("shape")
    if f"{key}.hidden_states" not in tensors or mask_shape is None:
        fail(
            f"{flag}: index.json lists no {key}.hidden_states and {key}.attention_mask; train_dit.py masks the "
            f"caption padding with the stored mask: re-encode the shards with prepare_data_multi_gpu.py"
        )
    use_mask, prefix = entry.get("use_attention_mask", False), entry.get("prefix") or ""
    if (
        not isinstance(use_mask, bool)
        or not isinstance(prefix, str)
        or not entry.get("name_or_path")
        or mask_shape != [entry.get("max_length")]
    ):
        fail(
            f"{flag}: text encoder {key} in index.json has a convention train_dit.py cannot reproduce "
            f"(name_or_path, max_length, prefix, use_attention_mask); re-encode with prepare_data_multi_gpu.py"
        )
    if args.text_encoder_name_or_path not in (None, entry["name_or_path"]):
        fail(
            f"--text_encoder_name_or_path {args.text_encoder_name_or_path}: the shards were encoded with "
            f"{entry['name_or_path']}; drop the flag (the export records the shards' encoder) or re-encode"
        )
    if args.tokenizer_max_length not in (None, entry["max_length"]):
        fail(
            f"--tokenizer_max_length {args.tokenizer_max_length}: the shards hold {entry['max_length']} tokens "
            f"per caption; drop the flag or re-encode the shards"
        )
    return {
        "text_encoder": entry["name_or_path"],
        "tokenizer": entry.get("tokenizer") or entry["name_or_path"],
        "prefix": prefix,
        "use_attention_mask": use_mask,
        "tokenizer_max_length": entry["max_length"],
    }


def build_dataset(args, channels, index):
    """The training set for the chosen source (`index`: the precomputed index.json or None), truncated to
    --max_samples."""
    if index is not None:
        text_key = index["text_encoders"][0]["key"] if args.conditioning == "text" else None
        return PrecomputedDataset(args.precomputed_data_dir, index, text_key, args.max_samples)
    if args.dataset_name == "mnist":
        if args.resolution < MNIST_SIZE or (args.resolution - MNIST_SIZE) % 2:
            fail(f"--resolution {args.resolution}: MNIST is padded from 28, use 28 + an even number (32 is usual)")
        return MNISTDataset(args, channels)
    from datasets import load_dataset

    if args.train_data_dir:
        table = load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    else:
        table = load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    wanted = [args.image_column] + ([args.caption_column] if args.conditioning == "text" else [args.label_column])
    for column, flag in zip(
        wanted, ["--image_column", "--caption_column" if args.conditioning == "text" else "--label_column"], strict=True
    ):
        if column not in table.column_names:
            fail(f"{flag} {column}: not a column of the dataset; it has {', '.join(table.column_names)}")
    if args.max_samples is not None:
        table = table.select(range(min(args.max_samples, len(table))))
    if len(table) == 0:
        fail("the dataset is empty")
    return HFImageDataset(table, args, channels)


def first_captions(dataset, k=10):
    """Validation prompts when none are given: the first k distinct captions of the data."""
    if isinstance(dataset, MNISTDataset):
        return [dataset.template.format(d) for d in range(k)]
    return list(dict.fromkeys(dataset.table[:256][dataset.args.caption_column]))[:k]


def count_classes(dataset):
    if isinstance(dataset, MNISTDataset):
        return 10
    if dataset.label_names:
        return len(dataset.label_names)
    if isinstance(dataset, HFImageDataset):
        return int(max(dataset.table[dataset.args.label_column])) + 1
    return None


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def split_subfolder(name_or_path, subfolder=None):
    """(name, subfolder) for from_pretrained: a hub id written as "org/repo/sub" is the repo's subfolder."""
    parts = name_or_path.split("/")
    if subfolder is None and len(parts) > 2 and not Path(name_or_path).exists() and "" not in parts:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return name_or_path, subfolder


def load_vae(name_or_path, subfolder=None, flag="--vae_name_or_path"):
    """A frozen AutoencoderKL from its own folder or from the vae/ subfolder of a pipeline (found in a local
    folder, or given); None for pixels."""
    if name_or_path.lower() == "none":
        return None
    if subfolder is None and (Path(name_or_path) / "vae" / "config.json").is_file():
        subfolder = "vae"
    try:
        name, sub = split_subfolder(name_or_path, subfolder)
        vae = AutoencoderKL.from_pretrained(name, subfolder=sub)
    except (OSError, ValueError) as e:
        fix = (
            "pass its folder (config.json + weights), a pipeline folder with vae/, a hub id when online, or none"
            if flag == "--vae_name_or_path"
            else "make it readable here (a local folder, or a hub id when online)"
        )
        fail(f"{flag} {name_or_path}: cannot load an AutoencoderKL ({type(e).__name__}); {fix}")
    vae.loaded_from = {"name_or_path": name_or_path, "subfolder": subfolder}  # what loads it again
    return vae.requires_grad_(False).eval()


def load_text_encoder(name_or_path, tokenizer_name_or_path=None):
    """Tokenizer + frozen encoder through the Auto classes; a full CLIP checkpoint gives its text tower only.
    The tokenizer is read from the encoder's folder unless it is given (a pipeline's tokenizer/)."""
    name, sub = split_subfolder(name_or_path)
    tok_name, tok_sub = split_subfolder(tokenizer_name_or_path or name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, subfolder=sub or "")
        tokenizer = AutoTokenizer.from_pretrained(tok_name, subfolder=tok_sub or "")
    except (OSError, ValueError) as e:
        fail(
            f"--text_encoder_name_or_path {name_or_path}: cannot load it ({type(e).__name__}); pass a local folder "
            f"with config.json and the tokenizer files, or a hub id when online"
        )
    model_cls = {
        "clip": CLIPTextModel,
        "clip_text_model": CLIPTextModel,
        "t5": T5EncoderModel,
        "mt5": T5EncoderModel,
        "umt5": T5EncoderModel,
    }.get(config.model_type, AutoModel)
    return tokenizer, model_cls.from_pretrained(name, subfolder=sub or "").requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, text, device):
    """Last hidden states [n, L, D] and attention masks [n, L] (1 = token, 0 = padding), encoded the way `text`
    (see text_convention) says: its prefix before each prompt, L tokens, the mask given to the encoder or not."""
    tokens = tokenizer(
        [text["prefix"] + p for p in prompts],
        padding="max_length",
        max_length=text["tokenizer_max_length"],
        truncation=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    states = text_encoder(tokens.input_ids.to(device), attention_mask=mask if text["use_attention_mask"] else None)[0]
    return states.float(), mask


def build_transformer(args, in_channels, sample_size, num_classes, caption_channels):
    """DiT with the preset's shape. Class: adaLN-Zero blocks whose label table has one extra row, the null class
    at id num_classes. Text: the same blocks with cross-attention to the projected caption states (PixArt-alpha).
    out_channels = in_channels: the variance is fixed, not learned (DiT's second half of channels is dropped)."""
    depth, hidden, heads, patch = model_shape(args)
    common = dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=patch,
    )
    if args.conditioning == "class":
        model = DiTTransformer2DModel(num_embeds_ada_norm=num_classes, **common)
    else:
        model = PixArtTransformer2DModel(
            cross_attention_dim=hidden, caption_channels=caption_channels, use_additional_conditions=False, **common
        )
    return disable_label_dropout(initialize_weights(model) if args.weight_init == "adaln_zero" else model)


@torch.no_grad()
def initialize_weights(model):
    """DiT's initialisation, which diffusers leaves out (its classes expect pretrained weights): Xavier-uniform
    linear layers and patch projection, N(0, 0.02) embeddings, and zeros for every adaLN modulation, the final
    layer and (text) the cross-attention output, so each block starts as the identity: the "Zero" of adaLN-Zero."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    patch = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    torch.nn.init.zeros_(patch.bias)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) or (
            isinstance(module, torch.nn.Linear) and ("timestep_embedder" in name or "caption_projection" in name)
        ):
            torch.nn.init.normal_(module.weight, std=0.02)
        if name.endswith(("norm1.linear", "proj_out_1", "proj_out_2", "attn2.to_out.0")) or name == "proj_out":
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model


def disable_label_dropout(model):
    """diffusers' LabelEmbedding drops labels by itself in train mode, independently in every block (each DiT block
    has its own embedding), from the global RNG. Guidance dropout is done once per example in training_step."""
    for module in model.modules():
        if hasattr(module, "token_drop"):
            module.dropout_prob = 0.0
    return model


def condition_kwargs(cond):
    """Model keyword arguments for a condition dict (class labels, or caption states and mask)."""
    if "class_labels" in cond:
        return {"class_labels": cond["class_labels"]}
    return {
        "encoder_hidden_states": cond["states"],
        "encoder_attention_mask": cond["mask"],
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def drop_condition(cond, null, drop):
    """Replace the condition of the examples where `drop` is True by the null condition (batch of one)."""
    out = {}
    for key, value in cond.items():
        mask = drop.view(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, null[key].expand_as(value).to(value.dtype), value)
    return out


def null_and_cond(cond, null):
    """[unconditional; conditional] along the batch, for one model call per guided step."""
    return {k: torch.cat([null[k].expand_as(v).to(v.dtype), v]) for k, v in cond.items()}


def build_noise_scheduler(args):
    if args.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.num_train_timesteps, shift=args.flow_shift)
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        clip_sample=False,
    )


def build_sampler(args, noise_scheduler, pixel_space):
    """flow: Euler on the (shifted) straight path. ddpm: second-order DPM-Solver++ on the training schedule; in
    pixel space its data prediction is clipped to [-1, 1]: at t=T the linear schedule has sqrt(abar) ~ 6e-3, so
    x0 = (x_t - sigma * eps) / sqrt(abar) multiplies epsilon errors by ~150."""
    if args.objective == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    return DPMSolverMultistepScheduler.from_config(
        noise_scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=pixel_space,
        sample_max_value=1.0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Objective and sampler
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def batch_to_inputs(batch, vae, vae_scale, generator, args):
    """The clean model input x_0 of a batch: pixels, or a latent drawn afresh from the VAE posterior (online or
    stored), scaled as diffusers does; random flips drawn here from `generator`, so resume stays exact."""
    device = generator.device
    if "latent_mean" in batch:  # precomputed
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        if "latent_mean_flipped" in batch:
            flip = (torch.rand(mean.shape[0], generator=generator, device=device) < 0.5).view(-1, 1, 1, 1)
            mean = torch.where(flip, batch["latent_mean_flipped"].to(device), mean)
            std = torch.where(flip, batch["latent_std_flipped"].to(device), std)
    else:
        pixels = batch["pixels"].to(device)
        if args.random_flip:
            flip = (torch.rand(pixels.shape[0], generator=generator, device=device) < 0.5).view(-1, 1, 1, 1)
            pixels = torch.where(flip, pixels.flip(-1), pixels)
        if vae is None:
            return pixels
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
    return (latents - vae_scale["shift_factor"]) * vae_scale["scaling_factor"]


def training_step(model, noise_scheduler, x0, cond, null, args, generator):
    """Noise a batch at random levels, drop conditions for guidance; per-sample losses and noise levels in [0, 1]."""
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    # Classifier-free guidance: the unconditional branch is the same network reading the null condition.
    drop = torch.rand(n, generator=generator, device=device) < args.cond_dropout_prob
    cond = drop_condition(cond, null, drop)
    num_t = noise_scheduler.config.num_train_timesteps
    if args.objective == "flow":
        u = compute_density_for_timestep_sampling(
            args.weighting_scheme,
            n,
            args.logit_mean,
            args.logit_std,
            args.mode_scale,
            device=device,
            generator=generator,
        )
        sigma = args.flow_shift * u / (1 + (args.flow_shift - 1) * u)  # the sampler's shift, so both agree
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise  # a straight line from data (s=0) to noise (s=1)
        target = noise - x0  # its velocity d x_s / d s
        timesteps, level = sigma * num_t, sigma
    else:
        timesteps = torch.randint(0, num_t, (n,), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)  # variance preserving
        target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
        level = timesteps.float() / num_t
    pred = model(noisy, timestep=timesteps, **condition_kwargs(cond)).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.objective == "ddpm" and args.snr_gamma:  # min(SNR, gamma) in x0 units over the target's own weight
        snr = compute_snr(noise_scheduler, timesteps)
        base = snr if args.prediction_type == "epsilon" else snr + 1
        per_sample = per_sample * snr.clamp(max=args.snr_gamma) / base
    return per_sample, level


@torch.no_grad()
def sample(model, sampler, cond, null, shape, guidance_scale, num_inference_steps, generator, guidance_interval=None):
    """Generate model inputs of `shape` (pixels or scaled latents) with classifier-free guidance on all channels,
    optionally only inside a noise-level interval. Both samplers start from unit-variance noise."""
    device, dtype = generator.device, next(model.parameters()).dtype
    x = torch.randn(shape, generator=generator, device=device)
    # The model's condition arguments for a plain step and for a guided one ([unconditional; conditional]).
    plain, both = (
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}
        for c in (cond, null_and_cond(cond, null))
    )
    plain, both = condition_kwargs(plain), condition_kwargs(both)
    num_t = sampler.config.num_train_timesteps
    sampler.set_timesteps(num_inference_steps, device=device)
    for t in sampler.timesteps:
        level = float(t) / num_t
        guided = guidance_scale != 1.0 and (
            guidance_interval is None or guidance_interval[0] <= level <= guidance_interval[1]
        )
        x_in = torch.cat([x, x]) if guided else x
        pred = model(x_in.to(dtype), timestep=t.expand(x_in.shape[0]), **(both if guided else plain)).sample.float()
        if guided:
            uncond, conditional = pred.chunk(2)
            pred = uncond + guidance_scale * (conditional - uncond)
        x = sampler.step(pred, t, x).prev_sample
    return x


@torch.no_grad()
def decode(x, vae, vae_scale):
    """Model inputs -> images in [-1, 1]."""
    if vae is not None:
        x = vae.decode((x / vae_scale["scaling_factor"] + vae_scale["shift_factor"]).to(vae.dtype)).sample.float()
    return x.clamp(-1, 1)


def to_uint8(images, crop):
    """[n, C, R, R] in [-1, 1] -> uint8 [n, R', R'] (one channel) or [n, R', R', 3]; `crop` removes the MNIST pad."""
    if crop:
        images = images[..., crop:-crop, crop:-crop]
    images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    return images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# Validation, plots and evaluation samples
# ----------------------------------------------------------------------------------------------------------------
class ImageGenerator:
    """Everything sampling needs, from training or from an export."""

    def __init__(self, model, sampler, vae, vae_scale, null, shape, crop):
        self.model, self.sampler, self.vae, self.vae_scale = model, sampler, vae, vae_scale
        self.null, self.shape, self.crop = null, shape, crop
        self.device = next(iter(null.values())).device

    def images(self, cond, n, guidance_scale, args, generator):
        x = sample(
            self.model,
            self.sampler,
            cond,
            self.null,
            (n, *self.shape),
            guidance_scale,
            args.num_inference_steps,
            generator,
            args.guidance_interval,
        )
        return to_uint8(decode(x, self.vae, self.vae_scale), self.crop)


def log_validation(gen, rows, args, path, trackers=(), step=0, per_row=4):
    """Grid: one row per class or prompt, one panel per guidance scale, labelled; written to `path` and sent to the
    trackers (TensorBoard: an image; wandb: an image captioned with its classes or prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, cond = rows
    n = len(names)
    repeated = {k: v.repeat_interleave(per_row, dim=0) for k, v in cond.items()}
    scales = args.validation_guidance_scales
    fig, axes = plt.subplots(1, len(scales), figsize=(1.6 * per_row * len(scales) + 2, 1.4 * n + 0.6), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        generator = torch.Generator(gen.device).manual_seed(args.seed)  # same noise in every panel and step
        images = gen.images(repeated, n * per_row, scale, args, generator)
        h, w = images.shape[1:3]
        grid = images.view(n, per_row, h, w, -1).permute(0, 2, 1, 3, 4).reshape(n * h, per_row * w, -1)
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"guidance {scale:g}")
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(n)])
        ax.set_yticklabels([str(s)[:40] for s in names] if ax is axes[0][0] else [])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    if trackers:
        caption = f"rows: {'; '.join(str(s) for s in names)}; guidance {', '.join(f'{s:g}' for s in scales)}"
        log_image(trackers, path, step, caption)


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
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    for k in sorted(k for k in rows[-1] if k.startswith("loss_t")):  # loss per noise-level bin, as minRF logs it
        ax.plot([r["step"] for r in rows], [r.get(k, float("nan")) for r in rows], lw=0.8, label=k)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def write_eval_samples(gen, num_classes, args, path):
    """N class-conditional samples balanced over the classes at --guidance_scale: images uint8, labels [N]."""
    labels = torch.arange(args.num_eval_samples, device=gen.device) % num_classes
    generator = torch.Generator(gen.device).manual_seed(args.seed + 1)
    start, chunks = time.perf_counter(), []
    for batch in labels.split(args.eval_batch_size):
        chunks.append(gen.images({"class_labels": batch}, len(batch), args.guidance_scale, args, generator))
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
# Copied from train_mnist.file_digest
def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# Copied from train_mnist.write_manifest
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


# Copied from train_mnist.manifest_problem
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


# Copied from train_mnist.save_ema
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


def save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, write_sampling_files):
    """accelerate's save_state, the EMA model (transformer_ema/, or transformer/ without EMA) with what
    --sample_from needs, the objective's RNG and the data position, in a temp folder; a manifest written last,
    then an atomic rename. `position` is (epoch, batches of --train_batch_size consumed in it by all processes)."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        # Model (safetensors), optimizer, data sampler and the global RNGs of every process.
        accelerator.save_state(str(tmp))
        save_file({"state": train_rng.get_state()}, tmp / f"train_rng_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            # unwrap_model strips DDP; --torch_compile compiles in place (no wrapper to strip, which unwrap_model
            # would keep by default), so these are the plain model's parameter names.
            plain = accelerator.unwrap_model(model)
            state = {
                "script": "train_dit.py",
                "global_step": global_step,
                "num_processes": accelerator.num_processes,
                "epoch": position[0],
                "epoch_batches": position[1],
                "model": args.model,
                "conditioning": args.conditioning,
                "ema": None,
            }
            if ema is not None:
                save_ema(ema, plain, tmp / "transformer_ema")
                state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            else:
                plain.save_pretrained(tmp / "transformer")
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


# Copied from train_mnist.list_checkpoints
def list_checkpoints(output_dir):
    """Complete checkpoints (those with a manifest), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# Copied from train_mnist.find_checkpoint
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


def load_checkpoint(accelerator, path, model, ema, train_rng, args):
    """Restore everything save_checkpoint wrote; returns training_state.json. Nothing loaded can run code.

    A checkpoint of N processes resumes on M != N at the same step, learning rate and number of samples seen
    (weights, optimizer and EMA are the same on every process); the random streams of the objective are derived
    anew for the M processes, so the run is not bitwise the one it would have been on N."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != "train_dit.py":
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not train_dit.py")
    if (state["model"], state["conditioning"]) != (args.model, args.conditioning):
        fail(
            f"--resume_from_checkpoint {path}: a {state['model']} {state['conditioning']} model; pass the same "
            f"--model and --conditioning"
        )
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
            path / "transformer_ema" / "diffusion_pytorch_model.safetensors", device=str(ema.shadow_params[0].device)
        )
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(model).named_parameters()]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def widen_label_tables(model, num_classes):
    """A copy of a class-conditional DiT whose label tables have rows for 1000 classes + the null class at 1000,
    where DiTPipeline looks for it; rows num_classes..999 repeat the null row. Sampling is unchanged."""
    config = dict(model.config)
    config["num_embeds_ada_norm"] = PIPELINE_NULL_CLASS
    wide = DiTTransformer2DModel.from_config(config)
    state = model.state_dict()
    for key, table in state.items():
        if key.endswith("class_embedder.embedding_table.weight"):
            rows = table[num_classes : num_classes + 1].expand(PIPELINE_NULL_CLASS + 1 - num_classes, -1)
            state[key] = torch.cat([table[:num_classes], rows])
    wide.load_state_dict(state)
    return wide


def why_not_dit_pipeline(args, vae, meta):
    """None when diffusers' DiTPipeline samples this model as train_dit.py does; otherwise the reason, recorded in
    export_config.json. DiTPipeline feeds class id 1000 as the null class and decodes vae.decode(z / scale)."""
    if args.conditioning != "class":
        return "text-conditioned: DiTPipeline is class-conditional"
    if vae is None:
        return "pixel space: DiTPipeline decodes latents with a VAE"
    if args.objective != "ddpm":
        return "flow objective: DiTPipeline samples the ddpm objective"
    if meta["num_classes"] > PIPELINE_NULL_CLASS:
        return (
            f"{meta['num_classes']} classes: DiTPipeline uses class id {PIPELINE_NULL_CLASS} as the null "
            f"class, here a real class (the null class is {meta['num_classes']})"
        )
    if meta["vae_scale"]["shift_factor"]:
        return (
            f"the VAE has shift_factor {meta['vae_scale']['shift_factor']}: DiTPipeline decodes z / "
            f"scaling_factor without adding it back"
        )
    return None


def write_sampling_files(sampler, meta, folder):
    """The sampler and export_config.json (conditioning, labels, text encoder, input layout, and the VAE as
    name_or_path + subfolder): with the transformer beside them, what --sample_from needs."""
    sampler.save_pretrained(folder / "scheduler")
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))


def model_card(args, meta, global_step, metrics_path):
    """README.md of the export: the Hub's YAML front matter, then how it was trained and how to sample it."""
    from huggingface_hub import ModelCardData

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    condition = "class-conditional" if args.conditioning == "class" else "text-to-image"
    if args.dataset_name == "mnist":
        datasets = ["ylecun/mnist"]
    elif args.dataset_name and not Path(args.dataset_name).exists():  # a hub name, not a local dataset
        datasets = [args.dataset_name]
    else:
        datasets = None
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        datasets=datasets,
        tags=["diffusers", "dit", condition, "image-generation"],
    )
    command = " ".join(["python train_dit.py", *sys.argv[1:]])
    if args.conditioning == "class":
        what = f"{meta['num_classes']} classes"
    else:
        what = f"prompts read by the frozen text encoder `{meta['text_encoder']}`"
    space = f"latents of the VAE `{meta['vae']['name_or_path']}`" if meta["vae"] else "pixels"
    return f"""---
{data.to_yaml()}
---

# {condition.capitalize()} DiT (train_dit.py)

A Diffusion Transformer ({args.model}, {args.objective} objective) trained from scratch on {space}, conditioned
on {what}: {global_step} optimizer steps, final loss {rows[-1]["loss"]:.4f}. The weights are the EMA weights.
`export_config.json` says how to sample it (and whether diffusers' `DiTPipeline` loads this folder).

Training command:

```bash
{command}
```

Sample it with the script:

```bash
python train_dit.py --sample_from THIS_FOLDER --output_dir samples
```

![samples at guidance {", ".join(f"{s:g}" for s in args.validation_guidance_scales)}](samples.png)
"""


def export_model(model, sampler, vae, args, meta, output_dir, card, grid):
    """diffusers save_pretrained layout with the EMA weights: transformer/ + scheduler/ (+ vae/), and
    export_config.json (conditioning, labels, text encoder, input layout). A class-conditional latent ddpm
    model is written as a DiTPipeline (model_index.json), loadable with DiTPipeline.from_pretrained, when that
    pipeline samples it right (see why_not_dit_pipeline); export_config.json says which layout was written.
    The model card (README.md, samples.png) is written beside them. Each part is written under a temporary name
    and renamed; manifest.json, written last, says the export is complete."""
    model = model.float()
    if args.conditioning == "class" and meta["num_classes"] < PIPELINE_NULL_CLASS:
        model = widen_label_tables(model, meta["num_classes"])  # in any layout: the null class is 1000
    reason = why_not_dit_pipeline(args, vae, meta)
    meta = {**meta, "diffusers_pipeline": None if reason else "DiTPipeline", "why_no_pipeline": reason}
    if vae is not None:
        meta["latents"] = (
            "z = (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor, "
            "decoded as vae.decode(z / scaling_factor + shift_factor) (vae_scale)"
        )
    (output_dir / MANIFEST).unlink(missing_ok=True)  # until the new manifest: visibly incomplete
    tmp = output_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if reason is None:
        # DiTPipeline splits each name on commas (ImageNet's synonyms) and needs strings.
        names = meta["label_names"] or [str(i) for i in range(meta["num_classes"])]
        id2label = {i: str(name) for i, name in enumerate(names)}
        pipeline = DiTPipeline(transformer=model, vae=vae.float(), scheduler=sampler, id2label=id2label)
        pipeline.save_pretrained(tmp)  # model_index.json, transformer/, vae/, scheduler/
    else:
        model.save_pretrained(tmp / "transformer")
        if vae is not None:
            vae.save_pretrained(tmp / "vae")
    write_sampling_files(sampler, meta, tmp)
    (tmp / "README.md").write_text(card)
    shutil.copyfile(grid, tmp / "samples.png")
    parts = sorted(p.name for p in tmp.iterdir())
    if "model_index.json" not in parts:  # left by an earlier export here, it would claim a DiTPipeline
        (output_dir / "model_index.json").unlink(missing_ok=True)
    for name in parts:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()
    write_manifest(output_dir, parts)


# Copied from train_mnist.RunLock
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


# Copied from train_mnist.claim_output_dir
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


# Copied from train_mnist.write_run_config
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


# Copied from train_mnist.StopRequest
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
    meta = json.loads((export / EXPORT_CONFIG).read_text())
    device = accelerator.device
    model_cls = DiTTransformer2DModel if meta["conditioning"] == "class" else PixArtTransformer2DModel
    subfolder = "transformer" if (export / "transformer").is_dir() else "transformer_ema"  # or a checkpoint
    model = model_cls.from_pretrained(export, subfolder=subfolder).to(device).eval()
    scheduler_cls = FlowMatchEulerDiscreteScheduler if meta["objective"] == "flow" else DPMSolverMultistepScheduler
    sampler = scheduler_cls.from_pretrained(export / "scheduler")
    vae = None
    if meta["vae"] and (export / "vae").is_dir():  # an export holds a copy of the VAE
        vae = load_vae(str(export), "vae", flag="--sample_from")
    elif meta["vae"]:  # a checkpoint names it, as from_pretrained loads it
        vae = load_vae(
            meta["vae"]["name_or_path"],
            meta["vae"]["subfolder"],
            flag=f"--sample_from {export}: the VAE that {EXPORT_CONFIG} names",
        )
    if vae is not None:
        vae.to(device)
    if meta["conditioning"] == "class":
        null = {"class_labels": torch.tensor([model.config.num_embeds_ada_norm], device=device)}
        ids = args.validation_class_ids or list(range(min(meta["num_classes"], 10)))
        names = [meta["label_names"][i] if meta["label_names"] else str(i) for i in ids]
        rows = (names, {"class_labels": torch.tensor(ids, device=device)})
    else:
        # Prompts encoded as in training (an export without "text" was trained with the mask on and no prefix).
        text = meta.get("text") or {
            "text_encoder": meta["text_encoder"],
            "tokenizer": meta["text_encoder"],
            "prefix": "",
            "use_attention_mask": True,
            "tokenizer_max_length": meta["tokenizer_max_length"],
        }
        if args.text_encoder_name_or_path:
            text = {**text, "text_encoder": args.text_encoder_name_or_path, "tokenizer": None}
        tokenizer, text_encoder = load_text_encoder(text["text_encoder"], text["tokenizer"])
        text_encoder.to(device)
        states, mask = encode_prompts(tokenizer, text_encoder, [""], text, device)
        null = {"states": states, "mask": mask}
        prompts = args.validation_prompts or meta["validation_prompts"]
        states, mask = encode_prompts(tokenizer, text_encoder, prompts, text, device)
        rows = (prompts, {"states": states, "mask": mask})
    gen = ImageGenerator(model, sampler, vae, meta["vae_scale"], null, meta["input_shape"], meta["crop"])
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        log_validation(gen, rows, args, output_dir / "samples" / "export.png")
        if args.num_eval_samples and meta["conditioning"] == "class":
            seconds = write_eval_samples(gen, meta["num_classes"], args, output_dir / "eval_samples.npz")
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
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
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
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- Frozen VAE (or pixels) and the input layout ----------------------------------------------------------
    index = read_precomputed_index(args) if args.precomputed_data_dir else None
    text = text_convention(args, index) if args.conditioning == "text" else None
    if index:  # the VAE the shards were encoded with: with precomputed latents it only decodes samples
        vae = load_vae(
            index["vae"]["name_or_path"],
            index["vae"].get("subfolder"),
            flag=f"--precomputed_data_dir {args.precomputed_data_dir}: index.json's VAE",
        )
    else:
        vae = load_vae(args.vae_name_or_path)
    if index:
        vae_scale = {
            "scaling_factor": index["vae"]["scaling_factor"],
            "shift_factor": index["vae"].get("shift_factor") or 0.0,
        }
        resolution = index["resolution"]
        shape = [index["vae"]["latent_channels"], index["vae"]["latent_size"], index["vae"]["latent_size"]]
        factor = resolution // shape[1]
        image_channels = 3
    elif vae is not None:
        vae_scale = {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor or 0.0}
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = [vae.config.latent_channels, args.resolution // factor, args.resolution // factor]
        image_channels, resolution = vae.config.in_channels, args.resolution
    else:
        vae_scale, factor, resolution = {"scaling_factor": 1.0, "shift_factor": 0.0}, 1, args.resolution
        image_channels = 1 if args.dataset_name == "mnist" else 3
        shape = [image_channels, resolution, resolution]
    if vae is not None:
        vae.to(device, dtype=weight_dtype)
    patch = model_shape(args)[3]
    if resolution % (factor * patch):
        fail(f"--resolution {resolution}: must be divisible by the patch size x the VAE factor = {patch} x {factor}")
    if accelerator.is_main_process:
        write_run_config(args, accelerator)

    # ---- Data -------------------------------------------------------------------------------------------------
    dataset = build_dataset(args, image_channels, index)
    num_classes = None
    if args.conditioning == "class":
        found = count_classes(dataset)
        if found is None and args.num_classes is None:
            fail("--num_classes: the data does not say how many classes it has; pass it")
        if found is not None and args.num_classes not in (None, found):
            fail(f"--num_classes {args.num_classes}: the data has {found} classes; drop the flag or fix it")
        num_classes = found or args.num_classes
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate,
    )

    # ---- Conditions: class ids, or a frozen text encoder (not needed with precomputed states) -----------------
    tokenizer = text_encoder = None
    if args.conditioning == "class":
        null = {"class_labels": torch.tensor([num_classes], device=device)}
        caption_channels = None
        ids = args.validation_class_ids or list(range(min(num_classes, 10)))
        names = [dataset.label_names[i] if dataset.label_names else str(i) for i in ids]
        validation_rows = (names, {"class_labels": torch.tensor(ids, device=device)})
    elif index:
        empty = load_file(Path(args.precomputed_data_dir) / "empty_prompt.safetensors")
        key = index["text_encoders"][0]["key"]
        null = {
            "states": empty[f"{key}.hidden_states"].float().to(device),
            "mask": empty[f"{key}.attention_mask"].long().to(device),
        }
        caption_channels = null["states"].shape[-1]
        first = [dataset[i] for i in range(min(4, len(dataset)))]
        with safe_open(str(dataset.files[0]), framework="pt") as f:
            names = json.loads(f.metadata()["captions"])[: len(first)]
        validation_rows = (
            names,
            {
                "states": torch.stack([e["text_states"] for e in first]).to(device),
                "mask": torch.stack([e["text_mask"] for e in first]).to(device),
            },
        )
    else:
        tokenizer, text_encoder = load_text_encoder(text["text_encoder"], text["tokenizer"])
        text_encoder.to(device, dtype=weight_dtype)
        states, mask = encode_prompts(tokenizer, text_encoder, [""], text, device)
        null = {"states": states, "mask": mask}
        caption_channels = states.shape[-1]
        prompts = args.validation_prompts or first_captions(dataset)
        states, mask = encode_prompts(tokenizer, text_encoder, prompts, text, device)
        validation_rows = (prompts, {"states": states, "mask": mask})

    # What sampling needs besides the weights: in export_config.json of every checkpoint and of the export.
    label_names = getattr(dataset, "label_names", None)
    meta = {
        "conditioning": args.conditioning,
        "objective": args.objective,
        "model": args.model,
        "num_classes": num_classes,
        "label_names": [str(n) for n in label_names] if label_names else None,
        "vae": None if vae is None else vae.loaded_from,
        "vae_scale": vae_scale,
        "input_shape": shape,
        "resolution": resolution,
        "crop": crop_of(args, index),
        "guidance_scale": args.guidance_scale,
        "text_encoder": text["text_encoder"] if text else None,
        "tokenizer_max_length": text["tokenizer_max_length"] if text else None,
        "text": text,
        "validation_prompts": validation_rows[0] if args.conditioning == "text" else None,
    }

    # ---- Model, noise schedule, EMA ---------------------------------------------------------------------------
    model = build_transformer(args, shape[0], shape[1], num_classes, caption_channels)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    noise_scheduler = build_noise_scheduler(args)
    sampler = build_sampler(args, noise_scheduler, pixel_space=vae is None)
    sampling_files = functools.partial(write_sampling_files, sampler, meta)
    ema = None
    if args.use_ema:  # starts as a copy of the initial weights
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_decay,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=args.ema_power,
            foreach=True,
        )
        ema.to(device)
    accelerator.print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"input {shape} ({'pixels' if factor == 1 else 'latents'}), {len(dataset)} examples"
    )

    # ---- Optimizer and LR schedule ----------------------------------------------------------------------------
    # Fused AdamW: one kernel for all tensors, and it can skip a non-finite step on the device (found_inf below).
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if args.torch_compile:
        model.compile()  # in place: state_dict keys (checkpoints, export) stay those of the plain model
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # Every random draw of the objective comes from this generator, saved in each checkpoint. The global RNG
    # cannot be trusted for exact resume: each DataLoader iterator draws its base seed from it.
    train_rng = torch.Generator(device).manual_seed(args.seed * 1000 + accelerator.process_index)

    # ---- Resume -----------------------------------------------------------------------------------------------
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, model, ema, train_rng, args)
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
    num_bins = 4  # loss per quarter of the noise-level range: where the model still has to learn
    bin_loss = torch.zeros(num_bins, device=device)
    bin_count = torch.zeros(num_bins, device=device)
    # Optimizer steps with a non-finite gradient: in total, in the current run, and the longest run since the
    # last logging step (the only place the host reads them).
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=device).unbind()
    # Unreadable images this process drew (each replaced by a readable one), summed over processes when logging.
    skipped = torch.zeros((), device=device)
    window_start, window_samples = time.perf_counter(), 0
    position = (first_epoch, batches_to_skip * accelerator.num_processes)
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        epoch_batches = batches_to_skip if epoch == first_epoch else 0  # per process, for the data position
        for batch in batches:
            epoch_batches += 1
            skipped += batch.pop("skipped")  # a host number added on the device: no sync
            with accelerator.accumulate(model):
                x0 = batch_to_inputs(batch, vae, vae_scale, train_rng, args)
                if args.conditioning == "class":
                    cond = {"class_labels": batch["label"].to(device)}
                elif "text_states" in batch:
                    cond = {"states": batch["text_states"].to(device), "mask": batch["text_mask"].to(device)}
                else:
                    states, mask = encode_prompts(tokenizer, text_encoder, batch["caption"], text, device)
                    cond = {"states": states, "mask": mask}
                per_sample, level = training_step(model, noise_scheduler, x0, cond, null, args, train_rng)
                accelerator.backward(per_sample.mean())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    # The norm is the same on every process (all-reduced gradients). A non-finite one skips the
                    # update on the device: the fused AdamW kernel leaves weights and moments as they were where
                    # found_inf is 1. With fp16 the GradScaler sets found_inf itself; it skips exactly the steps
                    # whose unscaled norm is non-finite, so they are counted here too.
                    nonfinite = (~torch.isfinite(grad_norm)).float()
                    if accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bins = (level * num_bins).long().clamp(0, num_bins - 1)
            bin_loss.index_add_(0, bins, per_sample.detach().float())
            bin_count.index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float))
            window_samples += x0.shape[0] * accelerator.num_processes
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
                ema.step(model.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                totals = accelerator.reduce(torch.cat([bin_loss, bin_count, skipped.view(1)]), "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                elapsed = time.perf_counter() - window_start
                losses, counts = totals[:num_bins], totals[num_bins : 2 * num_bins]
                row = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": (losses.sum() / counts.sum().clamp(min=1)).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                    "nonfinite_steps": int(total_nonfinite),
                    "skipped_images": int(totals[-1]),
                }
                row.update({f"loss_t{i}": (losses[i] / counts[i]).item() for i in range(num_bins) if counts[i] > 0})
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
                path = save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, sampling_files)
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
                if ema is not None:
                    ema.store(model.parameters())
                    ema.copy_to(model.parameters())
                gen = ImageGenerator(
                    accelerator.unwrap_model(model).eval(), sampler, vae, vae_scale, null, shape, crop_of(args, index)
                )
                log_validation(
                    gen,
                    validation_rows,
                    args,
                    output_dir / "samples" / f"step-{global_step}.png",
                    accelerator.trackers,
                    global_step,
                )
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
    skipped_images = int(accelerator.reduce(skipped, "sum").item())
    if skipped_images:
        accelerator.print(
            f"warning: {skipped_images} unreadable images were drawn, each replaced by the next readable one"
        )

    # ---- Final checkpoint, samples and export (EMA weights) ---------------------------------------------------
    save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, sampling_files)
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model).eval()
        if ema is not None:
            ema.copy_to(final_model.parameters())
        gen = ImageGenerator(final_model, sampler, vae, vae_scale, null, shape, meta["crop"])
        grid = output_dir / "samples" / f"step-{global_step}.png"
        log_validation(gen, validation_rows, args, grid, accelerator.trackers, global_step)
        plot_loss(metrics_path, output_dir / "loss.png")
        summary = {"global_step": global_step, "train_seconds": train_seconds, "skipped_images": skipped_images}
        if args.num_eval_samples and args.conditioning == "class":
            summary["sample_seconds"] = write_eval_samples(gen, num_classes, args, output_dir / "eval_samples.npz")
        card = model_card(args, meta, global_step, metrics_path)
        export_model(final_model, sampler, vae, args, meta, output_dir, card, grid)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"done: step {global_step}, {train_seconds / 60:.1f} min of training; export in {output_dir}")
    accelerator.end_training()


def crop_of(args, index):
    """Border to remove from generated images: the padding added to 28x28 MNIST digits."""
    return (args.resolution - MNIST_SIZE) // 2 if args.dataset_name == "mnist" and index is None else 0


if __name__ == "__main__":
    main(parse_args())
