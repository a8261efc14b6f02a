"""Training throughput of train_dit.py's DiT step: steps/s and peak memory, per model and speed flag.

Each configuration runs in its own process (peak memory is per process) through train_dit.py's own functions:
batch_to_inputs (the online VAE encode, or a latent drawn from stored mean/std as --precomputed_data_dir does),
training_step, backward, AdamW. Inputs are 256x256 images <-> 32x32x4 latents, as DiT on ImageNet 256. The VAE
has Stable Diffusion's architecture (random weights: the cost is the same).

    python benchmarks/dit_throughput.py                      # CPU table -> DOCS_DIR/dit_throughput.{md,json}
    python benchmarks/dit_throughput.py --device cuda --batch_size 128 --models DiT-XL/2 --steps 20

The last line is the table's headline: precomputed_speedup=<x> (DiT-S/2, online VAE step time / precomputed).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=256,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="DiT-S/2,DiT-B/2")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps, after one warm-up step.")
    parser.add_argument(
        "--flags",
        default="base,gradient_checkpointing,bf16,torch_compile,foreach_adamw",
        help="Speed settings tried on the first model (precomputed inputs).",
    )
    parser.add_argument("--docs_dir", default=str(REPO / "benchmarks" / "output"), help="Where the table goes.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(config):
    """One configuration: build, warm up, time `steps` optimizer steps; print a JSON line."""
    import torch
    from diffusers import AutoencoderKL

    sys.path.insert(0, str(REPO))
    import train_dit

    device = torch.device(config["device"])
    argv = ["--model", config["model"], "--weight_init", "adaln_zero", "--objective", "ddpm", "--train_data_dir", "."]
    args = train_dit.parse_args(argv)
    args.gradient_checkpointing = config["flag"] == "gradient_checkpointing"
    model = train_dit.build_transformer(args, 4, 32, 1000, None).to(device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config["flag"] == "torch_compile":
        model.compile()
    noise_scheduler = train_dit.build_noise_scheduler(args)
    fused = config["flag"] != "foreach_adamw"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    generator = torch.Generator(device).manual_seed(0)
    n = config["batch_size"]
    vae, scale = None, {"scaling_factor": 0.18215, "shift_factor": 0.0}
    if config["inputs"] == "online_vae":
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False).eval().to(device)
        batch = {"pixels": torch.rand(n, 3, 256, 256, device=device) * 2 - 1}
    else:
        batch = {
            "latent_mean": torch.randn(n, 4, 32, 32, device=device),
            "latent_std": torch.rand(n, 4, 32, 32, device=device) * 0.1,
        }
    cond = {"class_labels": torch.randint(0, 1000, (n,), device=device)}
    null = {"class_labels": torch.tensor([1000], device=device)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["flag"] == "bf16")

    def step():
        with autocast:
            x0 = train_dit.batch_to_inputs(batch, vae, scale, generator, args)
            per_sample, _ = train_dit.training_step(model, noise_scheduler, x0, cond, null, args, generator)
        per_sample.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernels, torch.compile
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / config["steps"]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )  # KiB -> GiB
    print(
        json.dumps(
            {
                **config,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "steps_per_s": 1 / seconds,
                "images_per_s": n / seconds,
                "peak_gib": peak,
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_worker(config):
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(f"{config}: failed\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{row['model']:9s} {row['inputs']:12s} {row['flag']:22s} {row['steps_per_s']:.3f} steps/s "
        f"{row['images_per_s']:.2f} img/s  peak {row['peak_gib']:.2f} GiB",
        flush=True,
    )
    return row


def main(args):
    if args.worker:
        return worker(json.loads(args.worker))
    base = {"device": args.device, "batch_size": args.batch_size, "steps": args.steps}
    models = args.models.split(",")
    rows = []
    for model in models:
        rows.append(run_worker({**base, "model": model, "inputs": "precomputed", "flag": "base"}))
    # The VAE encode costs the same whatever the DiT behind it: timed once, with the first model.
    rows.append(run_worker({**base, "model": models[0], "inputs": "online_vae", "flag": "base"}))
    for flag in args.flags.split(","):
        if flag != "base":
            rows.append(run_worker({**base, "model": models[0], "inputs": "precomputed", "flag": flag}))
    lookup = {(r["model"], r["inputs"], r["flag"]): r for r in rows}
    speedup = (
        lookup[(models[0], "precomputed", "base")]["steps_per_s"]
        / lookup[(models[0], "online_vae", "base")]["steps_per_s"]
    )
    lines = ["| model | inputs | setting | steps/s | images/s | peak memory (GiB) |", "|---|---|---|---:|---:|---:|"]
    lines += [
        f"| {r['model']} | {r['inputs']} | {r['flag']} | {r['steps_per_s']:.3f} | {r['images_per_s']:.2f} | "
        f"{r['peak_gib']:.2f} |"
        for r in rows
    ]
    command = "python benchmarks/dit_throughput.py " + " ".join(sys.argv[1:])
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (docs / f"dit_throughput{suffix}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    (docs / f"dit_throughput{suffix}.md").write_text(
        f"# DiT training throughput ({args.device}, batch {args.batch_size}, 256 px = 32x32x4 latents)\n\n"
        f"`{command}`\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    print(f"precomputed_speedup={speedup:.2f}")


if __name__ == "__main__":
    main(parse_args())
