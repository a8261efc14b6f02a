"""Quality benchmark for train_dit.py: a class-conditional pixel-space DiT on MNIST (digits padded to 32x32).

Trains train_dit.py with a fixed recipe per objective (RECIPES below), samples 1000 digits (100 per class) at
several guidance scales from the export (`--sample_from`), and scores them with the judge of
benchmarks/mnist_quality.py: `class_accuracy` (the judge recognises the class it was asked for) and
`fid_ratio` (Fréchet distance to real test digits in the judge's features over that of real train digits).

    python benchmarks/dit_quality.py --data_root ./data --output_dir output/dit_quality --objective flow
    python benchmarks/dit_quality.py ... -- --learning_rate 5e-4      # extra train_dit.py flags after "--"

Writes OUTPUT_DIR/eval_samples.npz (the headline guidance scale), DOCS_DIR/dit_quality_<objective>.json
(default benchmarks/output/), and prints as its last line:
class_accuracy=<x> fid_ratio=<r> train_minutes=<m> sample_seconds=<s>
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_quality import Scorer, get_judge, score_npz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The same small DiT for both objectives: 4x4 patches of the 32x32 digit (64 tokens), 6 blocks of width 192,
# diffusers' default init, batch 32 (docs/dit.md says why).
MODEL = ["--model", "DiT-S/4", "--hidden_size", "192", "--depth", "6", "--num_heads", "3"]
COMMON = [
    "--dataset_name",
    "mnist",
    "--vae_name_or_path",
    "none",
    "--resolution",
    "32",
    *MODEL,
    "--weight_init",
    "pytorch",
    "--train_batch_size",
    "32",
    "--learning_rate",
    "1e-3",
    "--adam_beta2",
    "0.99",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "100",
    "--ema_decay",
    "0.999",
    "--cond_dropout_prob",
    "0.1",
    "--validation_steps",
    "100000",
    "--checkpointing_steps",
    "100000",
    "--logging_steps",
    "50",
]
# ddpm in pixel space uses what train_mnist.py measured to work there: squared-cosine betas, v-prediction and
# min-SNR-5 weighting (DiT's own linear betas + epsilon are tuned for VAE latents).
RECIPES = {
    "flow": [*COMMON, "--objective", "flow", "--max_train_steps", "2200"],
    "ddpm": [
        *COMMON,
        "--objective",
        "ddpm",
        "--max_train_steps",
        "2200",
        "--beta_schedule",
        "squaredcos_cap_v2",
        "--prediction_type",
        "v_prediction",
        "--snr_gamma",
        "5",
    ],
}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="./data", help="Folder holding MNIST/raw.")
    parser.add_argument("--output_dir", default="output/dit_quality")
    parser.add_argument("--objective", choices=sorted(RECIPES), default="flow")
    parser.add_argument("--guidance_scales", default="1.75", help="Sampled and scored, one set of 1000 each.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.75,
        help="The headline scale, one of --guidance_scales.",
    )
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--judge_path", default=str(REPO / "benchmarks" / ".cache" / "mnist_judge.safetensors"))
    parser.add_argument("--docs_dir", default=str(REPO / "benchmarks" / "output"), help="Where the report goes.")
    parser.add_argument("--skip_training", action="store_true", help="Score the model already in OUTPUT_DIR/model.")
    args = parser.parse_args(argv)
    args.extra, args.argv = extra, argv + (["--", *extra] if extra else [])
    return args


def run(command):
    print("+ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def main(args):
    judge, judge_accuracy = get_judge(args.judge_path, args.data_root)
    scorer = Scorer(judge, args.data_root)
    out = Path(args.output_dir)
    model_dir = out / "model"
    train = [
        sys.executable,
        "train_dit.py",
        *RECIPES[args.objective],
        "--data_root",
        args.data_root,
        "--output_dir",
        str(model_dir),
        *args.extra,
    ]
    if not args.skip_training:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        run(train)
    train_seconds = json.loads((model_dir / "train_summary.json").read_text())["train_seconds"]

    rows = []
    for scale in [float(s) for s in args.guidance_scales.split(",")]:
        folder = out / f"gs-{scale}"
        run(
            [
                sys.executable,
                "train_dit.py",
                "--sample_from",
                str(model_dir),
                "--output_dir",
                str(folder),
                "--num_eval_samples",
                "1000",
                "--guidance_scale",
                str(scale),
                "--num_inference_steps",
                str(args.num_inference_steps),
                "--validation_guidance_scales",
                str(scale),
            ]
        )
        row = score_npz(scorer, folder / "eval_samples.npz")
        row["class_accuracy"] = row.pop("prompt_accuracy")
        rows.append(row)
        print(
            f"guidance {scale:g}: class_accuracy={row['class_accuracy']:.4f} fid_ratio={row['fid_ratio']:.3f} "
            f"sample_seconds={row['sample_seconds']:.1f}",
            flush=True,
        )
    headline = next(r for r in rows if r["guidance_scale"] == args.guidance_scale)
    shutil.copyfile(headline["npz"], out / "eval_samples.npz")
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/dit_quality.py", *args.argv]),
        "train_command": shlex.join(train),
        "objective": args.objective,
        "judge_accuracy": judge_accuracy,
        "train_minutes": train_seconds / 60,
        "num_inference_steps": args.num_inference_steps,
        "headline": headline,
        "sweep": rows,
    }
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"dit_quality_{args.objective}.json").write_text(json.dumps(report, indent=2) + "\n")
    final_grid = max((model_dir / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    shutil.copyfile(final_grid, docs / f"dit_samples_{args.objective}.png")
    print(
        f"class_accuracy={headline['class_accuracy']:.4f} fid_ratio={headline['fid_ratio']:.3f} "
        f"train_minutes={train_seconds / 60:.2f} sample_seconds={headline['sample_seconds']:.1f}"
    )


if __name__ == "__main__":
    main(parse_args())
