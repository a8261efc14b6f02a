"""train_dit.py run the way users run it: class/text conditioning, pixels/latents/precomputed shards, DDPM/flow,
two processes, exact resume, exports that load in diffusers, and one-line errors for bad input."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, run_script
from PIL import Image

SCRIPT = "train_dit.py"
TINY = ["--model", "DiT-S/4", "--depth", "2", "--hidden_size", "32", "--num_heads", "2"]
FAST = [*TINY, "--train_batch_size", "4", "--logging_steps", "1", "--num_inference_steps", "2",
        "--validation_guidance_scales", "1,3", "--seed", "0"]
PIXEL_MNIST = ["--dataset_name", "mnist", "--vae_name_or_path", "none", "--resolution", "32"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An ImageNet-style folder: 3 classes x 3 RGB 32x32 images, one subfolder per class."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            pixels[:, 10 * c:10 * c + 10] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_pixel_mnist_max_samples_pipeline_then_sample_from(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script(SCRIPT, *PIXEL_MNIST, "--data-root", tiny_mnist, *FAST, "--max-samples", "10",
               "--max_train_steps", "2", "--num_eval_samples", "20", "--output-dir", out)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert {"loss_t0", "loss_t3"} & rows[0].keys() and rows[-1]["nonfinite_steps"] == 0
    for name in ["run_config.json", "loss.png", "samples/step-2.png", "checkpoint-2/model.safetensors",
                 "checkpoint-2/ema.safetensors", "transformer/config.json", "scheduler/scheduler_config.json"]:
        assert (out / name).is_file(), name
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["in_channels"] == 1
    assert config["num_embeds_ada_norm"] == 1000  # widened so that DiTPipeline's null class 1000 is ours
    with np.load(out / "eval_samples.npz") as npz:
        assert npz["images"].shape == (20, 28, 28) and npz["images"].dtype == np.uint8
        assert sorted(np.bincount(npz["labels"])) == [2] * 10

    # The export samples again without training, with the same weights: same images for the same seed.
    gen = tmp_path / "gen"
    run_script(SCRIPT, "--sample_from", out, "--num_eval_samples", "20", "--num_inference_steps", "2",
               "--validation_guidance_scales", "1,3", "--output_dir", gen)
    assert (gen / "samples" / "export.png").is_file()
    with np.load(out / "eval_samples.npz") as a, np.load(gen / "eval_samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_latent_class_folder_exports_a_dit_pipeline_with_guidance(tiny_vae, class_folder, tmp_path):
    from diffusers import DiTPipeline

    out = tmp_path / "run"
    run_script(SCRIPT, "--train_data_dir", class_folder, "--vae_name_or_path", tiny_vae, "--resolution", "32",
               *FAST, "--model", "DiT-S/2", "--random_flip", "--max_train_steps", "2", "--output_dir", out)
    export = json.loads((out / "export_config.json").read_text())
    assert export["num_classes"] == 3 and export["label_names"] == ["cat", "dog", "fox"]
    assert export["input_shape"] == [4, 16, 16]
    # Loadable and usable with diffusers alone, guidance included (null class id 1000 inside DiTPipeline).
    # DiTPipeline does not save id2label: the names are in export_config.json and can be passed back.
    pipe = DiTPipeline.from_pretrained(out, id2label=dict(enumerate(export["label_names"])))
    assert pipe.get_label_ids(["dog"]) == [1]
    images = pipe(class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_text_conditional_flow_from_captions_then_sample_from(tiny_vae, tiny_clip, tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    proc = run_script(SCRIPT, "--train_data_dir", tiny_imagefolder, "--conditioning", "text",
                      "--text_encoder_name_or_path", tiny_clip, "--tokenizer_max_length", "12",
                      "--vae_name_or_path", tiny_vae, "--resolution", "32", *FAST, "--model", "DiT-S/2",
                      "--objective", "flow", "--flow_shift", "2", "--guidance_interval", "0.1,0.9",
                      "--cond_dropout_prob", "0.5", "--max_train_steps", "2", "--output_dir", out)
    assert "input [4, 16, 16] (latents)" in proc.stdout
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.0
    gen = tmp_path / "gen"
    run_script(SCRIPT, "--sample_from", out, "--validation_prompts", "a red square", "a blue circle",
               "--num_inference_steps", "2", "--validation_guidance_scales", "2", "--output_dir", gen)
    assert (gen / "samples" / "export.png").is_file()


def test_precomputed_shards_class_and_text(tiny_vae, tiny_clip, tiny_mnist, tmp_path):
    shards = tmp_path / "shards"
    run_script("prepare_data_multi_gpu.py", "--mnist_root", tiny_mnist, "--max_samples", "12",
               "--vae_name_or_path", tiny_vae, "--text_encoder_name_or_path", tiny_clip, "--tokenizer_max_length",
               "12", "--resolution", "32", "--shard_size", "5", "--output_dir", shards)
    index = json.loads((shards / "index.json").read_text())
    assert "label" in index["tensors"] and index["vae"]["latent_size"] == 16
    for conditioning in ("class", "text"):
        out = tmp_path / conditioning
        proc = run_script(SCRIPT, "--precomputed_data_dir", shards, "--conditioning", conditioning, *FAST,
                          "--model", "DiT-S/2", "--max_train_steps", "2", "--output_dir", out)
        assert "12 examples" in proc.stdout and "input [4, 16, 16] (latents)" in proc.stdout
        assert all(math.isfinite(r["loss"]) for r in metrics(out))
        assert (out / "samples" / "step-2.png").is_file()


def test_two_processes(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script(SCRIPT, *PIXEL_MNIST, "--data_root", tiny_mnist, *FAST, "--objective", "flow",
               "--max_train_steps", "2", "--output_dir", out, launcher="accelerate")
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_processes"] == 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["samples_per_s"] > 0 and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoint-2" / "train_rng_1.safetensors").is_file()


def test_resume_is_exact_and_total_limit_prunes(tiny_mnist, tmp_path):
    # 24 examples in batches of 4: 6 steps per epoch, so step 2 is mid-epoch. Flow, flips and guidance dropout
    # all draw random numbers: the resumed run must restore the data position and every generator.
    common = [*PIXEL_MNIST, "--data_root", tiny_mnist, *FAST, "--objective", "flow", "--random_flip",
              "--max_samples", "24", "--validation_steps", "100", "--cond_dropout_prob", "0.3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(SCRIPT, *common, "--max_train_steps", "4", "--output_dir", straight)
    run_script(SCRIPT, *common, "--max_train_steps", "2", "--checkpointing_steps", "1",
               "--checkpoints_total_limit", "2", "--output_dir", resumed)
    proc = run_script(SCRIPT, *common, "--max_train_steps", "4", "--checkpointing_steps", "100",
                      "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest", "--output_dir", resumed)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same_weights(straight / "checkpoint-4", resumed / "checkpoint-4")
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("case", ["resolution", "preset", "num_classes", "xformers", "no_source"])
def test_bad_input_is_one_line_exit_2(case, tiny_mnist, tmp_path):
    args = {
        "resolution": [*PIXEL_MNIST[:-1], "30", "--data_root", tiny_mnist],  # 30 is not divisible by patch 4
        "preset": [*PIXEL_MNIST, "--data_root", tiny_mnist, "--model", "DiT-Q/2"],
        "num_classes": [*PIXEL_MNIST, "--data_root", tiny_mnist, "--num_classes", "7"],
        "xformers": [*PIXEL_MNIST, "--data_root", tiny_mnist, "--enable_xformers_memory_efficient_attention"],
        "no_source": ["--vae_name_or_path", "none"],
    }[case]
    expected = {"resolution": "--resolution 30", "preset": "--model DiT-Q/2", "num_classes": "--num_classes 7",
                "xformers": "xformers is not installed", "no_source": "give exactly one of"}[case]
    proc = run_script(SCRIPT, *FAST, *args, "--max_train_steps", "1", "--output_dir", tmp_path / "o", expect_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_label_dropout_happens_once_per_example_not_per_block():
    """diffusers' LabelEmbedding drops labels by itself in train mode, independently in each DiT block and from the
    global RNG; train_dit.py switches that off and drops whole examples to the null class in training_step."""
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO))
    import train_dit

    args = train_dit.parse_args([*TINY, "--dataset_name", "mnist"])
    model = train_dit.build_transformer(args, 1, 32, 10, None).train()
    assert model(torch.randn(2, 1, 32, 32), timestep=torch.tensor([1, 999]),
                 class_labels=torch.tensor([0, 1])).sample.abs().max() == 0  # adaLN-Zero: DiT's init, output 0
    with torch.no_grad():  # leave the zero init, so that labels change the output
        for p in model.parameters():
            p.normal_(std=0.05)
    x, t = torch.randn(64, 1, 32, 32), torch.randint(0, 1000, (64,))
    labels = torch.full((64,), 3)
    torch.manual_seed(0)
    first = model(x, timestep=t, class_labels=labels).sample
    torch.manual_seed(1)
    assert torch.equal(first, model(x, timestep=t, class_labels=labels).sample)  # no hidden random drop
    null = {"class_labels": torch.tensor([10])}
    drop = torch.arange(64) % 2 == 0
    dropped = train_dit.drop_condition({"class_labels": labels}, null, drop)["class_labels"]
    assert dropped.tolist() == [10 if d else 3 for d in drop.tolist()]
