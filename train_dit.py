"""Train a Diffusion Transformer (DiT) from scratch, class- or text-conditioned, on VAE latents or pixels.

diffusers' DiTTransformer2DModel for classes, PixArtTransformer2DModel for a frozen text encoder's states. Loss: MSE
on the noise or v (`--objective ddpm`) or on the velocity noise - data (`flow`); --cond_dropout_prob trains the
unconditional branch of classifier-free guidance.

    python train_dit.py --dataset_name mnist --data_root ./data --vae_name_or_path none --resolution 32
    accelerate launch train_dit.py --train_data_dir imagenet/train --model DiT-XL/2 --mixed_precision bf16
"""

import argparse
import atexit
import errno
import functools
import hashlib
import io
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
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

# (depth, width, heads) of the DiT paper's models
PRESETS = {"DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16)}
MNIST_SIZE = 28
EXPORT_CONFIG = "export_config.json"
MANIFEST = "manifest.json"  # written last in a checkpoint or export: the commit point
LOCK = "run.lock"  # one training run per output folder
DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"
PIPELINE_NULL_CLASS = 1000  # DiTPipeline's null class id


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
    g = parser.add_argument_group("data (one of --dataset_name, --train_data_dir, --precomputed_data_dir)")
    g.add_argument("--dataset_name", help='Hub id or local dataset; "mnist": MNIST from --data_root.')
    g.add_argument("--dataset_config_name")
    g.add_argument("--data_root", default="./data", help="Folder holding MNIST/raw; downloaded when missing.")
    g.add_argument("--train_data_dir", help="Image folder: a subfolder per class and/or a metadata.jsonl.")
    g.add_argument("--precomputed_data_dir", help="Shards of prepare_data_multi_gpu.py.")
    g.add_argument("--image_column", default="image")
    g.add_argument("--label_column", default="label")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--caption_template", default="A handwritten digit {}", help="MNIST captions; {} is the digit.")
    g.add_argument("--resolution", type=int, default=256, help="Resized and center-cropped; MNIST is padded.")
    g.add_argument(
        "--image_interpolation_mode",
        default="lanczos",
        choices=[m.name.lower() for m in transforms.InterpolationMode],
    )
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--max_samples", type=int)
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("models", "--depth, --hidden_size, --num_heads, --patch_size override the preset.")
    g.add_argument("--model", default="DiT-XL/2", help=f"One of {sorted(PRESETS)} + /2, /4 or /8 (patch size).")
    g.add_argument("--depth", type=int)
    g.add_argument("--hidden_size", type=int)
    g.add_argument("--num_heads", type=int)
    g.add_argument("--patch_size", type=int)
    g.add_argument("--conditioning", choices=["class", "text"], default="class")
    g.add_argument(
        "--weight_init",
        choices=["pytorch", "adaln_zero"],
        default="pytorch",
        help="pytorch: diffusers' (the recipe in docs/dit.md); adaln_zero: DiT's, each block starts as the identity.",
    )
    g.add_argument("--num_classes", type=int, help="When the data does not say.")
    g.add_argument(
        "--vae_name_or_path",
        default="stabilityai/sd-vae-ft-ema",
        help='AutoencoderKL hub id or folder (or its vae/ subfolder); "none": train on pixels.',
    )
    g.add_argument(
        "--text_encoder_name_or_path",
        help=f"CLIP, BERT or T5. Default: the shards', the export's or {DEFAULT_TEXT_ENCODER}.",
    )
    g.add_argument("--tokenizer_max_length", type=int, help="Default: the shards', or 77.")

    g = parser.add_argument_group("objective")
    g.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon", help="ddpm only.")
    g.add_argument("--beta_schedule", default="linear", help="ddpm only.")
    g.add_argument("--snr_gamma", type=float, default=0.0, help="ddpm: min-SNR loss weighting; 0 = plain MSE.")
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument(
        "--weighting_scheme",
        choices="logit_normal uniform mode".split(),
        default="logit_normal",
        help="flow: density of the training noise level (SD3's).",
    )
    g.add_argument(
        "--flow_shift", type=float, default=1.0, help="flow: noise-level shift, training and sampling; > 1: noisier."
    )
    g.add_argument("--cond_dropout_prob", type=float, default=0.1, help="Probability of dropping the class or caption.")

    g = parser.add_argument_group("optimisation (defaults: DiT's)")
    g.add_argument("--output_dir", default="output_dit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", "--batch_size", type=int, default=32, help="Per process.")
    g.add_argument("--num_train_epochs", "--epochs", "--num_epochs", type=int, default=80)
    g.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--lr_scheduler", default="constant", help="A diffusers get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--max_nonfinite_steps", type=int, default=10, help="Stop after N steps in a row with a non-finite gradient."
    )
    g.add_argument(
        "--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Sample and export EMA weights."
    )
    g.add_argument("--ema_decay", type=float, default=0.9999, help="Reached after the warmup.")
    g.add_argument("--ema_power", type=float, default=0.75, help="Warmup: decay = 1 - (1 + step) ** -power.")

    g = parser.add_argument_group("speed and memory")
    g.add_argument(
        "--mixed_precision", choices="no fp16 bf16".split(), help="Default: accelerate's config; fp16 needs CUDA."
    )
    g.add_argument("--device", choices="auto cpu cuda".split(), default="auto")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--torch_compile", action="store_true")

    g = parser.add_argument_group("sampling and evaluation")
    g.add_argument("--guidance_scale", type=float, default=1.5, help="Of --num_eval_samples; 1 = none.")
    g.add_argument("--guidance_interval", type=float_list, help="LO,HI: guide only at noise levels t/T in [LO, HI].")
    g.add_argument("--validation_guidance_scales", type=float_list, default=[1.0, 1.5, 4.0], help="Grid columns.")
    g.add_argument("--validation_class_ids", type=int_list, help="Grid rows; default: the first 10 classes.")
    g.add_argument("--validation_prompts", nargs="+", help="Grid rows; default: the data's first captions.")
    g.add_argument("--num_inference_steps", type=int, default=25, help="DPM-Solver++ (ddpm) or Euler (flow) steps.")
    g.add_argument("--num_eval_samples", type=int, default=0, help="Class-balanced samples for eval_samples.npz.")
    g.add_argument("--eval_batch_size", type=int, default=250)
    g.add_argument("--sample_from", help="Sample from an export or checkpoint-N folder instead of training.")

    g = parser.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=100)
    g.add_argument("--validation_steps", type=int, default=5000)
    g.add_argument("--checkpointing_steps", type=int, default=5000)
    g.add_argument("--checkpoints_total_limit", type=int, help="Keep the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", help='A checkpoint folder, or "latest" in --output_dir.')
    g.add_argument("--overwrite_output_dir", action="store_true", help="Delete another run's checkpoints there.")
    g.add_argument("--report_to", choices="none tensorboard wandb all".split(), default="none")
    g.add_argument("--tracker_project_name", default="train_dit", help="Project (wandb) or run folder name.")
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


def model_shape(args):
    """(depth, width, heads, patch)."""
    name, _, patch = args.model.partition("/")
    if name not in PRESETS or patch not in ("2", "4", "8"):
        fail(f"--model {args.model}: unknown preset; use one of {sorted(PRESETS)} + /2, /4 or /8")
    depth, hidden, heads = PRESETS[name]
    return (args.depth or depth, args.hidden_size or hidden, args.num_heads or heads, args.patch_size or int(patch))


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
    """Checks of the flags, before any data or model loads."""
    check_shared_flags(args)
    if args.sample_from:
        if not (Path(args.sample_from) / EXPORT_CONFIG).is_file():
            fail(f"--sample_from {args.sample_from}: no {EXPORT_CONFIG}; pass a run's output_dir or checkpoint")
        if problem := manifest_problem(Path(args.sample_from)):
            fail(f"--sample_from {args.sample_from}: damaged or incomplete ({problem}); pass an intact export")
    else:
        if sum(map(bool, (args.dataset_name, args.train_data_dir, args.precomputed_data_dir))) != 1:
            fail("give exactly one of --dataset_name, --train_data_dir, --precomputed_data_dir")
        for flag in ("train_data_dir", "precomputed_data_dir"):
            if (path := getattr(args, flag)) and not Path(path).is_dir():
                fail(f"--{flag} {path}: no such folder")
        name = args.dataset_name
        if name and name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
            fail(f"--dataset_name {name}: no such local dataset; pass a hub id or an existing folder")
        if args.precomputed_data_dir and not (Path(args.precomputed_data_dir) / "index.json").is_file():
            fail(f"--precomputed_data_dir {args.precomputed_data_dir}: no index.json; run prepare_data_multi_gpu.py")
    _, hidden, heads, _ = model_shape(args)
    if hidden % heads:
        fail(f"--hidden_size {hidden}: not divisible by --num_heads {heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    interval = args.guidance_interval or [0, 1]
    if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
        fail(f"--guidance_interval {args.guidance_interval}: give LO,HI with 0 <= LO < HI <= 1")
    if args.flow_shift <= 0:
        fail(f"--flow_shift {args.flow_shift}: must be positive")
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
# An example: "pixels" [C, R, R] in [-1, 1], "label", "caption"; from shards, latents and text states instead.
class MNISTDataset(torch.utils.data.Dataset):
    """torchvision MNIST in memory, padded from 28 to the resolution."""

    def __init__(self, args, channels):
        try:
            mnist = torchvision.datasets.MNIST(args.data_root, train=True, download=True)
        except Exception as e:  # offline, proxy, disk full: all end the same way
            fail(
                f"--data_root {args.data_root}: no MNIST there and the download failed ({type(e).__name__}); "
                "pass a folder holding MNIST/raw"
            )
        pad = (args.resolution - MNIST_SIZE) // 2
        images = mnist.data[: args.max_samples].float().div(127.5).sub(1.0).unsqueeze(1)
        self.images = F.pad(images, (pad, pad, pad, pad), value=-1.0).expand(-1, channels, -1, -1)
        self.labels = mnist.targets[: args.max_samples].long()
        self.label_names = [str(d) for d in range(10)]
        self.template = args.caption_template

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        return dict(pixels=self.images[i], label=label, caption=self.template.format(label))


# Copied from train_ldm_sd.decode_image
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


class HFImageDataset(torch.utils.data.Dataset):
    """A datasets table (hub, local or imagefolder). An unreadable image is replaced by the next readable one and
    counted: a batch keeps its size, so no process misses a step (the others would wait in the all-reduce)."""

    max_unreadable_in_a_row = 64

    def __init__(self, table, args, channels):
        import datasets

        self.table = table.cast_column(args.image_column, datasets.Image(decode=False))
        self.args, self.mode = args, "RGB" if channels == 3 else "L"
        self.label_names = getattr(table.features.get(args.label_column), "names", None)
        interpolation = transforms.InterpolationMode[args.image_interpolation_mode.upper()]
        self.transform = transforms.Compose(
            [
                transforms.Resize(args.resolution, interpolation),
                transforms.CenterCrop(args.resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        for k in range(min(self.max_unreadable_in_a_row, len(self))):
            row = self.table[(i + k) % len(self)]
            image = decode_image(row[self.args.image_column], self.mode)
            if image is not None:
                label = int(row[self.args.label_column]) if self.args.label_column in row else -1
                caption = str(row.get(self.args.caption_column) or "")
                return dict(pixels=self.transform(image), label=label, caption=caption, skipped=int(k > 0))
        raise RuntimeError(f"{self.max_unreadable_in_a_row} unreadable images in a row from example {i}")


class PrecomputedDataset(torch.utils.data.Dataset):
    """Rows of prepare_data_multi_gpu.py's shards, memory-mapped."""

    def __init__(self, root, index, text_key, max_samples):
        self.files = [Path(root) / shard["file"] for shard in index["shards"]]
        self.starts = np.cumsum([0] + [shard["num_examples"] for shard in index["shards"]])
        self.length = min(max_samples or math.inf, int(self.starts[-1]))
        names = ["latent_mean", "latent_std"]
        names += ["latent_mean_flipped", "latent_std_flipped"] if index.get("random_flip") else []
        names += ["label"] if "label" in index["tensors"] else []
        self.keys = {name: name for name in names}  # example key -> stored tensor
        if text_key:
            self.keys.update(text_states=f"{text_key}.hidden_states", text_mask=f"{text_key}.attention_mask")
        self.label_names = index.get("label_names")
        self.handles = {}  # opened per process: a DataLoader worker cannot inherit them

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        if s not in self.handles:
            self.handles[s] = safe_open(str(self.files[s]), framework="pt")
        row = i - int(self.starts[s])
        out = {name: self.handles[s].get_slice(key)[row : row + 1][0].float() for name, key in self.keys.items()}
        out["label"] = int(out["label"]) if "label" in out else -1
        if "text_mask" in out:
            out["text_mask"] = out["text_mask"].long()
        return out


def collate(examples):
    """A batch; "skipped": its stand-ins for unreadable images."""
    skipped = sum(e.pop("skipped", 0) for e in examples)
    return {**torch.utils.data.default_collate(examples), "skipped": skipped}


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
    """How a caption becomes text states (encoder, tokenizer, prefix, length, whether the encoder sees the padding
    mask): the flags, or what index.json says the shards used, so that prompts are encoded the same way later."""
    if index is None:  # the flags as an index.json entry
        name = args.text_encoder_name_or_path or DEFAULT_TEXT_ENCODER
        entry = dict(name_or_path=name, max_length=args.tokenizer_max_length or 77, use_attention_mask=True)
    else:
        entry, tensors = index["text_encoders"][0], index.get("tensors", {})
        key = entry["key"]
        if f"{key}.hidden_states" not in tensors or f"{key}.attention_mask" not in tensors:
            fail(
                f"--precomputed_data_dir {args.precomputed_data_dir}: no {key}.hidden_states and "
                f"{key}.attention_mask in index.json; re-encode the shards"
            )
        for name, value, stored in (
            ("text_encoder_name_or_path", args.text_encoder_name_or_path, entry["name_or_path"]),
            ("tokenizer_max_length", args.tokenizer_max_length, entry["max_length"]),
        ):
            if value not in (None, stored):
                fail(f"--{name} {value}: the shards were encoded with {stored}; drop the flag or re-encode them")
    return dict(
        text_encoder=entry["name_or_path"],
        tokenizer=entry.get("tokenizer") or entry["name_or_path"],
        prefix=entry.get("prefix") or "",
        use_attention_mask=entry.get("use_attention_mask", False),
        tokenizer_max_length=entry["max_length"],
    )


def build_dataset(args, channels, index):
    """The training set, truncated to --max_samples."""
    if index is not None:
        text_key = index["text_encoders"][0]["key"] if args.conditioning == "text" else None
        return PrecomputedDataset(args.precomputed_data_dir, index, text_key, args.max_samples)
    if args.dataset_name == "mnist":
        if args.resolution < MNIST_SIZE or (args.resolution - MNIST_SIZE) % 2:
            fail(f"--resolution {args.resolution}: MNIST is padded from 28, use 28 + an even number")
        return MNISTDataset(args, channels)
    from datasets import load_dataset

    if args.train_data_dir:
        table = load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    else:
        try:
            table = load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        except (FileNotFoundError, ConnectionError, ValueError) as e:  # datasets' not-found errors are among these
            fail(f"--dataset_name {args.dataset_name}: cannot be loaded ({type(e).__name__}); pass a hub id or folder")
    column = "caption_column" if args.conditioning == "text" else "label_column"
    for flag in ("image_column", column):
        if getattr(args, flag) not in table.column_names:
            fail(f"--{flag} {getattr(args, flag)}: not a column of the dataset ({', '.join(table.column_names)})")
    if args.max_samples is not None:
        table = table.select(range(min(args.max_samples, len(table))))
    if len(table) == 0:
        fail("the dataset is empty")
    return HFImageDataset(table, args, channels)


# ---- Models ----
def split_subfolder(name_or_path, subfolder=None):
    """(name, subfolder) for from_pretrained: "org/repo/sub" is a hub repo's subfolder."""
    parts = name_or_path.split("/")
    if subfolder is None and len(parts) > 2 and not Path(name_or_path).exists() and "" not in parts:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return name_or_path, subfolder


def load_vae(name_or_path, subfolder=None, flag="--vae_name_or_path"):
    """A frozen AutoencoderKL (or a pipeline's vae/); None for "none"."""
    if name_or_path.lower() == "none":
        return None
    if subfolder is None and (Path(name_or_path) / "vae" / "config.json").is_file():
        subfolder = "vae"
    try:
        name, sub = split_subfolder(name_or_path, subfolder)
        vae = AutoencoderKL.from_pretrained(name, subfolder=sub)
    except (OSError, ValueError) as e:
        fail(
            f"{flag} {name_or_path}: cannot load an AutoencoderKL ({type(e).__name__}); pass a VAE or pipeline "
            "folder, or a hub id when online"
        )
    vae.loaded_from = dict(name_or_path=name_or_path, subfolder=subfolder)  # what loads it again
    return vae.requires_grad_(False).eval()


def load_text_encoder(name_or_path, tokenizer_name_or_path=None):
    """Tokenizer and frozen encoder (of a CLIP, the text tower)."""
    name, sub = split_subfolder(name_or_path)
    tok_name, tok_sub = split_subfolder(tokenizer_name_or_path or name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, subfolder=sub or "")
        tokenizer = AutoTokenizer.from_pretrained(tok_name, subfolder=tok_sub or "")
    except (OSError, ValueError) as e:
        fail(
            f"--text_encoder_name_or_path {name_or_path}: cannot load it ({type(e).__name__}); pass a model "
            "folder with its tokenizer, or a hub id when online"
        )
    kind = config.model_type
    model_cls = CLIPTextModel if kind.startswith("clip") else T5EncoderModel if "t5" in kind else AutoModel
    return tokenizer, model_cls.from_pretrained(name, subfolder=sub or "").requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, text, device):
    """Last hidden states [n, L, D] and masks [n, L], encoded as the convention `text` says."""
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
    """DiT of the preset's shape with a fixed variance. Class: a label table with the null class at num_classes.
    Text: cross-attention to the caption states (PixArt-alpha)."""
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
    # diffusers' LabelEmbedding drops labels itself in train mode, per block: training_step drops per example.
    for module in model.modules():
        if hasattr(module, "token_drop"):
            module.dropout_prob = 0.0
    return initialize_weights(model) if args.weight_init == "adaln_zero" else model


@torch.no_grad()
def initialize_weights(model):
    """DiT's: Xavier-uniform linear layers, N(0, 0.02) embeddings, zero adaLN modulations, final layer and
    cross-attention output, so that each block starts as the identity."""
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


def condition_kwargs(cond):
    if "class_labels" in cond:
        return dict(class_labels=cond["class_labels"])
    return dict(
        encoder_hidden_states=cond["states"],
        encoder_attention_mask=cond["mask"],
        added_cond_kwargs=dict(resolution=None, aspect_ratio=None),
    )


def drop_condition(cond, null, drop):
    """`cond` with the examples where `drop` is True replaced by `null` (a batch of one)."""
    return {
        key: torch.where(drop.view(-1, *[1] * (value.dim() - 1)), null[key].expand_as(value).to(value.dtype), value)
        for key, value in cond.items()
    }


# ---- Objective ----
def build_noise_scheduler(args):
    if args.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.num_train_timesteps, shift=args.flow_shift)
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
        clip_sample=False,
    )


@torch.no_grad()
def batch_to_inputs(batch, vae, vae_scale, generator, args):
    """x_0: pixels, or a scaled latent drawn from the VAE posterior. Flips come from `generator`: exact resume."""
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
    """Per-sample losses and noise levels in [0, 1], conditions dropped for guidance."""
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device)
    drop = torch.rand(n, generator=generator, device=device) < args.cond_dropout_prob
    cond = drop_condition(cond, null, drop)
    num_t = noise_scheduler.config.num_train_timesteps
    if args.objective == "flow":
        u = compute_density_for_timestep_sampling(
            args.weighting_scheme,
            n,
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            device=device,
            generator=generator,
        )
        sigma = args.flow_shift * u / (1 + (args.flow_shift - 1) * u)  # the sampler's shift
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise  # data at s=0, noise at s=1
        target = noise - x0  # its velocity
        timesteps, level = sigma * num_t, sigma
    else:
        timesteps = torch.randint(0, num_t, (n,), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
        level = timesteps.float() / num_t
    pred = model(noisy, timestep=timesteps, **condition_kwargs(cond)).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.objective == "ddpm" and args.snr_gamma:  # min(SNR, gamma) over the target's own weight
        snr = compute_snr(noise_scheduler, timesteps)
        base = snr if args.prediction_type == "epsilon" else snr + 1
        per_sample = per_sample * snr.clamp(max=args.snr_gamma) / base
    return per_sample, level


# ---- Sampling ----
def build_sampler(args, noise_scheduler, pixel_space):
    """flow: Euler. ddpm: DPM-Solver++, its x0 prediction clipped in pixel space (near t=T it divides epsilon
    errors by sqrt(abar), which is tiny)."""
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


@torch.no_grad()
def sample(model, sampler, cond, null, shape, guidance_scale, num_inference_steps, generator, guidance_interval=None):
    """Model inputs of `shape`, with classifier-free guidance inside guidance_interval."""
    device, dtype = generator.device, next(model.parameters()).dtype
    x = torch.randn(shape, generator=generator, device=device)
    both = {k: torch.cat([null[k].expand_as(v).to(v.dtype), v]) for k, v in cond.items()}  # [uncond; cond]
    plain, both = (
        condition_kwargs({k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}) for c in (cond, both)
    )
    lo, hi = guidance_interval or (0, 1)
    sampler.set_timesteps(num_inference_steps, device=device)
    for t in sampler.timesteps:
        guided = guidance_scale != 1.0 and lo <= float(t) / sampler.config.num_train_timesteps <= hi
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


def sampling_copy(model_cls, config, state, device):
    """A plain (unsharded) model of `config` holding the whole weights `state`, for sampling."""
    copy = model_cls.from_config(config)
    copy.load_state_dict(state)
    return copy.to(device).eval()


@dataclass
class ImageGenerator:
    """What sampling needs besides the condition."""

    model: torch.nn.Module
    sampler: object
    vae: AutoencoderKL | None
    vae_scale: dict
    null: dict  # the null condition, a batch of one
    shape: list  # of one model input
    crop: int  # border to remove: MNIST's padding

    def images(self, cond, n, guidance_scale, args, generator):
        """uint8 [n, R, R] or [n, R, R, 3]."""
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
        images = decode(x, self.vae, self.vae_scale)
        if self.crop:
            images = images[..., self.crop : -self.crop, self.crop : -self.crop]
        images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        return images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)


def class_conditions(ids, null_id, label_names, device):
    """The null condition and the validation rows (names, condition)."""
    names = [label_names[i] if label_names else str(i) for i in ids]
    null = {"class_labels": torch.tensor([null_id], device=device)}
    return null, (names, {"class_labels": torch.tensor(ids, device=device)})


def prompt_conditions(text, prompts, device, dtype=torch.float32):
    """Tokenizer, text encoder, null condition (the empty prompt) and validation rows."""
    tokenizer, text_encoder = load_text_encoder(text["text_encoder"], text["tokenizer"])
    text_encoder.to(device, dtype=dtype)
    states, mask = encode_prompts(tokenizer, text_encoder, ["", *prompts], text, device)
    null = dict(states=states[:1], mask=mask[:1])
    return tokenizer, text_encoder, null, (prompts, dict(states=states[1:], mask=mask[1:]))


# ---- Validation ----
def log_validation(gen, rows, args, path, trackers=(), step=0, per_row=4):
    """A grid, a row per class or prompt and a panel per guidance scale, to `path` and the trackers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, cond = rows
    n, device = len(names), next(gen.model.parameters()).device
    repeated = {k: v.repeat_interleave(per_row, dim=0) for k, v in cond.items()}
    scales = args.validation_guidance_scales
    fig, axes = plt.subplots(1, len(scales), figsize=(1.6 * per_row * len(scales) + 2, 1.4 * n + 0.6), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        generator = torch.Generator(device).manual_seed(args.seed)  # the same noise in every panel and step
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
    """Overall and per noise-level bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():  # validation before the first logging step
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ["loss", *sorted(k for k in rows[-1] if k.startswith("loss_t"))]:
        ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def write_eval_samples(gen, num_classes, args, path):
    """Class-balanced samples at --guidance_scale; returns the seconds."""
    device = next(gen.model.parameters()).device
    labels = torch.arange(args.num_eval_samples, device=device) % num_classes
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    start = time.perf_counter()
    chunks = [
        gen.images({"class_labels": batch}, len(batch), args.guidance_scale, args, generator)
        for batch in labels.split(args.eval_batch_size)
    ]
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
    """accelerate's state, the EMA (or the model) with what --sample_from needs, the objective's RNG and the data
    position, in a temp folder renamed when complete."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{global_step}", output_dir / f".checkpoint-{global_step}.tmp"
    plain = accelerator.unwrap_model(model)  # plain parameter names: --torch_compile compiles in place
    if not weights_finite(accelerator, plain):
        raise RuntimeError(f"step {global_step}: the weights are not finite; checkpoint not written")
    weights = whole_state(plain, ema)  # on every process: FSDP gathers the shards
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model, optimizer, data sampler, global RNGs
        save_file({"state": train_rng.get_state()}, tmp / f"train_rng_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            state = dict(
                script="train_dit.py",
                global_step=global_step,
                num_processes=accelerator.num_processes,
                epoch=position[0],
                epoch_batches=position[1],
                model=args.model,
                conditioning=args.conditioning,
                ema=None if ema is None else {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
            )
            save_weights(weights, plain, tmp / ("transformer" if ema is None else "transformer_ema"))
            write_sampling_files(tmp)
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, [p.name for p in tmp.iterdir()])
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: never a half-written checkpoint-<step>
    except OSError as e:  # a full disk, a lost mount: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        print(
            f"error: step {global_step}: checkpoint not written ({reason}); the earlier ones are intact: "
            "--resume_from_checkpoint latest",
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
    """Restore what save_checkpoint wrote; returns training_state.json. On another number of processes the
    objective's RNGs are derived anew."""
    state = json.loads((path / "training_state.json").read_text())
    if state.get("script") != "train_dit.py":
        fail(f"--resume_from_checkpoint {path}: written by {state.get('script')}, not train_dit.py")
    if (state["model"], state["conditioning"]) != (args.model, args.conditioning):
        fail(f"--resume_from_checkpoint {path}: pass --model {state['model']} --conditioning {state['conditioning']}")
    if ema is not None and state["ema"] is None:
        fail(f"--resume_from_checkpoint {path}: saved without EMA; resume with --no-use_ema")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if any(path.glob("pytorch_model_fsdp*")) != fsdp:  # the model's files differ: whole weights in one file or not
        fail(f"--resume_from_checkpoint {path}: written {'without' if fsdp else 'with'} FSDP; resume it the same way")
    accelerator.load_state(str(path))
    restore_train_rng(accelerator, path, train_rng, state, args.seed)
    if ema is not None:  # loaded onto the EMA's device: load_state_dict keeps the tensors it is given
        file = path / "transformer_ema" / "diffusion_pytorch_model.safetensors"
        weights = load_file(file, device=str(ema.shadow_params[0].device))
        shadow = [weights[name] for name, _ in accelerator.unwrap_model(model).named_parameters()]
        if hasattr(ema.shadow_params[0], "device_mesh"):  # FSDP: each process keeps its shards
            from torch.distributed.tensor import distribute_tensor

            shadow = [
                distribute_tensor(w, s.device_mesh, s.placements)
                for w, s in zip(shadow, ema.shadow_params, strict=True)
            ]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    return state


def widen_label_tables(model, num_classes):
    """A copy with DiTPipeline's label tables: null class at 1000, rows num_classes..999 repeat it."""
    wide = DiTTransformer2DModel.from_config({**model.config, "num_embeds_ada_norm": PIPELINE_NULL_CLASS})
    state = model.state_dict()
    for key, table in state.items():
        if key.endswith("class_embedder.embedding_table.weight"):
            rows = table[num_classes : num_classes + 1].expand(PIPELINE_NULL_CLASS + 1 - num_classes, -1)
            state[key] = torch.cat([table[:num_classes], rows])
    wide.load_state_dict(state)
    return wide


def why_not_dit_pipeline(args, vae, meta):
    """None when DiTPipeline samples this model as this script does, else why not."""
    if args.conditioning != "class":
        return "text-conditioned: DiTPipeline is class-conditional"
    if vae is None:
        return "pixel space: DiTPipeline decodes latents with a VAE"
    if args.objective != "ddpm":
        return "flow objective: DiTPipeline samples the ddpm objective"
    if meta["num_classes"] > PIPELINE_NULL_CLASS:
        return f"{meta['num_classes']} classes: DiTPipeline's null class id {PIPELINE_NULL_CLASS} is a real class"
    if meta["vae_scale"]["shift_factor"]:
        return "the VAE has a shift_factor, which DiTPipeline does not add back when decoding"
    return None


def write_sampling_files(sampler, meta, folder):
    """What --sample_from needs besides the transformer."""
    sampler.save_pretrained(folder / "scheduler")
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))


def model_card(args, meta, global_step, loss):
    """README.md of the export: Hub metadata, the training command, how to sample."""
    from huggingface_hub import ModelCardData

    condition = "class-conditional" if args.conditioning == "class" else "text-to-image"
    dataset = "ylecun/mnist" if args.dataset_name == "mnist" else args.dataset_name
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        datasets=[dataset] if dataset and not Path(dataset).exists() else None,  # a hub id, not a local dataset
        tags=["diffusers", "dit", condition, "image-generation"],
    )
    scales = ", ".join(f"{s:g}" for s in args.validation_guidance_scales)
    return f"""---
{data.to_yaml()}
---

# {condition.capitalize()} DiT (train_dit.py)

A {args.model} DiT ({args.objective} objective) trained from scratch with train_dit.py: {global_step} steps,
final loss {loss:.4f}, EMA weights. `export_config.json` says how to sample it.

```bash
{" ".join(["python train_dit.py", *sys.argv[1:]])}
python train_dit.py --sample_from THIS_FOLDER --output_dir samples
```

![samples at guidance {scales}](samples.png)
"""


def export_model(model, sampler, vae, args, meta, output_dir, card, grid):
    """The EMA weights as a DiTPipeline folder when that pipeline samples the model right, else transformer/ +
    scheduler/ (+ vae/); export_config.json says which. Parts are renamed into place, manifest.json last."""
    model = model.float()
    if vae is not None and vae.dtype != torch.float32:  # the training copy was cast to bf16/fp16: export it as loaded
        vae = load_vae(**vae.loaded_from)
    if args.conditioning == "class" and meta["num_classes"] < PIPELINE_NULL_CLASS:
        model = widen_label_tables(model, meta["num_classes"])  # in any layout: the null class is 1000
    reason = why_not_dit_pipeline(args, vae, meta)
    meta = dict(meta, diffusers_pipeline=None if reason else "DiTPipeline", why_no_pipeline=reason)
    if vae is not None:
        meta["latents"] = (
            "z = (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor, "
            "decoded as vae.decode(z / scaling_factor + shift_factor) (vae_scale)"
        )
    (output_dir / MANIFEST).unlink(missing_ok=True)  # until the new manifest: visibly incomplete
    tmp = output_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if reason is None:
        names = meta["label_names"] or [str(i) for i in range(meta["num_classes"])]
        pipe = DiTPipeline(transformer=model, vae=vae, scheduler=sampler, id2label=dict(enumerate(names)))
        pipe.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp / "transformer")
        if vae is not None:
            vae.save_pretrained(tmp / "vae")
    write_sampling_files(sampler, meta, tmp)
    (tmp / "README.md").write_text(card)
    shutil.copyfile(grid, tmp / "samples.png")
    parts = sorted(p.name for p in tmp.iterdir())
    if "model_index.json" not in parts:  # an earlier export's would claim a DiTPipeline
        (output_dir / "model_index.json").unlink(missing_ok=True)
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
    """--sample_from: the grid (and --num_eval_samples) of an export or checkpoint."""
    export = Path(args.sample_from)
    meta = json.loads((export / EXPORT_CONFIG).read_text())
    device = accelerator.device
    model_cls = DiTTransformer2DModel if meta["conditioning"] == "class" else PixArtTransformer2DModel
    subfolder = "transformer" if (export / "transformer").is_dir() else "transformer_ema"  # export or checkpoint
    model = model_cls.from_pretrained(export, subfolder=subfolder).to(device).eval()
    scheduler_cls = FlowMatchEulerDiscreteScheduler if meta["objective"] == "flow" else DPMSolverMultistepScheduler
    sampler = scheduler_cls.from_pretrained(export / "scheduler")
    vae = meta["vae"]
    if vae and (export / "vae").is_dir():  # an export holds a copy of the VAE
        vae = load_vae(str(export), "vae", flag="--sample_from").to(device)
    elif vae:  # a checkpoint names it
        flag = f"--sample_from {export}: the VAE that {EXPORT_CONFIG} names"
        vae = load_vae(vae["name_or_path"], vae["subfolder"], flag=flag).to(device)
    if meta["conditioning"] == "class":
        ids = args.validation_class_ids or list(range(min(meta["num_classes"], 10)))
        null, rows = class_conditions(ids, model.config.num_embeds_ada_norm, meta["label_names"], device)
    else:
        text = meta["text"]
        if args.text_encoder_name_or_path:
            text = dict(text, text_encoder=args.text_encoder_name_or_path, tokenizer=None)
        prompts = args.validation_prompts or meta["validation_prompts"]
        _, _, null, rows = prompt_conditions(text, prompts, device)
    gen = ImageGenerator(model, sampler, vae, meta["vae_scale"], null, meta["input_shape"], meta["crop"])
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        log_validation(gen, rows, args, output_dir / "samples" / "export.png")
        if args.num_eval_samples and meta["conditioning"] == "class":
            path = output_dir / "eval_samples.npz"
            seconds = write_eval_samples(gen, meta["num_classes"], args, path)
            print(f"wrote {args.num_eval_samples} samples to {path} in {seconds:.1f}s")


def main(args):
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, "logs")),
        # An epoch's order depends only on (seed, epoch): resume can restore a mid-epoch position.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_accelerator(accelerator, fsdp=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.sample_from:
        return generate_from_export(args, accelerator)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # Input layout: latents or pixels
    index = read_precomputed_index(args) if args.precomputed_data_dir else None
    text = text_convention(args, index) if args.conditioning == "text" else None
    crop = (args.resolution - MNIST_SIZE) // 2 if args.dataset_name == "mnist" else 0
    if index:  # the shards' VAE, which only decodes samples here
        info = index["vae"]
        flag = f"--precomputed_data_dir {args.precomputed_data_dir}: index.json's VAE"
        vae = load_vae(info["name_or_path"], info.get("subfolder"), flag=flag)
        vae_scale = dict(scaling_factor=info["scaling_factor"], shift_factor=info.get("shift_factor") or 0.0)
        resolution, image_channels = index["resolution"], 3
        shape = [info["latent_channels"], info["latent_size"], info["latent_size"]]
        factor = resolution // shape[1]
    else:
        vae, resolution = load_vae(args.vae_name_or_path), args.resolution
        if vae is None:
            vae_scale, factor = dict(scaling_factor=1.0, shift_factor=0.0), 1
            image_channels = channels = 1 if args.dataset_name == "mnist" else 3
        else:
            vae_scale = dict(scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor or 0.0)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            image_channels, channels = vae.config.in_channels, vae.config.latent_channels
        shape = [channels, resolution // factor, resolution // factor]
    if vae is not None:
        vae.to(device, dtype=weight_dtype)
    patch = model_shape(args)[3]
    if resolution % (factor * patch):
        fail(f"--resolution {resolution}: not divisible by the patch size x the VAE factor = {patch} x {factor}")

    # Data
    with accelerator.main_process_first():  # one process downloads (MNIST, a hub dataset), the others then read it
        dataset = build_dataset(args, image_channels, index)
    label_names, num_classes = dataset.label_names, None
    if args.conditioning == "class":
        found = len(label_names) if label_names else None
        if found is None and isinstance(dataset, HFImageDataset):
            found = int(max(dataset.table[args.label_column])) + 1
        if found is None and args.num_classes is None:
            fail("--num_classes: the data does not say how many classes it has; pass it")
        if found is not None and args.num_classes not in (None, found):
            fail(f"--num_classes {args.num_classes}: the data has {found} classes; drop the flag or fix it")
        num_classes = found or args.num_classes
    # Inputs checked: only now is the output folder claimed, so that a bad input changes nothing there
    if accelerator.is_main_process:
        claim_output_dir(args)
        write_run_config(args, accelerator)
    stop = StopRequest(accelerator)
    set_seed(args.seed)  # the same initial weights on every process
    output_dir = Path(args.output_dir)
    resume_path = find_checkpoint(accelerator, args)
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        # a full batch for every process, else every epoch is empty
        drop_last=len(dataset) >= args.train_batch_size * accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate,
    )

    # Conditions and validation rows
    tokenizer = text_encoder = None
    if args.conditioning == "class":
        ids = args.validation_class_ids or list(range(min(num_classes, 10)))
        null, validation_rows = class_conditions(ids, num_classes, label_names, device)
    elif index:
        empty = load_file(Path(args.precomputed_data_dir) / "empty_prompt.safetensors")
        key = index["text_encoders"][0]["key"]
        null = dict(
            states=empty[f"{key}.hidden_states"].float().to(device),
            mask=empty[f"{key}.attention_mask"].long().to(device),
        )
        first = [dataset[i] for i in range(min(4, len(dataset)))]
        with safe_open(str(dataset.files[0]), framework="pt") as f:
            names = json.loads(f.metadata()["captions"])[: len(first)]
        validation_rows = (
            names,
            {k: torch.stack([e[f"text_{k}"] for e in first]).to(device) for k in ("states", "mask")},
        )
    else:
        if args.validation_prompts:
            prompts = args.validation_prompts
        elif isinstance(dataset, MNISTDataset):
            prompts = [dataset.template.format(d) for d in range(10)]
        else:  # the first distinct captions of the data
            prompts = list(dict.fromkeys(dataset.table[:256][args.caption_column]))[:10]
        tokenizer, text_encoder, null, validation_rows = prompt_conditions(text, prompts, device, weight_dtype)

    # export_config.json: what sampling needs besides the weights
    meta = dict(
        conditioning=args.conditioning,
        objective=args.objective,
        model=args.model,
        num_classes=num_classes,
        label_names=[str(n) for n in label_names] if label_names else None,
        vae=None if vae is None else vae.loaded_from,
        vae_scale=vae_scale,
        input_shape=shape,
        resolution=resolution,
        crop=crop,
        guidance_scale=args.guidance_scale,
        text=text,
        validation_prompts=validation_rows[0] if text else None,
    )

    # Model, noise schedule, EMA
    caption_channels = null["states"].shape[-1] if text else None
    model = build_transformer(args, shape[0], shape[1], num_classes, caption_channels)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    noise_scheduler = build_noise_scheduler(args)
    sampler = build_sampler(args, noise_scheduler, pixel_space=vae is None)
    sampling_files = functools.partial(write_sampling_files, sampler, meta)
    accelerator.print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"input {shape} ({'pixels' if factor == 1 else 'latents'}), {len(dataset)} examples"
    )

    # Optimizer: fused AdamW, which skips a non-finite step on the device (found_inf below)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=True,
    )
    model_cls, config = type(model), model.config  # prepare wraps the model (DDP) or changes its class (FSDP)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if accelerator.distributed_type == DistributedType.FSDP and weight_dtype != torch.float32:
        # FSDP2 computes with bf16 or fp16 weights; the activations get autocast, as under DDP
        model.forward = torch.autocast(accelerator.device.type, dtype=weight_dtype)(model.forward)
    ema = None
    if args.use_ema:  # of the prepared parameters: under FSDP, each process averages its shards
        ema = EMAModel(
            model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power, foreach=True
        )
    if args.torch_compile:
        model.compile()  # in place: state_dict keys stay those of the plain model
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # Every random draw of the objective, saved in each checkpoint: the global RNG cannot resume exactly
    # (each DataLoader iterator draws its base seed from it).
    train_rng = torch.Generator(device).manual_seed(args.seed * 1000 + accelerator.process_index)

    # Resume
    global_step, first_epoch, batches_to_skip = 0, 0, 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path, model, ema, train_rng, args)
        global_step, first_epoch = state["global_step"], state["epoch"]
        # Saved in batches of all processes, whose count may differ here
        batches_to_skip = state["epoch_batches"] // accelerator.num_processes
        if batches_to_skip >= len(train_dataloader):
            first_epoch, batches_to_skip = first_epoch + 1, 0
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    # Not prepared (accelerate would step it per process): a resumed run rebuilds it at its step.
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
    num_bins = 4  # the loss per quarter of the noise-level range
    bin_loss, bin_count = torch.zeros(2, num_bins, device=device)
    # Steps with a non-finite gradient: in total, in the current run of them, the longest run since logging.
    nonfinite_steps, nonfinite_run, longest_run = torch.zeros(3, device=device).unbind()
    skipped = torch.zeros((), device=device)  # unreadable images drawn by this process
    window_start, window_samples = time.perf_counter(), 0
    position = (first_epoch, batches_to_skip * accelerator.num_processes)
    train_start = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        epoch_batches, batches_to_skip = batches_to_skip, 0  # per process, for the data position
        for batch in batches:
            epoch_batches += 1
            skipped += batch.pop("skipped")  # a host number added on the device: no sync
            with accelerator.accumulate(model):
                x0 = batch_to_inputs(batch, vae, vae_scale, train_rng, args)
                if args.conditioning == "class":
                    cond = {"class_labels": batch["label"].to(device)}
                elif "text_states" in batch:
                    cond = dict(states=batch["text_states"].to(device), mask=batch["text_mask"].to(device))
                else:
                    states, mask = encode_prompts(tokenizer, text_encoder, batch["caption"], text, device)
                    cond = dict(states=states, mask=mask)
                per_sample, level = training_step(model, noise_scheduler, x0, cond, null, args, train_rng)
                accelerator.backward(per_sample.mean())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    # A non-finite norm (the same on every process): fused AdamW leaves weights and moments as
                    # they were where found_inf is 1. With fp16 the GradScaler sets found_inf for these steps.
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
            if ema is not None:  # harmless after a skipped step
                ema.step(model.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                totals = accelerator.reduce(torch.cat([bin_loss, bin_count, skipped.view(1)]), "sum").cpu()
                total_nonfinite, longest = torch.stack([nonfinite_steps, longest_run]).tolist()
                losses, counts = totals[:num_bins], totals[num_bins : 2 * num_bins]
                row = dict(
                    step=global_step,
                    epoch=epoch,
                    loss=(losses.sum() / counts.sum().clamp(min=1)).item(),
                    lr=lr_scheduler.get_last_lr()[0],
                    grad_norm=grad_norm.item(),
                    samples_per_s=window_samples / max(time.perf_counter() - window_start, 1e-9),
                    nonfinite_steps=int(total_nonfinite),
                    skipped_images=int(totals[-1]),
                )
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
                        f"{global_step}; lower --learning_rate (the last checkpoint is intact)"
                    )
                    sys.exit(1)

            stop_now = stop() and global_step < max_train_steps  # at the last step the run finishes as usual
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
            if global_step % args.validation_steps == 0 and global_step < max_train_steps:
                # A plain copy with the EMA weights samples on the main process (FSDP: gathered on every process)
                weights = whole_state(accelerator.unwrap_model(model), ema)
                if accelerator.is_main_process:
                    copy = sampling_copy(model_cls, config, weights, device)
                    gen = ImageGenerator(copy, sampler, vae, vae_scale, null, shape, crop)
                    grid = output_dir / "samples" / f"step-{global_step}.png"
                    log_validation(gen, validation_rows, args, grid, accelerator.trackers, global_step)
                    plot_loss(metrics_path, output_dir / "loss.png")
                    del copy, gen  # no second model in memory while training goes on
                del weights
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    stop.close()
    progress.close()
    train_seconds = time.perf_counter() - train_start
    skipped_images = int(accelerator.reduce(skipped, "sum").item())
    if skipped_images:
        accelerator.print(f"warning: {skipped_images} unreadable images replaced by readable ones")

    # Final checkpoint, samples and export (EMA weights)
    save_checkpoint(accelerator, args, model, ema, train_rng, global_step, position, sampling_files)
    weights = whole_state(accelerator.unwrap_model(model), ema)
    if accelerator.is_main_process:
        final_model = sampling_copy(model_cls, config, weights, device)
        gen = ImageGenerator(final_model, sampler, vae, vae_scale, null, shape, crop)
        grid = output_dir / "samples" / f"step-{global_step}.png"
        log_validation(gen, validation_rows, args, grid, accelerator.trackers, global_step)
        plot_loss(metrics_path, output_dir / "loss.png")
        summary = dict(global_step=global_step, train_seconds=train_seconds, skipped_images=skipped_images)
        if args.num_eval_samples and args.conditioning == "class":
            summary["sample_seconds"] = write_eval_samples(gen, num_classes, args, output_dir / "eval_samples.npz")
        loss = json.loads(metrics_path.read_text().splitlines()[-1])["loss"]
        export_model(final_model, sampler, vae, args, meta, output_dir, model_card(args, meta, global_step, loss), grid)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"done: step {global_step}, {train_seconds / 60:.1f} min of training; export in {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
