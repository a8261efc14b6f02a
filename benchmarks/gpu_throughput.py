"""Training throughput on one GPU: DiT-XL/2 at 256 px and an SD-1.5-sized UNet at 512 px, from configs alone.

Every model is built from its config with random weights (no downloads: the cost of a step does not depend on the
weights). bf16 autocast over fp32 master weights (what `--mixed_precision bf16` does in the trainers), fused AdamW,
PyTorch SDPA attention (diffusers' default processor).

(a) DiT-XL/2 (DiTTransformer2DModel: 28 layers, hidden 1152, 16 heads, patch 2, 1000 classes, learned sigma) on
    random 4x32x32 latents, i.e. precomputed VAE features of 256x256 images: at batch 128 and at the largest batch
    that fits (doubling from 256 until the GPU runs out of memory). Steps/s, images/s, peak memory and model FLOPs
    utilisation (MFU) against --peak_tflops.
(b) UNet2DConditionModel with Stable Diffusion 1.5's shape (320-640-1280-1280 channels, 2 layers per block,
    cross-attention to 768-d states, 64x64x4 latents) at 512 px, batch 16: once "with shards" (precomputed latents
    and text states, what --precomputed_data_dir reads) and once "without shards" (every step encodes the images
    with an SD-sized AutoencoderKL and the captions with a CLIP-L-sized text encoder, both frozen).

    python benchmarks/gpu_throughput.py                          # both parts -> output/gpu_throughput.json
    python benchmarks/gpu_throughput.py --only dit --compile     # DiT-XL/2 with torch.compile
    python benchmarks/gpu_throughput.py --tiny --device cpu      # tiny sizes: a smoke test of this script on CPU

The anchor: fast-DiT (github.com/chuanyangjin/fast-DiT) reports 0.84 steps/s for DiT-XL/2 at global batch 128 on
one A100 (bf16, precomputed features): 107.5 images/s x 3 x 119 GFLOPs = 38 TFLOP/s, ~12% of the A100's 312 TFLOP/s
bf16 dense peak. We aim for >= 40% MFU on an H100/H200.

About the FLOPs (a trap): the 119 "GFLOPs" of DiT-XL/2 in the DiT paper count multiply-adds. Counting 2 FLOPs per
multiply-add, as GPU peak figures do, one forward is ~237 GFLOPs (the torch FLOP counter's figure, printed as
`GF/img`). So two MFUs are reported: `mfu_paper` uses 119 GFLOPs per forward (the anchor's convention: comparable
with fast-DiT's 12%, but half the true utilisation) and `mfu` uses the counted FLOPs (the standard definition). A
training step is 3 forwards (forward + backward at twice the forward's cost) in both.
"""

import argparse
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

DIT_XL_2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)

# --tiny: the same code paths at sizes a CPU runs in seconds.
TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    attention_head_dim=8,
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8,
    sample_size=64,
)
TINY_CLIP_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=999,
)
PAPER_GFLOPS = {"DiT-XL/2": 119.0}  # per image forward, 256 px: the DiT paper's (multiply-add) count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--only", choices=["dit", "unet"], default=None, help="Run one part only.")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu.")
    parser.add_argument("--tiny", action="store_true", help="Tiny models and batches: a smoke test (CPU is fine).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps first (kernel choice, caches).")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per configuration.")
    parser.add_argument("--dit_batch_size", type=int, default=128)
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=2048,
        help="Stop the DiT search for the largest batch here; 0: measure --dit_batch_size only.",
    )
    parser.add_argument("--unet_batch_size", type=int, default=16)
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=989.0,
        help="The GPU's bf16 dense peak: 989 for H100/H200 SXM, 756 for H100 PCIe, 312 for A100.",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained model (not the encoders).")
    parser.add_argument("--output", default=str(REPO / "output" / "gpu_throughput.json"), help="JSON results.")
    args = parser.parse_args(argv)
    if args.tiny:  # small defaults unless given explicitly
        for flag, value in (("dit_batch_size", 4), ("max_batch_size", 16), ("unet_batch_size", 2)):
            if getattr(args, flag) == parser.get_default(flag):
                setattr(args, flag, value)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Timing and FLOPs
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_steps(step, device, warmup_steps, steps):
    """Seconds per step, measured over `steps` steps after `warmup_steps` untimed ones."""
    for _ in range(warmup_steps):
        step()
    synchronize(device)  # the warm-up's queued kernels must not be charged to the timed steps
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def forward_flops(forward):
    """FLOPs of one call of forward() as torch's FLOP counter sees them (2 per multiply-add, SDPA included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops()


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def build_on(device, build):
    """Construct a model directly on the device: random-initialising ~1B parameters on the CPU takes minutes."""
    with torch.device(device):
        return build()


# ---------------------------------------------------------------------------------------------------------------
# (a) DiT-XL/2 on precomputed latents
# ---------------------------------------------------------------------------------------------------------------
def bench_dit(args, device):
    from diffusers import DiTTransformer2DModel

    name = "DiT-tiny/2" if args.tiny else "DiT-XL/2"
    config = TINY_DIT if args.tiny else DIT_XL_2
    model = build_on(device, lambda: DiTTransformer2DModel(**config)).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    # DDPM's linear betas, kept on the device: indexing them with device timesteps needs no host round trip.
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device, dtype=torch.float64), 0)
    alphas_cumprod = alphas_cumprod.float()
    latent_shape = (config["in_channels"], config["sample_size"], config["sample_size"])

    def batch(n):
        return (
            torch.randn(n, *latent_shape, device=device),
            torch.randint(0, 1000, (n,), device=device),
            torch.randint(0, 1000, (n,), device=device),
            torch.randn(n, *latent_shape, device=device),
        )

    def train_step(x0, labels, t, noise):
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x_t, timestep=t, class_labels=labels).sample
        # Learned sigma: the first half of the channels is epsilon. DiT's variational-bound term on the second
        # half costs a few elementwise ops; the MSE alone times the model just as well.
        loss = F.mse_loss(out[:, : latent_shape[0]].float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one = batch(1)
    counted = forward_flops(lambda: model(one[0], timestep=one[2], class_labels=one[1]))
    paper = PAPER_GFLOPS.get(name, counted / 2 / 1e9) * 1e9  # the paper's unit: multiply-adds
    print(
        f"{name}: {params / 1e6:.0f}M parameters, {counted / 1e9:.4g} GFLOPs per image forward (counted), "
        f"{paper / 1e9:.4g} in the DiT paper's count"
    )
    if args.compile:  # in place, after counting: the module's __call__ runs the compiled forward from here on
        model.compile()

    sizes = [args.dit_batch_size]  # then doubling, up to --max_batch_size or the first out-of-memory
    while args.max_batch_size and 2 * sizes[-1] <= args.max_batch_size:
        sizes.append(2 * sizes[-1])

    def seconds_per_step(n):
        data = batch(n)
        return time_steps(lambda: train_step(*data), device, args.warmup_steps, args.steps)

    rows, out_of_memory = [], False
    for n in sizes:
        reset_peak_memory(device)
        try:
            seconds = seconds_per_step(n)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            seconds = None
        if seconds is None:  # outside the except block, so that the traceback no longer holds the activations
            # Gradients of the failed step may be half written: drop them before the memory is measured again.
            optimizer.zero_grad(set_to_none=True)
            reset_peak_memory(device)
            out_of_memory = True
            print(
                f"{name} batch {n}: out of memory"
                + (f"; the largest batch that fits is {rows[-1]['batch_size']}" if rows else "")
            )
            break
        images_per_s = n / seconds
        rows.append(
            {
                "part": "dit",
                "model": name,
                "batch_size": n,
                "steps_per_s": 1 / seconds,
                "images_per_s": images_per_s,
                "peak_memory_gib": peak_memory_gib(device),
                "gflops_per_image_forward": counted / 1e9,
                "paper_gflops_per_image_forward": paper / 1e9,
                "train_tflops": 3 * counted * images_per_s / 1e12,
                "mfu": 3 * counted * images_per_s / (args.peak_tflops * 1e12),
                "mfu_paper": 3 * paper * images_per_s / (args.peak_tflops * 1e12),
                "gradient_checkpointing": args.gradient_checkpointing,
                "compile": args.compile,
            }
        )
        print(format_row(rows[-1]))
    if len(rows) > 1:  # the last batch that ran: the largest that fits, or the search stopped at --max_batch_size
        rows[-1]["largest_batch"] = "fits; doubling it ran out of memory" if out_of_memory else "--max_batch_size"
    return rows  # the model and optimizer go with this frame: main() frees the memory before the next part


# ---------------------------------------------------------------------------------------------------------------
# (b) SD-1.5-sized UNet, with and without precomputed shards
# ---------------------------------------------------------------------------------------------------------------
def bench_unet(args, device):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    name = "UNet-tiny" if args.tiny else "UNet SD-1.5"
    unet_config = TINY_UNET if args.tiny else SD15_UNET
    vae_config = TINY_VAE if args.tiny else SD_VAE
    text_config = CLIPTextConfig(**(TINY_CLIP_TEXT if args.tiny else CLIP_L_TEXT))
    resolution, text_length, n = vae_config["sample_size"], 77, args.unet_batch_size
    latent_side = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert latent_side == unet_config["sample_size"], "the VAE's latents must be the UNet's input size"

    unet = build_on(device, lambda: UNet2DConditionModel(**unet_config)).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)
    # Frozen encoders in bf16 (as train_ldm_sd.py keeps them under --mixed_precision bf16), never compiled here.
    vae = build_on(device, lambda: AutoencoderKL(**vae_config))
    diffusers_logging.set_verbosity_error()  # .to(bf16) warns that some VAEs keep modules in fp32: this one has none
    vae = vae.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    diffusers_logging.set_verbosity_warning()
    text_encoder = build_on(device, lambda: CLIPTextModel(text_config)).to(dtype=torch.bfloat16).eval()
    text_encoder.requires_grad_(False)
    alphas_cumprod = torch.cumprod(
        1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=device, dtype=torch.float64) ** 2, 0
    ).float()  # scaled_linear
    params = sum(p.numel() for p in unet.parameters())

    latents = torch.randn(n, 4, latent_side, latent_side, device=device)
    states = torch.randn(n, text_length, unet_config["cross_attention_dim"], device=device)
    images = torch.rand(n, 3, resolution, resolution, device=device) * 2 - 1
    token_ids = torch.randint(0, text_config.vocab_size, (n, text_length), device=device)

    def encode():
        """What a step without shards adds: the VAE's posterior sample and the text encoder's hidden states."""
        with torch.no_grad():
            x0 = vae.encode(images.to(torch.bfloat16)).latent_dist.sample().float() * 0.18215
            text = text_encoder(token_ids)[0].float()
        return x0, text

    def train_step(x0, text):
        t = torch.randint(0, 1000, (n,), device=device)
        noise = torch.randn_like(x0)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = unet(x_t, t, encoder_hidden_states=text).sample
        F.mse_loss(pred.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counted = forward_flops(
        lambda: unet(latents[:1], torch.tensor([500], device=device), encoder_hidden_states=states[:1])
    )
    print(
        f"{name}: {params / 1e6:.0f}M parameters, {counted / 1e9:.4g} GFLOPs per image forward (counted), "
        f"{resolution} px, batch {n}"
    )
    if args.compile:
        unet.compile()
    rows = []
    for variant, step in (
        ("with shards", lambda: train_step(latents, states)),
        ("without shards", lambda: train_step(*encode())),
    ):
        reset_peak_memory(device)
        try:
            seconds = time_steps(step, device, args.warmup_steps, args.steps)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            seconds = None
        if seconds is None:
            optimizer.zero_grad(set_to_none=True)
            reset_peak_memory(device)
            print(f"{name} {variant} batch {n}: out of memory")
            continue
        images_per_s = n / seconds
        rows.append(
            {
                "part": "unet",
                "model": name,
                "variant": variant,
                "batch_size": n,
                "resolution": resolution,
                "steps_per_s": 1 / seconds,
                "images_per_s": images_per_s,
                "peak_memory_gib": peak_memory_gib(device),
                "gflops_per_image_forward": counted / 1e9,
                "train_tflops": 3 * counted * images_per_s / 1e12,
                # The UNet's FLOPs only: the encoders' work is overhead, not model FLOPs.
                "mfu": 3 * counted * images_per_s / (args.peak_tflops * 1e12),
                "gradient_checkpointing": args.gradient_checkpointing,
                "compile": args.compile,
            }
        )
        print(format_row(rows[-1]))
    if len(rows) == 2:
        rows[1]["slowdown_without_shards"] = rows[0]["steps_per_s"] / rows[1]["steps_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("model", "{}", 12),
    ("variant", "{}", 14),
    ("batch_size", "{}", 6),
    ("steps_per_s", "{:.2f}", 8),
    ("images_per_s", "{:.1f}", 9),
    ("peak_memory_gib", "{:.1f}", 8),
    ("train_tflops", "{:.0f}", 7),
    ("mfu", "{:.1%}", 7),
    ("mfu_paper", "{:.1%}", 9),
]
HEADERS = {
    "batch_size": "batch",
    "steps_per_s": "steps/s",
    "images_per_s": "img/s",
    "peak_memory_gib": "GiB",
    "train_tflops": "TFLOP/s",
    "mfu_paper": "mfu(119)",
}


def format_row(row):
    cells = []
    for key, fmt, width in COLUMNS:
        value = row.get(key, "-" if key != "variant" else "")
        cells.append(
            (fmt.format(value) if value not in (None, "-", "") else ("-" if value is None else value)).ljust(width)
        )
    return " ".join(cells)


def main(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        # bf16 autocast runs the big matmuls; TF32 speeds up what stays in fp32 (the loss, the noising, any matmul
        # outside autocast) at no cost to training. cuDNN benchmark picks the fastest conv kernels for fixed shapes.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = platform.processor() or platform.machine()
    if args.compile and device.type == "cpu":
        print("note: torch.compile on CPU needs a C++ compiler and times the CPU backend", file=sys.stderr)
    import diffusers
    import transformers

    print(
        f"device: {gpu}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}; peak {args.peak_tflops:.0f} TFLOP/s bf16 dense"
    )
    print(" ".join(HEADERS.get(key, key).ljust(width) for key, _, width in COLUMNS))
    rows = []
    if args.only in (None, "dit"):
        rows += bench_dit(args, device)
        reset_peak_memory(device)
    if args.only in (None, "unet"):
        rows += bench_unet(args, device)

    results = {
        "device": gpu,
        "device_type": device.type,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": args.peak_tflops,
        "tiny": args.tiny,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "anchor": {
            "source": "fast-DiT, DiT-XL/2, global batch 128, 1x A100",
            "steps_per_s": 0.84,
            "mfu_paper": 0.84 * 128 * 3 * 119e9 / 312e12,
        },
        "rows": rows,
    }
    print("\nsummary")
    print(" ".join(HEADERS.get(key, key).ljust(width) for key, _, width in COLUMNS))
    for row in rows:
        print(format_row(row))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {output}")
    if not rows or any(not math.isfinite(r["steps_per_s"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
