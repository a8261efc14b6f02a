"""Encode an image-caption dataset once into safetensors shards: VAE latents and frozen text-encoder outputs.

Each process encodes its own shards; a re-run skips the finished ones and refuses other settings. The format is in
docs/prepare_data.md; the trainers read it with --precomputed_data_dir, the MMDiT scripts with --data_root.

    python prepare_data_multi_gpu.py --pretrained_model_name_or_path SD_FOLDER --train_data_dir imgs --output_dir shards
    accelerate launch --num_processes 8 prepare_data_multi_gpu.py --dataset_name lambdalabs/naruto-blip-captions \
        --pretrained_model_name_or_path SD_FOLDER --random_flip --output_dir shards
"""

import argparse
import datetime
import io
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5EncoderModel,
)

FORMAT, VERSION = "precomputed-diffusion-shards", 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SOURCE_FLAGS = "train_data_dir dataset_name captions_json data_root".split()


# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---- Args ----
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = parser.add_argument_group("source (exactly one)")
    g.add_argument("--train_data_dir", help="Imagefolder with metadata.jsonl.")
    g.add_argument("--dataset_name", help="Hub id, local dataset or save_to_disk folder.")
    g.add_argument("--dataset_config_name")
    g.add_argument("--captions_json", help="A list of {image, caption} objects, or a COCO captions file.")
    g.add_argument("--data_root", help="Folder holding MNIST/raw.")
    g.add_argument("--split", default="train")
    g.add_argument("--streaming", action="store_true", help="Stream --dataset_name.")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text", help="A caption, or a list: one is picked per image.")
    g.add_argument("--label_column", help="Class labels to store; imagefolder default: label.")
    g.add_argument("--caption_template", default="A handwritten digit {}", help="MNIST caption; {} is the digit.")
    g.add_argument("--max_samples", type=int, help="Encode only the first N.")

    g = parser.add_argument_group("images")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument(
        "--image_interpolation_mode",
        default="lanczos",
        choices=[m.name.lower() for m in transforms.InterpolationMode],
        help="Resize filter.",
    )
    g.add_argument("--center_crop", action="store_true", help="Else a random crop, fixed per image.")
    g.add_argument("--random_flip", action="store_true", help="Also store the mirrored image's latents.")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("encoders")
    g.add_argument(
        "--pretrained_model_name_or_path", help="Stable Diffusion folder or hub id: its VAE and text encoder."
    )
    g.add_argument("--revision")
    g.add_argument("--variant")
    g.add_argument("--vae_name_or_path", help="Instead of the folder's VAE; none: no latents.")
    g.add_argument(
        "--text_encoder_name_or_path",
        action="append",
        help="Text encoder with tokenizer, repeatable; none: no text.",
    )
    g.add_argument(
        "--tokenizer_max_length",
        type=int,
        action="append",
        help="Once or per encoder; default: the tokenizer's, at most 512.",
    )
    g.add_argument("--text_prefix", action="append", help='Once or per encoder, e.g. "query: " for E5.')
    g.add_argument(
        "--text_encoder_attention_mask",
        choices=["auto", "on", "off"],
        default="auto",
        help="Give the encoders the padding mask; auto: as StableDiffusionPipeline.",
    )
    g.add_argument("--encoder_dtype", choices=list(DTYPES), default="float32", help="Precision the encoders run in.")
    g.add_argument("--latent_dtype", choices=["float32", "float16"], default="float16")
    g.add_argument("--text_dtype", choices=["float32", "float16"], default="float16")

    g = parser.add_argument_group("output and processes")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--shard_size", type=int, default=1024)
    g.add_argument("--batch_size", type=int, default=32, help="Images per encoder call.")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--ddp_timeout", type=int, default=1800, help="Seconds a process waits for the others.")

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


def check_args(args):
    """Flag and path checks, before any data or model loads."""
    given = [f"--{s}" for s in SOURCE_FLAGS if getattr(args, s)]
    if len(given) != 1:
        fail(f"give exactly one of --train_data_dir, --dataset_name, --captions_json, --data_root (got {given})")
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        fail(f"--train_data_dir {args.train_data_dir}: no such folder")
    if args.data_root and not Path(args.data_root, "MNIST/raw").is_dir():
        fail(f"--data_root {args.data_root}: no MNIST/raw folder there")
    if args.data_root and "{}" not in args.caption_template:
        fail(f"--caption_template {args.caption_template!r}: must contain {{}} for the digit")
    if args.streaming and not args.dataset_name:
        fail("--streaming applies to --dataset_name only")
    if min(args.shard_size, args.batch_size, args.ddp_timeout) < 1 or (
        args.max_samples is not None and args.max_samples < 1
    ):
        fail("--shard_size, --batch_size, --ddp_timeout and --max_samples must be at least 1")
    if args.resolution % 8:
        fail(f"--resolution {args.resolution}: must be a multiple of 8")
    for part in ("vae", "text_encoder"):
        if getattr(args, f"{part}_name_or_path") is None and args.pretrained_model_name_or_path is None:
            fail(f"no {part}: pass --pretrained_model_name_or_path or --{part}_name_or_path (or none)")
    if args.vae_name_or_path == "none" and args.text_encoder_name_or_path == ["none"]:
        fail("nothing to encode: the VAE and the text encoders are none")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible")
    n = len(args.text_encoder_name_or_path or [])
    for flag in ("tokenizer_max_length", "text_prefix"):
        if len(getattr(args, flag) or [0]) not in (1, n):
            fail(f"--{flag}: give it once, or once per --text_encoder_name_or_path ({n})")


# ---- Data ----
@dataclass
class Source:
    """Rows (position, raw image, caption, label): get_slice(a, b) if the length is known, else rows(wanted)."""

    kind: str
    path: str
    length: int | None
    label_names: list | None
    get_slice: Callable | None = None
    rows: Callable | None = None


def open_source(args):
    if args.data_root:
        return open_mnist(args)
    if args.captions_json:
        return open_captions_json(args)
    import datasets

    if args.train_data_dir:
        kind, path = "imagefolder", args.train_data_dir
        ds = datasets.load_dataset("imagefolder", data_dir=path, split=args.split)
    else:
        kind, path = "dataset", args.dataset_name
        try:
            if all(Path(path, f).is_file() for f in ("dataset_info.json", "state.json")):  # save_to_disk
                ds = datasets.load_from_disk(path)
            else:
                ds = datasets.load_dataset(path, args.dataset_config_name, split=args.split, streaming=args.streaming)
        except (OSError, ValueError) as e:
            fail(f"--dataset_name {path}: cannot load it ({type(e).__name__}: {str(e)[:200]})")
    columns = list(ds.column_names or ds.features or [])
    label_column = args.label_column or ("label" if "label" in columns and kind == "imagefolder" else None)
    for flag, column in (("image", args.image_column), ("caption", args.caption_column), ("label", label_column)):
        if column is not None and column not in columns:
            fail(f"--{flag}_column {column!r}: not a column; columns: {', '.join(columns)}")
    label_names = getattr(ds.features[label_column], "names", None) if label_column else None
    ds = ds.cast_column(args.image_column, datasets.Image(decode=False))  # decoded by us: a bad file is skipped
    ds = ds.select_columns([c for c in (args.image_column, args.caption_column, label_column) if c])
    if args.max_samples is not None:
        ds = ds.take(args.max_samples)

    def rows_of(batch, positions):
        return [
            (
                position,
                batch[args.image_column][k],
                pick_caption(batch[args.caption_column][k], position, args.seed),
                int(batch[label_column][k]) if label_column else None,
            )
            for k, position in enumerate(positions)
        ]

    if not args.streaming:
        return Source(kind, path, len(ds), label_names, get_slice=lambda a, b: rows_of(ds[a:b], range(a, b)))
    source = Source(kind, path, None, label_names)

    def rows(wanted):
        """The rows of the wanted positions, the others left unconverted; sets source.length at the end."""
        n = 0
        for table in ds.with_format("arrow").iter(batch_size=256):
            positions = [p for p in range(n, n + table.num_rows) if wanted(p)]
            if positions:
                yield from rows_of(table.take([p - n for p in positions]).to_pydict(), positions)
            n += table.num_rows
        source.length = n

    source.rows = rows
    return source


def pick_caption(value, position, seed):
    if isinstance(value, (list, tuple)):  # COCO: a fixed choice per example
        return random.Random(seed * 1_000_003 + position).choice(value) if value else ""
    return "" if value is None else str(value)


def open_mnist(args):
    import torchvision

    mnist = torchvision.datasets.MNIST(args.data_root, train=args.split == "train", download=False)

    def get_slice(a, b):
        return [
            (i, Image.fromarray(mnist.data[i].numpy(), mode="L"), args.caption_template.format(digit), digit)
            for i, digit in zip(range(a, b), mnist.targets[a:b].tolist(), strict=True)
        ]

    length = len(mnist.targets[: args.max_samples])
    return Source("mnist", args.data_root, length, [str(d) for d in range(10)], get_slice)


def open_captions_json(args):
    path = Path(args.captions_json)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"--captions_json {path}: not readable JSON ({type(e).__name__})")
    if isinstance(entries, dict) and "annotations" in entries and "images" in entries:  # COCO captions file
        files = {im["id"]: im["file_name"] for im in entries["images"]}
        entries = [{"image": files[a["image_id"]], "caption": a["caption"]} for a in entries["annotations"]]
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and "image" in e and "caption" in e for e in entries
    ):
        fail(f"--captions_json {path}: expected a list of {{image, caption}} objects")

    def get_slice(a, b):
        return [
            (
                i,
                {"path": str(path.parent / entries[i]["image"]), "bytes": None},
                pick_caption(entries[i]["caption"], i, args.seed),
                None,
            )
            for i in range(a, b)
        ]

    return Source("coco_json", str(path), len(entries[: args.max_samples]), None, get_slice)


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


def image_transform(args):
    interpolation = transforms.InterpolationMode[args.image_interpolation_mode.upper()]
    size = args.resolution
    resize = transforms.Resize(size, interpolation=interpolation)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def apply(image, position):
        image = resize(image)
        w, h = image.size
        if args.center_crop:
            top, left = (h - size) // 2, (w - size) // 2
        else:  # random, but the same on every re-run
            rng = random.Random(args.seed * 1_000_003 + position)
            top, left = rng.randint(0, h - size), rng.randint(0, w - size)
        return to_tensor(image.crop((left, top, left + size, top + size)))

    return apply


def finished(out, s, a, b):
    """Whether shard s is on disk, readable, and holds only examples of [a, b) (some may have been skipped)."""
    try:
        with safe_open(str(out / f"shard-{s:05d}.safetensors"), framework="pt") as f:
            index = f.get_tensor("index").tolist() if "index" in f.keys() else []
    except Exception:  # missing, truncated or not safetensors: encoded again
        return False
    return len(index) <= b - a and all(a <= i < b for i in index)


def my_shards(source, args, rank, world, out):
    """(s, rows) of this rank's unfinished shards; shard s: positions [s * size, (s + 1) * size), rank s % world."""
    size = args.shard_size
    if source.length is not None:
        for s in range(rank, math.ceil(source.length / size), world):
            a, b = s * size, min((s + 1) * size, source.length)
            if not finished(out, s, a, b):
                yield s, source.get_slice(a, b)
        return
    stream = source.rows(lambda i: i // size % world == rank)
    for s, group in itertools.groupby(stream, key=lambda row: row[0] // size):
        rows = list(group)
        if not finished(out, s, s * size, rows[-1][0] + 1):  # the stream's last shard may be shorter
            yield s, rows


# ---- Models ----
def load_vae(args, device, dtype):
    """The VAE and its index.json entry; (None, None) for --vae_name_or_path none."""
    if args.vae_name_or_path == "none":
        return None, None
    name, sub = (args.vae_name_or_path, None) if args.vae_name_or_path else (args.pretrained_model_name_or_path, "vae")
    try:
        vae = AutoencoderKL.from_pretrained(
            name, subfolder=sub, revision=args.revision, variant=args.variant if sub else None
        )
    except (OSError, ValueError) as e:
        flag = "--pretrained_model_name_or_path" if sub else "--vae_name_or_path"
        fail(f"{flag} {name}: cannot load an AutoencoderKL from it ({type(e).__name__})")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        fail(f"--resolution {args.resolution}: the VAE downsamples by {factor}; use a multiple of {factor}")
    info = {
        "name_or_path": name,  # what from_pretrained loads it again with
        "subfolder": sub,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.get("shift_factor") or 0.0,
        "latent_channels": vae.config.latent_channels,
        "latent_size": args.resolution // factor,
        "dtype": args.latent_dtype,
    }
    return vae.requires_grad_(False).eval().to(device, dtype), info


class TextEncoder:
    """A frozen text encoder and its tokenizer; encode(captions) gives the shard tensors."""

    def __init__(self, path, i, args, device, dtype):
        self.key = f"text_encoder_{i + 1}" if i else "text_encoder"
        sub, tok_sub = ("", "") if args.text_encoder_name_or_path else ("text_encoder", "tokenizer")
        try:
            config = AutoConfig.from_pretrained(path, subfolder=sub, revision=args.revision)
            self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tok_sub, revision=args.revision)
        except (OSError, ValueError) as e:
            flag = "--pretrained_model_name_or_path" if sub else "--text_encoder_name_or_path"
            fail(f"{flag} {path}: cannot load a text encoder and its tokenizer ({type(e).__name__})")
        if config.model_type in ("t5", "mt5", "umt5"):
            model_cls = T5EncoderModel
        elif (config.architectures or [""])[0] == "CLIPTextModelWithProjection":
            model_cls = CLIPTextModelWithProjection
        else:
            model_cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        model = model_cls.from_pretrained(path, subfolder=sub, revision=args.revision)
        self.model = model.requires_grad_(False).eval().to(device, dtype)
        lengths = args.tokenizer_max_length or [min(self.tokenizer.model_max_length, 512)]
        prefixes = args.text_prefix or [""]
        self.max_length, self.prefix = lengths[i % len(lengths)], prefixes[i % len(prefixes)]  # once or per encoder
        mask = args.text_encoder_attention_mask
        self.use_mask = mask == "on" or (mask == "auto" and bool(getattr(self.model.config, "use_attention_mask", 0)))
        self.device, self.dtype = device, DTYPES[args.text_dtype]
        self.empty = self.encode([""])  # the unconditional prompt
        pooled = self.empty.get(f"{self.key}.pooled")
        self.info = {
            "key": self.key,
            "name_or_path": f"{path}/{sub}" if sub else path,
            "tokenizer": f"{path}/{tok_sub}" if tok_sub else path,
            "max_length": self.max_length,
            "hidden_size": self.model.config.hidden_size,
            "pooled_size": pooled.shape[-1] if pooled is not None else None,
            "prefix": self.prefix,
            "dtype": args.text_dtype,
            "use_attention_mask": self.use_mask,
        }

    @torch.no_grad()
    def encode(self, captions):
        unique = list(dict.fromkeys(captions))  # encode each distinct caption once (MNIST has ten)
        tokens = self.tokenizer(
            [self.prefix + c for c in unique],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        out = self.model(ids, attention_mask=mask if self.use_mask else None)
        result = {"hidden_states": out.last_hidden_state.to(self.dtype), "attention_mask": mask, "input_ids": ids}
        pooled = out.get("text_embeds", out.get("pooler_output"))  # CLIP with projection, CLIP/BERT, T5: none
        if pooled is not None:
            result["pooled"] = pooled.to(self.dtype)
        where = torch.tensor([unique.index(c) for c in captions])
        return {f"{self.key}.{k}": v.cpu()[where].contiguous() for k, v in result.items()}


# ---- Encoding ----
@torch.no_grad()
def encode_shard(rows, vae, text_encoders, args):
    """One shard's tensors, its captions and the number of unreadable images."""
    out, captions, skipped = {}, [], 0
    transform, mode = image_transform(args), "L" if vae is not None and vae.config.in_channels == 1 else "RGB"
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        if vae is not None:
            decoded = [(i, decode_image(raw, mode), caption, label) for i, raw, caption, label in batch]
            batch = [row for row in decoded if row[1] is not None]
            skipped += len(decoded) - len(batch)
        if not batch:
            continue
        positions, images, texts, labels = zip(*batch, strict=True)
        parts = {"index": torch.tensor(positions)}
        if labels[0] is not None:
            parts["label"] = torch.tensor(labels)
        if vae is not None:
            pixels = torch.stack(list(map(transform, images, positions))).to(vae.device, vae.dtype)
            views = {"": pixels, "_flipped": pixels.flip(-1)} if args.random_flip else {"": pixels}
            for suffix, x in views.items():
                posterior = vae.encode(x).latent_dist  # unscaled: the trainers apply scaling_factor
                parts["latent_mean" + suffix] = posterior.mean.to(DTYPES[args.latent_dtype]).cpu()
                parts["latent_std" + suffix] = posterior.std.to(DTYPES[args.latent_dtype]).cpu()
        for encoder in text_encoders:
            parts.update(encoder.encode(texts))
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
        captions += texts
    return {k: torch.cat(v).contiguous() for k, v in out.items()}, captions, skipped


# ---- Shards ----
# settings.json holds every flag but these, which change how the work runs, not the shards.
RUN_FLAGS = "output_dir streaming batch_size device ddp_timeout".split()
PATH_FLAGS = SOURCE_FLAGS + "pretrained_model_name_or_path vae_name_or_path text_encoder_name_or_path".split()


def content_settings(args):
    """{flag: value} of the content flags; local paths made absolute ("imgs" == "./imgs")."""

    def local(value):
        return str(Path(value).resolve()) if value not in (None, "none") and Path(value).exists() else value

    settings = {}
    for flag, value in vars(args).items():
        if flag in PATH_FLAGS:
            value = [local(v) for v in value] if isinstance(value, list) else local(value)
        if flag not in RUN_FLAGS:
            settings["mnist_root" if flag == "data_root" else flag] = value
    if not args.data_root:
        settings["caption_template"] = None  # only MNIST captions use it
    return settings


def check_settings(out_dir, settings):
    """Refuse an --output_dir whose shards were encoded with other settings, or with unknown ones."""
    if not any(out_dir.glob("shard-*.safetensors*")):
        return
    try:
        before = json.loads((out_dir / "settings.json").read_text())
    except (OSError, ValueError):
        fail(f"--output_dir {out_dir}: holds shards but no readable settings.json; use another one, or delete it")
    changes = "; ".join(
        f"--{k.replace('mnist_root', 'data_root')} {json.dumps(before.get(k))} there, {json.dumps(settings.get(k))} now"
        for k in {**before, **settings}
        if before.get(k) != settings.get(k)
    )
    if changes:
        fail(f"--output_dir {out_dir}: holds shards encoded with other settings ({changes}); use another --output_dir")


def write_json(path, value):
    path.with_suffix(".tmp").write_text(json.dumps(value, indent=2))
    os.replace(path.with_suffix(".tmp"), path)  # atomic


def write_index(out_dir, source, vae_info, text_encoders, args, settings):
    """index.json of this source's shards on disk (earlier runs' included); removes the shards beyond them."""
    shard_files = [out_dir / f"shard-{s:05d}.safetensors" for s in range(math.ceil(source.length / args.shard_size))]
    shards, tensors = [], {}
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("index").get_shape()[0] if "index" in f.keys() else 0
            if n and not tensors:  # the shapes and dtypes of one example
                for key in f.keys():
                    first = f.get_slice(key)[:1]
                    tensors[key] = {"shape": list(first.shape[1:]), "dtype": str(first.dtype).removeprefix("torch.")}
        shards.append({"file": path.name, "num_examples": n})
    total = sum(s["num_examples"] for s in shards)
    skipped = source.length - total  # the unreadable images
    if total == 0:
        raise SystemExit(f"error: no readable example was encoded ({skipped} skipped); index.json not written")
    stale = [p for p in sorted(out_dir.glob("shard-*.safetensors")) if p not in shard_files]
    for path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} shard files beyond this source's {len(shard_files)} shards", flush=True)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "num_examples": total,
        "num_skipped": skipped,
        "shard_size": args.shard_size,
        "shards": shards,
        "source": {"kind": source.kind, "path": str(source.path), "split": args.split},
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "vae": vae_info,
        "text_encoders": [e.info for e in text_encoders],
        "label_names": source.label_names,
        "tensors": tensors,
        "settings": settings,
    }
    write_json(out_dir / "index.json", index)
    return index


# ---- Main ----
def main(args):
    check_args(args)
    out_dir = Path(args.output_dir)
    settings = content_settings(args)
    check_settings(out_dir, settings)  # on every process, before any model is loaded
    accelerator = Accelerator(
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))],
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "settings.json", settings)  # before the first shard
        (out_dir / "index.json").unlink(missing_ok=True)  # written again when every shard is there
    accelerator.wait_for_everyone()

    source = open_source(args)
    if source.length == 0:
        fail("the source is empty: no example to encode")
    dtype = DTYPES[args.encoder_dtype]
    vae, vae_info = load_vae(args, device, dtype)
    names = args.text_encoder_name_or_path or [args.pretrained_model_name_or_path]
    names = [] if names == ["none"] else names
    text_encoders = [TextEncoder(path, i, args, device, dtype) for i, path in enumerate(names)]
    if accelerator.is_main_process and text_encoders:
        empty = {k: v for e in text_encoders for k, v in e.empty.items()}
        save_file(empty, str(out_dir / "empty_prompt.safetensors"))

    n, size = source.length, args.shard_size
    mine = None if n is None else sum(min(size, n - s * size) for s in range(rank, math.ceil(n / size), world))
    progress = tqdm(total=mine, desc=f"encode (rank {rank})", position=rank, unit="img")
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    encoded = skipped = 0
    for shard, rows in my_shards(source, args, rank, world, out_dir):
        tensors, captions, n_skipped = encode_shard(rows, vae, text_encoders, args)
        tmp = out_dir / f"shard-{shard:05d}.safetensors.tmp"
        # One metadata key: safetensors writes several in a random order, and a re-run must write the same bytes.
        save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)})
        os.replace(tmp, tmp.with_suffix(""))  # atomic: an existing shard is always complete
        encoded += len(captions)
        skipped += n_skipped
        progress.update(len(rows))
    progress.close()
    print(f"rank {rank}: encoded {encoded} images, skipped {skipped}", flush=True)
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - start
    counts = accelerator.reduce(torch.tensor([encoded, skipped], device=device), "sum").cpu().tolist()
    if accelerator.is_main_process:
        if counts[1]:
            print(f"warning: {counts[1]} unreadable images were skipped", file=sys.stderr)
        index = write_index(out_dir, source, vae_info, text_encoders, args, settings)
        print(
            f"encoded {counts[0]} images in {wall:.1f}s: {counts[0] / wall:.1f} images/s with {world} process(es); "
            f"{index['num_examples']} examples in {len(index['shards'])} shards; wrote {out_dir / 'index.json'}",
            flush=True,
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
