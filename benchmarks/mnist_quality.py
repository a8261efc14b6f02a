"""Quality benchmark for the text-conditioned MNIST diffusion model of ``train_mnist.py``.

The benchmark trains the diffusion model with a fixed recipe, samples it at several
classifier-free guidance scales and scores every set of samples with a small MNIST
classifier (the "judge"):

* ``prompt_accuracy``: the fraction of generated images that the judge classifies as
  the digit they were prompted with.
* ``fid_ratio``: the Fréchet distance between the generated images and 1000 real test
  digits, divided by the Fréchet distance between 1000 real train digits and the same
  1000 test digits. Both distances are measured in the judge's 128-d penultimate
  feature space, and the real subsets are fixed and class-balanced (100 per digit), so
  the denominator is deterministic. Lower is better; 1000 other real digits score about
  0.7-1 (the ratio itself varies by about +-0.15 between equally good sets of 1000).
  The ratio is calibrated for 1000 generated images (Fréchet distances on small sets
  are biased upwards), so compare ratios measured on the same number of samples, with
  labels balanced over the digits like the reference sets.

The judge is trained once (a few minutes on CPU) and cached as safetensors at
``--judge_path``, with its test accuracy stored in the file's metadata.

Usage, from the repository root::

    python benchmarks/mnist_quality.py --data_root ./data \\
        --text_encoder_name_or_path ENC --output_dir output/mnist_quality

    # extra train_mnist.py flags go after "--" and are appended to RECIPE
    python benchmarks/mnist_quality.py --data_root ./data \\
        --text_encoder_name_or_path ENC -- --learning_rate 2e-4

    # only score an existing npz (images uint8 [N,28,28], labels int [N])
    python benchmarks/mnist_quality.py --data_root ./data --eval_only samples.npz

The last line of stdout is always::

    prompt_accuracy=<x> fid_ratio=<r> judge_accuracy=<y> train_minutes=<m> sample_seconds=<s>
"""

import argparse
import datetime
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train_mnist.py"

# The training recipe of docs/mnist.md, in full: train_mnist.py flags on top of the dataset, text encoder and
# output directory that the benchmark passes itself. Flags given after "--" are appended.
# 1800 steps of batch 64 (1.9 epochs); validation and checkpoint at the end only.
RECIPE = [
    *("--max_train_steps", "1800", "--train_batch_size", "64", "--seed", "0"),
    *("--learning_rate", "2e-3", "--adam_beta1", "0.9", "--adam_beta2", "0.99", "--adam_weight_decay", "0"),
    *("--lr_scheduler", "cosine", "--lr_warmup_steps", "200", "--max_grad_norm", "1.0"),
    *("--use_ema", "--ema_decay", "0.999", "--ema_power", "0.75"),
    *("--prediction_type", "v_prediction", "--snr_gamma", "5", "--cond_dropout_prob", "0.1"),
    *("--patch_size", "2", "--block_out_channels", "32,64,64", "--cross_attention_levels", "2"),
    *("--layers_per_block", "1", "--attention_head_dim", "16", "--norm_num_groups", "8"),
    *("--tokenizer_max_length", "8", "--caption_template", "A handwritten digit {}"),
    *("--validation_steps", "100000", "--checkpointing_steps", "100000"),
]

# Bump when the judge's architecture or training changes, so that stale caches are retrained.
JUDGE_VERSION = "1"
JUDGE_FEATURE_DIM = 128
JUDGE_EPOCHS = 5
JUDGE_BATCH_SIZE = 128
JUDGE_LEARNING_RATE = 3e-3
JUDGE_SEED = 0

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# Fixed, class-balanced real subsets for the Fréchet distance.
REFERENCE_PER_CLASS = 100
REFERENCE_SEED = 1234


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def normalize_flags(argv):
    """Return argv with hyphens replaced by underscores in every ``--flag`` name.

    Only the part before ``=`` is changed (``--data-root=a-b`` -> ``--data_root=a-b``); values
    and the bare ``--`` separator are left alone.
    """
    normalized = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + sep + value
        normalized.append(token)
    return normalized


def parse_args(argv=None):
    """Parse the benchmark's flags; everything after a bare ``--`` goes to train_mnist.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own_argv, trainer_argv = argv[:split], argv[split + 1 :]
    else:
        own_argv, trainer_argv = argv, []

    parser = argparse.ArgumentParser(
        description="Train, sample and score the MNIST diffusion model of train_mnist.py.",
        epilog="Flags after a bare '--' are appended to RECIPE and passed to train_mnist.py.",
    )
    parser.add_argument(
        "--data_root",
        default="./data",
        help="Folder holding MNIST/raw (torchvision layout); also passed to train_mnist.py.",
    )
    parser.add_argument(
        "--text_encoder_name_or_path",
        default=None,
        help="Text encoder passed to train_mnist.py (omitted: the trainer's default).",
    )
    parser.add_argument(
        "--output_dir",
        default="output/mnist_quality",
        help="Benchmark folder: the model goes to OUTPUT_DIR/model, samples to OUTPUT_DIR/gs-S.",
    )
    parser.add_argument(
        "--judge_path",
        default=str(REPO_ROOT / "benchmarks" / ".cache" / "mnist_judge.safetensors"),
        help="Cached judge classifier (trained on first use).",
    )
    parser.add_argument(
        "--guidance_scales",
        default="1.0,1.5,2.0,3.0",
        help="Comma-separated guidance scales of the sampling sweep.",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=2.0,
        help="Headline guidance scale (added to the sweep if missing).",
    )
    parser.add_argument(
        "--num_eval_samples",
        type=int,
        default=1000,
        help="Images sampled per guidance scale (fid_ratio is calibrated for 1000).",
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Sampling steps passed to train_mnist.py (its own default when omitted).",
    )
    parser.add_argument(
        "--skip_training",
        action="store_true",
        help="Reuse the model already in OUTPUT_DIR/model.",
    )
    parser.add_argument(
        "--eval_only",
        default=None,
        metavar="NPZ",
        help="Only score this npz (no training, sampling or docs).",
    )
    parser.add_argument(
        "--docs_dir",
        default=str(REPO_ROOT / "benchmarks" / "output"),
        help="Where mnist_quality.json and mnist_quality.md are written.",
    )
    args = parser.parse_args(normalize_flags(own_argv))
    args.trainer_args = trainer_argv
    args.argv = argv
    return args


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_mnist(data_root, train):
    """Return (images uint8 [N,28,28], labels int64 [N]) of the raw MNIST train or test split."""
    # Imported here: only the judge and the real reference sets need the dataset.
    from torchvision.datasets import MNIST

    dataset = MNIST(str(data_root), train=train, download=False)
    return dataset.data.clone(), dataset.targets.clone()


def class_balanced_indices(labels, per_class, seed):
    """Pick ``per_class`` indices of every digit with a fixed seed; sorted for reproducibility."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == digit), size=per_class, replace=False) for digit in range(10)]
    return np.sort(np.concatenate(chosen))


def reference_sets(data_root):
    """Return the fixed real subsets (train images, test images), 100 per digit each."""
    train_images, train_labels = load_mnist(data_root, train=True)
    test_images, test_labels = load_mnist(data_root, train=False)
    train_idx = class_balanced_indices(train_labels, REFERENCE_PER_CLASS, REFERENCE_SEED)
    test_idx = class_balanced_indices(test_labels, REFERENCE_PER_CLASS, REFERENCE_SEED)
    return train_images[train_idx], test_images[test_idx]


# ---------------------------------------------------------------------------------------------
# Judge classifier
# ---------------------------------------------------------------------------------------------


class MnistJudge(nn.Module):
    """Small CNN: two conv blocks and a 128-d penultimate layer (the Fréchet feature space).

    Inputs follow raw MNIST: uint8 images [N,28,28], white digit on black. The judge scales
    and normalises them itself, so callers never preprocess.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, JUDGE_FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(JUDGE_FEATURE_DIM, 10)

    @staticmethod
    def preprocess(images):
        """uint8 [N,28,28] (array or tensor) -> normalised float [N,1,28,28]."""
        images = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
        x = images.float().reshape(-1, 1, 28, 28) / 255.0
        return (x - MNIST_MEAN) / MNIST_STD

    def _forward_normalized(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        features = F.relu(self.fc(x.flatten(1)))
        return self.head(self.dropout(features)), features

    def forward(self, images):
        """Return (logits [N,10], penultimate features [N,128]) for uint8 images."""
        return self._forward_normalized(self.preprocess(images))

    @torch.inference_mode()
    def embed(self, images, batch_size=1000):
        """Return (logits, features) as float64 numpy arrays, in eval mode and in batches."""
        self.eval()
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            batch_logits, batch_features = self(images[start : start + batch_size])
            logits.append(batch_logits.double().numpy())
            features.append(batch_features.double().numpy())
        return np.concatenate(logits), np.concatenate(features)

    def logits(self, images):
        return self.embed(images)[0]

    def features(self, images):
        return self.embed(images)[1]


def random_shift(x, max_shift=2):
    """Augmentation: translate every image of a normalised batch [N,1,28,28] by up to
    ``max_shift`` pixels in each direction, filling with the background value."""
    background = -MNIST_MEAN / MNIST_STD
    padded = F.pad(x[:, 0], [max_shift] * 4, value=background)  # [N,32,32]
    n = x.shape[0]
    offsets = torch.arange(28)
    rows = torch.randint(0, 2 * max_shift + 1, (n, 1)) + offsets  # [N,28]
    cols = torch.randint(0, 2 * max_shift + 1, (n, 1)) + offsets  # [N,28]
    shifted = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return shifted[:, None]


def accuracy(model, images, labels):
    """Fraction of images that the model classifies as their label."""
    predictions = model.logits(images).argmax(axis=1)
    return float((predictions == np.asarray(labels)).mean())


def train_judge(data_root, epochs=JUDGE_EPOCHS, seed=JUDGE_SEED):
    """Train the judge on the 60k MNIST train set; return (model, test accuracy, seconds)."""
    torch.manual_seed(seed)
    train_images, train_labels = load_mnist(data_root, train=True)
    test_images, test_labels = load_mnist(data_root, train=False)
    x_all = MnistJudge.preprocess(train_images)

    model = MnistJudge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=JUDGE_LEARNING_RATE, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_all) / JUDGE_BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=JUDGE_LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )

    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all))
        running_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * JUDGE_BATCH_SIZE : (step + 1) * JUDGE_BATCH_SIZE]
            logits, _ = model._forward_normalized(random_shift(x_all[idx]))
            loss = F.cross_entropy(logits, train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
        test_accuracy = accuracy(model, test_images, test_labels)
        print(
            f"judge epoch {epoch + 1}/{epochs}: loss={running_loss / steps_per_epoch:.4f} "
            f"test_accuracy={test_accuracy:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    return model.eval(), test_accuracy, time.perf_counter() - start


def save_judge(model, test_accuracy, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"test_accuracy": f"{test_accuracy:.6f}", "judge_version": JUDGE_VERSION}
    save_file(state, str(path), metadata=metadata)


def load_judge(path):
    """Return (model, test accuracy) from the cache, or None if absent or stale."""
    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("judge_version") != JUDGE_VERSION:
        print(f"judge cache {path} is from another judge version; retraining", flush=True)
        return None
    model = MnistJudge()
    model.load_state_dict(load_file(str(path)))
    return model.eval(), float(metadata["test_accuracy"])


def get_judge(path, data_root):
    """Load the cached judge, training (and caching) it first if needed."""
    cached = load_judge(path)
    if cached is not None:
        return cached
    print(f"training the judge classifier (cached afterwards at {path})", flush=True)
    model, test_accuracy, seconds = train_judge(data_root)
    print(
        f"judge: test_accuracy={test_accuracy:.4f}, trained in {seconds:.0f}s",
        flush=True,
    )
    save_judge(model, test_accuracy, path)
    return model, test_accuracy


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def gaussian_stats(features):
    """Mean and (unbiased) covariance of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix via eigh (negatives clamped)."""
    matrix = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(S1 S2) = sum sqrt(eigvals(sqrt(S1) S2 sqrt(S1))), for symmetric PSD S1, S2."""
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_from_features(features1, features2):
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def prompt_accuracy(logits, labels):
    """Fraction of images classified as the digit they were prompted with."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


class Scorer:
    """Scores generated images against the fixed real reference sets."""

    def __init__(self, judge, data_root):
        self.judge = judge
        real_train, real_test = reference_sets(data_root)
        self.test_features = judge.features(real_test)
        self.baseline_fd = frechet_distance_from_features(judge.features(real_train), self.test_features)

    def score(self, images, labels):
        logits, features = self.judge.embed(images)
        fd = frechet_distance_from_features(features, self.test_features)
        return {
            "prompt_accuracy": prompt_accuracy(logits, labels),
            "fid_ratio": fd / self.baseline_fd,
            "fd": fd,
            "num_samples": len(images),
        }


def load_samples(path):
    """Read a trainer npz; return (images, labels, sample_seconds, guidance_scale or None)."""
    with np.load(path) as data:
        images = np.asarray(data["images"])
        labels = np.asarray(data["labels"]).astype(np.int64)
        sample_seconds = float(data["sample_seconds"]) if "sample_seconds" in data else math.nan
        guidance = float(data["guidance_scale"]) if "guidance_scale" in data else None
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"{path}: expected images uint8 [N,28,28] and labels [N], got images "
            f"{images.dtype} {list(images.shape)} and labels {list(labels.shape)}"
        )
    return images, labels, sample_seconds, guidance


def score_npz(scorer, path):
    images, labels, sample_seconds, guidance = load_samples(path)
    counts = np.bincount(labels, minlength=10)
    if counts.min() != counts.max():
        # The real reference sets are class-balanced; unbalanced prompts inflate fid_ratio.
        print(f"warning: {path}: labels are not balanced over the digits {counts.tolist()}", file=sys.stderr)
    row = scorer.score(images, labels)
    row.update(sample_seconds=sample_seconds, guidance_scale=guidance, npz=str(path))
    return row


# ---------------------------------------------------------------------------------------------
# Training and sampling (subprocesses of train_mnist.py)
# ---------------------------------------------------------------------------------------------


def scale_name(scale):
    """Folder-friendly spelling of a guidance scale: 1 -> '1.0', 1.5 -> '1.5'."""
    return str(float(scale))


def parse_scales(text, headline):
    """Sorted, de-duplicated guidance scales of the sweep, the headline scale included."""
    return sorted({float(s) for s in text.split(",") if s.strip()} | {float(headline)})


def train_command(args):
    command = [sys.executable, str(TRAIN_SCRIPT), "--data_root", args.data_root]
    if args.text_encoder_name_or_path is not None:
        command += ["--text_encoder_name_or_path", args.text_encoder_name_or_path]
    # A benchmark trains anew: a model folder left by an earlier run is replaced.
    command += ["--output_dir", str(Path(args.output_dir) / "model"), "--overwrite_output_dir"]
    return command + RECIPE + args.trainer_args


def sample_command(args, scale):
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        "--sample_from",
        str(Path(args.output_dir) / "model"),
        "--num_eval_samples",
        str(args.num_eval_samples),
        "--guidance_scale",
        scale_name(scale),
        "--output_dir",
        str(Path(args.output_dir) / f"gs-{scale_name(scale)}"),
    ]
    if args.num_inference_steps is not None:
        command += ["--num_inference_steps", str(args.num_inference_steps)]
    return command


def run_command(command):
    """Run a command (inheriting stdout/stderr); return its wall-clock seconds."""
    print("+ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def read_train_seconds(model_dir):
    summary = Path(model_dir) / "train_summary.json"
    if not summary.is_file():
        print(f"warning: {summary} not found; train_minutes=nan", flush=True)
        return math.nan
    return float(json.loads(summary.read_text())["train_seconds"])


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def format_table(rows):
    lines = [f"{'guidance':>8}  {'prompt_accuracy':>15}  {'fid_ratio':>9}  {'sample_seconds':>14}"]
    for row in rows:
        guidance = "-" if row["guidance_scale"] is None else f"{row['guidance_scale']:g}"
        lines.append(
            f"{guidance:>8}  {row['prompt_accuracy']:>15.4f}  {row['fid_ratio']:>9.3f}  {row['sample_seconds']:>14.1f}"
        )
    return "\n".join(lines)


def summary_line(row, judge_accuracy, train_seconds):
    return (
        f"prompt_accuracy={row['prompt_accuracy']:.4f} fid_ratio={row['fid_ratio']:.3f} "
        f"judge_accuracy={judge_accuracy:.4f} train_minutes={train_seconds / 60:.2f} "
        f"sample_seconds={row['sample_seconds']:.1f}"
    )


def json_safe(value):
    """NaN is not valid JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def write_docs(docs_dir, report):
    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    json_path = docs_dir / "mnist_quality.json"
    json_path.write_text(json.dumps(json_safe(report), indent=2) + "\n")

    headline = report["headline"]
    lines = [
        "# MNIST diffusion quality benchmark",
        "",
        (
            f"Measured {report['date']} with `benchmarks/mnist_quality.py`. The judge "
            f"classifier reaches {report['judge_accuracy']:.4f} MNIST test accuracy. "
            "`fid_ratio` is the Fréchet distance to 1000 real test digits (judge "
            "features) divided by that of 1000 real train digits: lower is better, "
            "other real digits score about 0.7-1."
        ),
        "",
        f"Training: {report['train_minutes']:.2f} minutes. Headline guidance scale: {headline['guidance_scale']:g}.",
        "",
        "| guidance | prompt_accuracy | fid_ratio | sample_seconds |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["sweep"]:
        lines.append(
            f"| {row['guidance_scale']:g} | {row['prompt_accuracy']:.4f} | "
            f"{row['fid_ratio']:.3f} | {row['sample_seconds']:.1f} |"
        )
    lines += [
        "",
        "Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        "Training command (recipe included):",
        "",
        "```",
        report["train_command"],
        "```",
        "",
    ]
    md_path = docs_dir / "mnist_quality.md"
    md_path.write_text("\n".join(lines))
    print(f"wrote {json_path} and {md_path}", flush=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def benchmark_command(args):
    return shlex.join(["python", "benchmarks/mnist_quality.py", *args.argv])


def main(args):
    judge, judge_accuracy = get_judge(args.judge_path, args.data_root)
    scorer = Scorer(judge, args.data_root)

    if args.eval_only:
        row = score_npz(scorer, args.eval_only)
        print(format_table([row]))
        print(summary_line(row, judge_accuracy, math.nan))
        return row

    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"
    command = train_command(args)
    if args.skip_training:
        if not model_dir.is_dir():
            raise SystemExit(f"--skip_training: {model_dir} does not exist")
    else:
        run_command(command)
    train_seconds = read_train_seconds(model_dir)

    rows = []
    for scale in parse_scales(args.guidance_scales, args.guidance_scale):
        wall_seconds = run_command(sample_command(args, scale))
        npz = output_dir / f"gs-{scale_name(scale)}" / "eval_samples.npz"
        row = score_npz(scorer, npz)
        row.update(guidance_scale=scale, sample_wall_seconds=wall_seconds)
        rows.append(row)
        print(
            f"guidance {scale:g}: prompt_accuracy={row['prompt_accuracy']:.4f} "
            f"fid_ratio={row['fid_ratio']:.3f} sample_seconds={row['sample_seconds']:.1f}",
            flush=True,
        )

    headline = next(row for row in rows if row["guidance_scale"] == float(args.guidance_scale))
    shutil.copyfile(headline["npz"], output_dir / "eval_samples.npz")

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": benchmark_command(args),
        "train_command": shlex.join(command),
        "recipe": RECIPE,
        "extra_trainer_args": args.trainer_args,
        "skip_training": args.skip_training,
        "judge_accuracy": judge_accuracy,
        "reference": {
            "per_class": REFERENCE_PER_CLASS,
            "seed": REFERENCE_SEED,
            "baseline_fd": scorer.baseline_fd,
        },
        "train_seconds": train_seconds,
        "train_minutes": train_seconds / 60,
        "num_eval_samples": args.num_eval_samples,
        "num_inference_steps": args.num_inference_steps,
        "headline": headline,
        "sweep": rows,
        "torch_version": torch.__version__,
    }

    print(format_table(rows))
    write_docs(args.docs_dir, report)
    print(summary_line(headline, judge_accuracy, train_seconds))
    return report


if __name__ == "__main__":
    main(parse_args())
