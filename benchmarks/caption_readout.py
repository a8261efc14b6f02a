"""Does train_image_continuous.py's caption stream read the image? A diagnosis of an export on MNIST test images.

For each timestep t: the test image's caption is noised with the export's caption schedule, the model predicts the
caption's x0 once with the clean image and once with the image at full noise, and each x0 is decoded to the nearest
training caption. "noisy only" is the Bayes-optimal guess from the noisy caption alone (no model). A model that
uses the image beats both its own image-free row and, where the caption is ambiguous, the noisy-only row.

    python benchmarks/caption_readout.py OUT/model --data_root ../shared/datasets
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMESTEPS = [300, 600, 800, 900, 950, 990]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="The output_dir of a train_image_continuous.py run (its export).")
    parser.add_argument("--data_root", default="../shared/datasets")
    parser.add_argument("--num_images", type=int, default=300)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("continuous", REPO_ROOT / "train_image_continuous.py")
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    config = json.loads((Path(args.export) / tc.EXPORT_CONFIG).read_text())
    weights = load_file(Path(args.export) / tc.EXPORT_WEIGHTS)
    model = tc.build_model(config["mmdit"], config["max_text_length"], weights["text_mean"].numel())
    model.load_state_dict(weights)
    model.eval()
    encoder = tc.BertTextEncoder(config["text_encoder"], config["text_prefix"], config["max_text_length"])
    captions = config["retrieval_captions"]
    table = model.standardise(encoder(captions))
    caption_digit = torch.tensor([next(i for i, w in enumerate(tc.DIGIT_WORDS) if c.endswith(w)) for c in captions])
    images, labels = tc.load_mnist(Path(args.data_root), train=False)
    n = args.num_images
    x0, labels = images[:n].float().div(127.5).sub(1.0), labels[:n]
    e0 = table[[int((caption_digit == d).nonzero()[0]) for d in labels]]
    betas = tc.text_betas(config["noise_scheduler"], config.get("text_shift", 1.0))
    abar_all = tc.build_sampler(config["noise_scheduler"], trained_betas=betas).alphas_cumprod
    generator = torch.Generator().manual_seed(0)

    def accuracy(e, scale):
        nearest = torch.cdist(e.flatten(1), (scale * table).flatten(1)).argmin(1)
        return float((caption_digit[nearest] == labels).float().mean())

    rows = {"noisy caption only (Bayes)": [], "model x0, clean image given": [], "model x0, image at full noise": []}
    with torch.no_grad():
        for t in TIMESTEPS:
            abar = abar_all[t]
            e_t = abar.sqrt() * e0 + (1 - abar).sqrt() * torch.randn(e0.shape, generator=generator)
            rows["noisy caption only (Bayes)"].append(accuracy(e_t, abar.sqrt()))
            for name, image, t_image in (
                ("model x0, clean image given", x0, 0.0),
                ("model x0, image at full noise", torch.randn(x0.shape, generator=generator), 0.999),
            ):
                _, pred = model(image, torch.full((n,), t_image), e_t, torch.full((n,), t / 1000))
                x0_pred = tc.x0_from_prediction(
                    e_t, pred, torch.full((n,), t), abar_all, config["prediction_type"], clip=1e4
                )
                rows[name].append(accuracy(x0_pred, 1.0))
    print(f"text_shift {config.get('text_shift', 1.0)}, {n} MNIST test images: nearest-caption digit accuracy")
    print("| t | " + " | ".join(str(t) for t in TIMESTEPS) + " |")
    print("|---|" + "---:|" * len(TIMESTEPS))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
