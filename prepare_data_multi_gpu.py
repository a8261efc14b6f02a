"""Encode an image-caption dataset once into safetensors shards, on every process of a distributed launch.

The VAE's posterior (mean and std, unscaled; with --random_flip also of the mirrored image) and the last hidden
states, attention mask, pooled output and token ids of one or more frozen text encoders are stored per example,
so that training never runs the VAE or the text encoders again. Shard s holds examples [s * shard_size,
(s + 1) * shard_size) and is written by rank s % world_size; the main process writes index.json at the end.
The settings that decide the shards' content are kept in settings.json: a re-run into the same --output_dir
with the same settings skips the finished shards, one with other settings is refused.
The format is docs/precomputed_format.md; train_ldm_sd.py and train_dit.py read it with --precomputed_data_dir.

    python prepare_data_multi_gpu.py --pretrained_model_name_or_path SD_FOLDER --train_data_dir imgs --output_dir shards
    accelerate launch --num_processes 8 prepare_data_multi_gpu.py --dataset_name lambdalabs/naruto-blip-captions \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 --random_flip --output_dir shards
"""

import argparse
import datetime
import io
import json
import math
import os
import random
import sys
import time
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


# Copied from train_mnist.fail
def fail(message):
    """A user mistake: one line naming the flag or file and the fix, exit code 2, before any heavy work."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = parser.add_argument_group("source (exactly one)")
    g.add_argument("--train_data_dir", default=None, help="Imagefolder: images plus metadata.jsonl with captions.")
    g.add_argument(
        "--dataset_name",
        default=None,
        help="A datasets hub id, a local dataset script/folder, or a folder written by save_to_disk.",
    )
    g.add_argument(
        "--captions_json",
        default=None,
        help='COCO-style JSON: a list of {"image": path, "caption": text} (paths relative to the file).',
    )
    g.add_argument(
        "--mnist_root",
        "--data_root",
        default=None,
        help="Folder holding MNIST/raw (torchvision layout); captions from --caption_template.",
    )
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--split", default="train")
    g.add_argument("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it.")
    g.add_argument("--image_column", default="image")
    g.add_argument(
        "--caption_column",
        default="text",
        help="A list of captions per image: one is picked per example (seeded by the example's position).",
    )
    g.add_argument("--label_column", default=None, help="Class labels to store (imagefolder class folders: label).")
    g.add_argument("--caption_template", default="A handwritten digit {}", help="MNIST caption; {} is the digit.")
    g.add_argument("--max_samples", type=int, default=None, help="Encode only the first N examples.")

    g = parser.add_argument_group("images")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop; otherwise a random crop, seeded by --seed and the example's position.",
    )
    g.add_argument("--random_flip", action="store_true", help="Also store the latents of the mirrored image.")
    g.add_argument(
        "--image_interpolation_mode",
        default="lanczos",
        choices=[
            f.lower() for f in dir(transforms.InterpolationMode) if not f.startswith("__") and not f.endswith("__")
        ],
        help="The image interpolation method to use for resizing images.",
    )

    g = parser.add_argument_group("encoders")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Stable Diffusion layout (vae/, tokenizer/, text_encoder/): the VAE and text encoder to use.",
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--vae_name_or_path", default=None, help='Overrides the folder\'s VAE; "none": no latents.')
    g.add_argument(
        "--text_encoder_name_or_path",
        action="append",
        default=None,
        help='Text encoder with its tokenizer (repeat for several: CLIP, BERT, E5, T5); "none": no text.',
    )
    g.add_argument(
        "--tokenizer_max_length",
        type=int,
        action="append",
        default=None,
        help="Tokens per caption, per encoder (default: the tokenizer's model_max_length, at most 512).",
    )
    g.add_argument("--text_prefix", action="append", default=None, help='Per encoder, e.g. "query: " for E5.')
    g.add_argument(
        "--text_encoder_attention_mask",
        choices=["auto", "on", "off"],
        default="auto",
        help="Whether the encoders see the padding mask. auto: as StableDiffusionPipeline does "
        "(only when the config sets use_attention_mask), so SD trainers see what the pipeline sees.",
    )
    g.add_argument("--latent_dtype", choices=["float32", "float16"], default="float16")
    g.add_argument("--text_dtype", choices=["float32", "float16"], default="float16")
    g.add_argument("--encoder_dtype", choices=list(DTYPES), default="float32", help="Precision the encoders run in.")

    g = parser.add_argument_group("output and processes")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--shard_size", type=int, default=1024)
    g.add_argument("--batch_size", "--encode_batch_size", type=int, default=32, help="Images per encoder call.")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="Seconds a process waits for the others at a synchronization point (the last one waits "
        "for the slowest rank's last shard) before the job is stopped.",
    )

    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args([underscore_flag(a) for a in argv])


def underscore_flag(arg):
    """Every flag also accepts its hyphen spelling: --max-samples == --max_samples."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def check_args(args):
    """Cheap checks of the flags and paths, before any dataset or model is loaded."""
    sources = [s for s in ("train_data_dir", "dataset_name", "captions_json", "mnist_root") if getattr(args, s)]
    if len(sources) != 1:
        fail(
            "give exactly one source: --train_data_dir, --dataset_name, --captions_json or --mnist_root "
            f"(got {', '.join('--' + s for s in sources) or 'none'})"
        )
    for flag in ("train_data_dir", "captions_json"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            fail(f"--{flag} {getattr(args, flag)}: no such file or folder")
    if args.mnist_root and not (Path(args.mnist_root) / "MNIST" / "raw").is_dir():
        fail(f"--mnist_root {args.mnist_root}: no MNIST/raw folder there (torchvision layout)")
    if args.streaming and not args.dataset_name:
        fail("--streaming applies to --dataset_name only")
    if args.max_samples is not None and args.max_samples < 1:
        fail(f"--max_samples {args.max_samples}: must be at least 1")
    if args.resolution % 8:
        fail(
            f"--resolution {args.resolution}: must be divisible by 8 (Stable Diffusion pipelines need it); "
            f"try {max(8, args.resolution // 8 * 8)}"
        )
    if args.shard_size < 1 or args.batch_size < 1:
        fail("--shard_size and --batch_size must be at least 1")
    if args.ddp_timeout < 1:
        fail(f"--ddp_timeout {args.ddp_timeout}: must be at least 1 (seconds)")
    if args.vae_name_or_path is None and args.pretrained_model_name_or_path is None:
        fail('no VAE: pass --pretrained_model_name_or_path (SD folder) or --vae_name_or_path (or "none")')
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    n = len(args.text_encoder_name_or_path or [])
    for flag in ("tokenizer_max_length", "text_prefix"):
        if getattr(args, flag) and len(getattr(args, flag)) not in (1, n):
            fail(f"--{flag}: give it once, or once per --text_encoder_name_or_path ({n})")


# ----------------------------------------------------------------------------------------------------------------
# Settings: the flags that decide what the shards hold and how they are numbered. --batch_size, --device,
# --streaming, --ddp_timeout and the number of processes only change how the work is done, not its result.
# ----------------------------------------------------------------------------------------------------------------
CONTENT_FLAGS = (
    "train_data_dir",
    "dataset_name",
    "dataset_config_name",
    "captions_json",
    "mnist_root",
    "split",
    "image_column",
    "caption_column",
    "label_column",
    "caption_template",
    "max_samples",
    "resolution",
    "image_interpolation_mode",
    "center_crop",
    "random_flip",
    "seed",
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "vae_name_or_path",
    "text_encoder_name_or_path",
    "tokenizer_max_length",
    "text_prefix",
    "text_encoder_attention_mask",
    "encoder_dtype",
    "latent_dtype",
    "text_dtype",
    "shard_size",
)
PATH_FLAGS = (
    "train_data_dir",
    "dataset_name",
    "captions_json",
    "mnist_root",
    "pretrained_model_name_or_path",
    "vae_name_or_path",
    "text_encoder_name_or_path",
)


def content_settings(args):
    """{flag: value} of CONTENT_FLAGS; local paths made absolute, so that "imgs" and "./imgs" are the same."""

    def local(value):
        return str(Path(value).resolve()) if value not in (None, "none") and Path(value).exists() else value

    settings = {}
    for flag in CONTENT_FLAGS:
        value = getattr(args, flag)
        if flag in PATH_FLAGS:
            value = [local(v) for v in value] if isinstance(value, list) else local(value)
        settings[flag] = value
    if not args.mnist_root:
        settings["caption_template"] = None  # only MNIST captions use it
    return json.loads(json.dumps(settings))


def check_settings(out_dir, settings):
    """Refuse an --output_dir whose shards were encoded with other settings (or with unknown ones)."""
    path = out_dir / "settings.json"
    if not any(out_dir.glob("shard-*.safetensors*")):
        return  # no shard yet: settings.json (if any) is written anew
    if not path.is_file():
        fail(
            f"--output_dir {out_dir}: holds shards but no settings.json, so what they were encoded with is "
            "unknown; use another --output_dir, or delete the folder"
        )
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        fail(
            f"--output_dir {out_dir}: settings.json is not readable JSON; use another --output_dir, or delete "
            "the folder"
        )
    differ = [k for k in dict.fromkeys([*before, *settings]) if before.get(k) != settings.get(k)]
    if differ:
        changes = "; ".join(
            f"--{k} {json.dumps(before.get(k))} there, {json.dumps(settings.get(k))} now" for k in differ
        )
        fail(
            f"--output_dir {out_dir}: holds shards encoded with other settings ({changes}); use another "
            "--output_dir, or delete the folder to encode anew"
        )


def write_settings(out_dir, settings):
    (out_dir / "settings.json.tmp").write_text(json.dumps(settings, indent=2))
    os.replace(out_dir / "settings.json.tmp", out_dir / "settings.json")


# ----------------------------------------------------------------------------------------------------------------
# Source datasets: every source is read as (position, raw image, caption, label); images are decoded by us, so a
# bad file is skipped and counted instead of crashing the worker.
# ----------------------------------------------------------------------------------------------------------------
class Source:
    """A map-style or streamed source. `length` is None when streamed."""

    def __init__(self, kind, path, rows, length, label_names, get_slice=None):
        self.kind, self.path, self.rows, self.length, self.label_names = kind, path, rows, length, label_names
        self.get_slice = get_slice  # (start, stop) -> list of (raw image, caption, label)


def check_columns(args, columns, flag_values):
    for flag, value in flag_values:
        if value is not None and value not in columns:
            fail(f"--{flag} {value!r}: not a column of the dataset; columns: {', '.join(columns)}")


def open_source(args):
    if args.mnist_root:
        return open_mnist(args)
    if args.captions_json:
        return open_captions_json(args)
    import datasets

    if args.train_data_dir:
        ds = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split=args.split)
        kind, path = "imagefolder", args.train_data_dir
    else:
        kind, path = "dataset", args.dataset_name
        local = Path(args.dataset_name)
        try:
            if local.is_dir() and (local / "dataset_info.json").is_file() and (local / "state.json").is_file():
                ds = datasets.load_from_disk(str(local))
            else:
                ds = datasets.load_dataset(
                    args.dataset_name, args.dataset_config_name, split=args.split, streaming=args.streaming
                )
        except (OSError, ValueError, FileNotFoundError) as e:
            fail(f"--dataset_name {args.dataset_name}: cannot load it ({type(e).__name__}: {str(e)[:200]})")
        if isinstance(ds, datasets.DatasetDict):
            if args.split not in ds:
                fail(f"--split {args.split}: the dataset has splits {', '.join(ds)}")
            ds = ds[args.split]
    columns = list(ds.column_names or ds.features or [])
    label_column = args.label_column or ("label" if "label" in columns and kind == "imagefolder" else None)
    check_columns(
        args,
        columns,
        [("image_column", args.image_column), ("caption_column", args.caption_column), ("label_column", label_column)],
    )
    ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
    label_names = None
    if label_column is not None:
        feature = ds.features[label_column]
        label_names = list(feature.names) if hasattr(feature, "names") else None
    keep = [args.image_column, args.caption_column] + ([label_column] if label_column else [])

    def rows_of(batch, positions):
        return [
            (
                batch[args.image_column][k],
                pick_caption(batch[args.caption_column][k], position, args.seed),
                int(batch[label_column][k]) if label_column else None,
            )
            for k, position in enumerate(positions)
        ]

    ds = ds.select_columns(keep)
    if args.streaming:
        source = Source(kind, path, None, None, label_names)

        def rows(wanted):
            """(position, row) of the examples with wanted(position); the stream is read in Arrow batches and the
            other examples are never converted nor decoded. Sets source.length when the stream ends."""
            n = 0
            for table in ds.with_format("arrow").iter(batch_size=256):
                if args.max_samples is not None:
                    table = table.slice(0, args.max_samples - n)
                take = [k for k in range(table.num_rows) if wanted(n + k)]
                if take:
                    positions = [n + k for k in take]
                    yield from zip(positions, rows_of(table.take(take).to_pydict(), positions), strict=True)
                n += table.num_rows
                if args.max_samples is not None and n >= args.max_samples:
                    break
            source.length = n

        source.rows = rows
        return source
    length = len(ds) if args.max_samples is None else min(len(ds), args.max_samples)
    return Source(kind, path, None, length, label_names, lambda a, b: rows_of(ds[a:b], range(a, b)))


def pick_caption(value, position, seed):
    if isinstance(value, (list, tuple)):  # several captions per image (COCO): a fixed choice per example
        return random.Random(seed * 1_000_003 + position).choice(value) if value else ""
    return "" if value is None else str(value)


def open_mnist(args):
    import torchvision

    split = "train" if args.split == "train" else "test"
    mnist = torchvision.datasets.MNIST(args.mnist_root, train=split == "train", download=False)
    length = len(mnist) if args.max_samples is None else min(len(mnist), args.max_samples)
    if "{}" not in args.caption_template:
        fail(f"--caption_template {args.caption_template!r}: must contain {{}} where the digit goes")

    def get_slice(a, b):
        return [
            (
                Image.fromarray(mnist.data[i].numpy(), mode="L"),
                args.caption_template.format(int(mnist.targets[i])),
                int(mnist.targets[i]),
            )
            for i in range(a, b)
        ]

    return Source("mnist", args.mnist_root, None, length, [str(d) for d in range(10)], get_slice)


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
        fail(f'--captions_json {path}: expected a list of {{"image": path, "caption": text}} objects')
    length = len(entries) if args.max_samples is None else min(len(entries), args.max_samples)

    def get_slice(a, b):
        return [
            (
                {"path": str(path.parent / entries[i]["image"]), "bytes": None},
                pick_caption(entries[i]["caption"], i, args.seed),
                None,
            )
            for i in range(a, b)
        ]

    return Source("coco_json", str(path), None, length, None, get_slice)


def decode_image(raw, mode):
    """PIL image from a PIL image, a datasets {"path", "bytes"} dict or a path; None when unreadable."""
    try:
        if isinstance(raw, Image.Image):
            image = raw
        elif isinstance(raw, dict):
            image = Image.open(io.BytesIO(raw["bytes"])) if raw.get("bytes") else Image.open(raw["path"])
        else:
            image = Image.open(raw)
        image.load()
        return image.convert(mode)
    except Exception:  # truncated, not an image, missing file: skipped and counted
        return None


def image_transform(args):
    interpolation = getattr(transforms.InterpolationMode, args.image_interpolation_mode.upper())
    resize = transforms.Resize(args.resolution, interpolation=interpolation)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def apply(image, position):
        image = resize(image)
        w, h = image.size
        if args.center_crop:
            top, left = (h - args.resolution) // 2, (w - args.resolution) // 2
        else:  # a random crop that is the same on every re-run
            rng = random.Random(args.seed * 1_000_003 + position)
            top, left = rng.randint(0, h - args.resolution), rng.randint(0, w - args.resolution)
        return to_tensor(image.crop((left, top, left + args.resolution, top + args.resolution)))

    return apply


def finished(out, s, a, b):
    """Whether shard s is on disk, readable, and holds exactly the examples [a, b) (rows plus skipped images)."""
    path = out / f"shard-{s:05d}.safetensors"
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            skipped = int((f.metadata() or {}).get("num_skipped", 0))
            index = f.get_tensor("index").tolist() if "index" in f.keys() else []
    except Exception:  # truncated or not safetensors: encoded again
        return False
    return len(index) + skipped == b - a and all(a <= i < b for i in index)


def my_shards(source, args, rank, world, out):
    """Yield (shard id, [(position, raw, caption, label)]) for the shards of this rank that are not finished on disk.

    Shard s holds the examples [s * shard_size, (s + 1) * shard_size) and belongs to rank s % world. A streamed
    source hands out only this rank's examples and knows its length (source.length) once the stream has ended.
    """
    if source.length is not None:
        for s in range(rank, math.ceil(source.length / args.shard_size), world):
            a, b = s * args.shard_size, min((s + 1) * args.shard_size, source.length)
            if not finished(out, s, a, b):
                yield s, [(a + k, *row) for k, row in enumerate(source.get_slice(a, b))]
        return
    rows = []
    for i, row in source.rows(lambda i: i // args.shard_size % world == rank):
        rows.append((i, *row))
        if len(rows) == args.shard_size:  # a shard's examples come in one run: this one is complete
            s = i // args.shard_size
            if not finished(out, s, s * args.shard_size, i + 1):
                yield s, rows
            rows = []
    if rows:  # the stream ended inside this shard: the last, shorter shard
        s = rows[0][0] // args.shard_size
        if not finished(out, s, s * args.shard_size, rows[-1][0] + 1):
            yield s, rows


# ----------------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------------
def load_vae(args, device, dtype):
    if args.vae_name_or_path == "none":
        return None
    name, sub = (args.vae_name_or_path, None) if args.vae_name_or_path else (args.pretrained_model_name_or_path, "vae")
    try:
        vae = AutoencoderKL.from_pretrained(
            name, subfolder=sub, revision=args.revision, variant=args.variant if sub else None
        )
    except (OSError, ValueError) as e:
        flag = "--vae_name_or_path" if args.vae_name_or_path else "--pretrained_model_name_or_path"
        fail(
            f"{flag} {name}: cannot load an AutoencoderKL from it ({type(e).__name__}); pass a folder with "
            f"{'vae/' if sub else ''}config.json, or a hub id when online"
        )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        fail(f"--resolution {args.resolution}: the VAE downsamples by {factor}; use a multiple of {factor}")
    vae.loaded_from = {"name_or_path": name, "subfolder": sub}  # what from_pretrained loads it again with
    vae.requires_grad_(False).eval().to(device)
    return vae.to(dtype) if dtype != torch.float32 else vae


def encoder_specs(args):
    """[(key, model path, model subfolder, tokenizer path, tokenizer subfolder, display name)]."""
    names = args.text_encoder_name_or_path
    if names == ["none"]:
        return []
    if not names:
        folder = args.pretrained_model_name_or_path
        return [("text_encoder", folder, "text_encoder", folder, "tokenizer", f"{folder}/text_encoder")]
    return [(f"text_encoder_{i + 1}" if i else "text_encoder", n, None, n, None, n) for i, n in enumerate(names)]


def load_text_encoder(path, subfolder, tok_path, tok_subfolder, args):
    flag = "--text_encoder_name_or_path" if subfolder is None else "--pretrained_model_name_or_path"
    try:
        config = AutoConfig.from_pretrained(path, subfolder=subfolder or "", revision=args.revision)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, subfolder=tok_subfolder or "", revision=args.revision)
    except (OSError, ValueError) as e:
        fail(
            f"{flag} {path}: cannot load a text encoder and its tokenizer ({type(e).__name__}); pass a folder "
            f"with config.json and the tokenizer files, or a hub id when online"
        )
    model_cls = {
        "clip": CLIPTextModel,
        "clip_text_model": CLIPTextModel,
        "t5": T5EncoderModel,
        "mt5": T5EncoderModel,
        "umt5": T5EncoderModel,
    }.get(config.model_type, AutoModel)
    if (config.architectures or [""])[0] == "CLIPTextModelWithProjection":
        model_cls = CLIPTextModelWithProjection
    model = model_cls.from_pretrained(path, subfolder=subfolder or "", revision=args.revision)
    return tokenizer, model.requires_grad_(False).eval()


def per_encoder(values, i, default):
    if not values:
        return default
    return values[i] if len(values) > 1 else values[0]


class TextEncoder:
    """One frozen text encoder with its tokenizer and settings; encode() returns the tensors of the format."""

    def __init__(self, spec, i, args, device, dtype):
        self.key, path, sub, tok_path, tok_sub, self.display = spec
        self.tokenizer, self.model = load_text_encoder(path, sub, tok_path, tok_sub, args)
        self.model.to(device)
        if dtype != torch.float32:
            self.model.to(dtype)
        self.tokenizer_name = tok_path if tok_sub is None else f"{tok_path}/{tok_sub}"
        self.max_length = per_encoder(args.tokenizer_max_length, i, min(self.tokenizer.model_max_length, 512))
        self.prefix = per_encoder(args.text_prefix, i, "")
        mask = args.text_encoder_attention_mask
        self.use_mask = mask == "on" or (
            mask == "auto" and bool(getattr(self.model.config, "use_attention_mask", False))
        )
        self.device = device

    @torch.no_grad()
    def encode(self, captions):
        unique = list(dict.fromkeys(captions))  # captions repeat (MNIST has ten): encode each once per batch
        tokens = self.tokenizer(
            [self.prefix + c for c in unique],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        out = self.model(ids, attention_mask=mask if self.use_mask else None)
        result = {
            "hidden_states": out.last_hidden_state.float().cpu(),
            "attention_mask": mask.long().cpu(),
            "input_ids": ids.long().cpu(),
        }
        pooled = getattr(out, "text_embeds", None)
        pooled = getattr(out, "pooler_output", None) if pooled is None else pooled
        if pooled is not None:
            result["pooled"] = pooled.float().cpu()
        where = torch.tensor([unique.index(c) for c in captions])
        return {k: v[where] for k, v in result.items()}

    def info(self, text_dtype):
        return {
            "key": self.key,
            "name_or_path": self.display,
            "tokenizer": self.tokenizer_name,
            "max_length": self.max_length,
            "hidden_size": self.model.config.hidden_size,
            "pooled_size": self.pooled_size,
            "prefix": self.prefix,
            "dtype": text_dtype,
            "use_attention_mask": self.use_mask,
        }


# ----------------------------------------------------------------------------------------------------------------
# Encoding a shard
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_shard(rows, vae, text_encoders, transform, mode, args, device, dtype):
    """Tensors of one shard (keys of docs/precomputed_format.md), captions, and the number of skipped images."""
    out, captions, skipped = {}, [], 0
    latent_dtype, text_dtype = DTYPES[args.latent_dtype], DTYPES[args.text_dtype]
    for start in range(0, len(rows), args.batch_size):
        batch = []
        for position, raw, caption, label in rows[start : start + args.batch_size]:
            image = decode_image(raw, mode) if vae is not None else None
            if vae is not None and image is None:
                skipped += 1
                continue
            batch.append((position, image, caption, label))
        if not batch:
            continue
        parts = {"index": torch.tensor([b[0] for b in batch], dtype=torch.int64)}
        if batch[0][3] is not None:
            parts["label"] = torch.tensor([b[3] for b in batch], dtype=torch.int64)
        if vae is not None:
            pixels = torch.stack([transform(b[1], b[0]) for b in batch]).to(device, dtype)
            views = {"": pixels, "_flipped": pixels.flip(-1)} if args.random_flip else {"": pixels}
            for suffix, x in views.items():
                posterior = vae.encode(x).latent_dist
                parts[f"latent_mean{suffix}"] = posterior.mean.to(latent_dtype).cpu()
                parts[f"latent_std{suffix}"] = posterior.std.to(latent_dtype).cpu()
        for encoder in text_encoders:
            for k, v in encoder.encode([b[2] for b in batch]).items():
                parts[f"{encoder.key}.{k}"] = v.to(text_dtype) if v.is_floating_point() else v
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
        captions += [b[2] for b in batch]
    return {k: torch.cat(v).contiguous() for k, v in out.items()}, captions, skipped


def write_shard(out_dir, shard, tensors, captions, skipped):
    final = out_dir / f"shard-{shard:05d}.safetensors"
    tmp = out_dir / f"shard-{shard:05d}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions), "num_skipped": str(skipped)})
    os.replace(tmp, final)  # atomic: an existing shard-XXXXX.safetensors is always complete


def write_empty_prompt(out_dir, text_encoders, args):
    tensors = {}
    for encoder in text_encoders:
        for k, v in encoder.encode([""]).items():
            tensors[f"{encoder.key}.{k}"] = (v.to(DTYPES[args.text_dtype]) if v.is_floating_point() else v).contiguous()
    save_file(tensors, str(out_dir / "empty_prompt.safetensors"))


def write_index(out_dir, source, vae, text_encoders, args, settings):
    """index.json from the shards of this run's source length on disk (so a re-run that skipped finished shards
    counts them too); shard files beyond that length (left by a longer source) are removed. Written last."""
    expected = math.ceil(source.length / args.shard_size)
    missing = [s for s in range(expected) if not (out_dir / f"shard-{s:05d}.safetensors").is_file()]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} are missing; re-run to finish them")
    shard_files = [out_dir / f"shard-{s:05d}.safetensors" for s in range(expected)]
    shards, skipped, tensors = [], 0, {}
    for path in shard_files:
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("index").get_shape()[0] if "index" in f.keys() else 0
            skipped += int((f.metadata() or {}).get("num_skipped", 0))
            if n and not tensors:
                for key in f.keys():
                    s = f.get_slice(key)
                    tensors[key] = {"shape": list(s.get_shape()[1:]), "dtype": str(s.get_dtype()).lower()}
        shards.append({"file": path.name, "num_examples": n})
    total = sum(s["num_examples"] for s in shards)
    if total == 0:
        raise SystemExit(f"error: no readable example was encoded ({skipped} skipped); index.json not written")
    stale = [p for p in sorted(out_dir.glob("shard-*.safetensors")) if p not in shard_files]
    for path in stale:
        path.unlink()
    if stale:
        print(
            f"removed {len(stale)} shard files beyond this source's {expected} shards ({stale[0].name}, ...)",
            flush=True,
        )
    dtype_names = {"f16": "float16", "f32": "float32", "bf16": "bfloat16", "i64": "int64"}
    for t in tensors.values():
        t["dtype"] = dtype_names.get(t["dtype"], t["dtype"])
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
        "vae": None
        if vae is None
        else {
            **vae.loaded_from,
            "scaling_factor": vae.config.scaling_factor,
            "shift_factor": vae.config.get("shift_factor") or 0.0,
            "latent_channels": vae.config.latent_channels,
            "latent_size": args.resolution // 2 ** (len(vae.config.block_out_channels) - 1),
            "dtype": args.latent_dtype,
        },
        "text_encoders": [e.info(args.text_dtype) for e in text_encoders],
        "label_names": source.label_names,
        "tensors": tensors,
        "settings": settings,
    }
    (out_dir / "index.json.tmp").write_text(json.dumps(index, indent=2))
    os.replace(out_dir / "index.json.tmp", out_dir / "index.json")
    return index


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args):
    check_args(args)
    out_dir = Path(args.output_dir)
    settings = content_settings(args)
    check_settings(out_dir, settings)  # every process, before any model is loaded
    accelerator = Accelerator(
        cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))],
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_settings(out_dir, settings)  # before the first shard
        (out_dir / "index.json").unlink(missing_ok=True)  # written again at the end, when every shard is there
    accelerator.wait_for_everyone()

    source = open_source(args)
    if source.length == 0:
        fail("the source is empty: no example to encode")
    dtype = DTYPES[args.encoder_dtype]
    vae = load_vae(args, device, dtype)
    text_encoders = [TextEncoder(spec, i, args, device, dtype) for i, spec in enumerate(encoder_specs(args))]
    for encoder in text_encoders:
        encoder.pooled_size = int(encoder.encode([""]).get("pooled", torch.zeros(1, 0)).shape[-1]) or None
    if vae is None and not text_encoders:
        fail("nothing to encode: both the VAE and the text encoders are none")
    mode = "L" if vae is not None and vae.config.in_channels == 1 else "RGB"
    transform = image_transform(args)
    if accelerator.is_main_process and text_encoders:
        write_empty_prompt(out_dir, text_encoders, args)

    total = None if source.length is None else source.length
    mine = (
        None
        if total is None
        else sum(
            min(args.shard_size, total - s * args.shard_size)
            for s in range(rank, math.ceil(total / args.shard_size), world)
        )
    )
    progress = tqdm(total=mine, desc=f"encode (rank {rank})", position=rank, unit="img")
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    encoded = skipped = 0
    for shard, rows in my_shards(source, args, rank, world, out_dir):
        tensors, captions, n_skipped = encode_shard(rows, vae, text_encoders, transform, mode, args, device, dtype)
        write_shard(out_dir, shard, tensors, captions, n_skipped)
        encoded += len(captions)
        skipped += n_skipped
        progress.update(len(rows))
        progress.set_postfix(img_s=f"{encoded / max(time.perf_counter() - start, 1e-9):.1f}")
    progress.close()
    seconds = time.perf_counter() - start
    print(
        f"rank {rank}: encoded {encoded} images in {seconds:.1f}s ({encoded / max(seconds, 1e-9):.1f} images/s), "
        f"skipped {skipped}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - start
    counts = accelerator.reduce(torch.tensor([encoded, skipped], device=device), "sum").cpu().tolist()
    if accelerator.is_main_process:
        if counts[1]:
            print(f"warning: {counts[1]} unreadable images were skipped", file=sys.stderr)
        index = write_index(out_dir, source, vae, text_encoders, args, settings)
        print(
            f"encoded {counts[0]} images in {wall:.1f}s: {counts[0] / max(wall, 1e-9):.1f} images/s with {world} "
            f"process(es); {index['num_examples']} examples in {len(index['shards'])} shards, "
            f"{index['num_skipped']} skipped; wrote {out_dir / 'index.json'}",
            flush=True,
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
