"""train_dit.py run the way users run it: class/text conditioning, pixels/latents/precomputed shards, DDPM/flow,
two processes, exact resume, exports that load in diffusers, and one-line errors for bad input."""

import functools
import importlib
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, assert_same_weights, check_damaged_checkpoint_and_claims, run_script
from PIL import Image
from safetensors.torch import load_file

SCRIPT = "train_dit.py"
TINY = ["--model", "DiT-S/4", "--depth", "2", "--hidden_size", "32", "--num_heads", "2"]
FAST = [
    *TINY,
    "--train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--num_inference_steps",
    "2",
    "--validation_guidance_scales",
    "1,3",
    "--seed",
    "0",
]
PIXEL_MNIST = ["--dataset_name", "mnist", "--vae_name_or_path", "none", "--resolution", "32"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_dit():
    """The script as a module, for in-process tests of its functions."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("train_dit")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An ImageNet-style folder: 3 classes x 3 RGB 32x32 images, one subfolder per class."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
            pixels[:, 10 * c : 10 * c + 10] = 200
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
    """2 classes x (1 readable RGB 32x32 image + 1 file that is not an image)."""
    root = tmp_path_factory.mktemp("broken")
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        pixels = np.full((32, 32, 3), 40, dtype=np.uint8)
        pixels[:, 16 * c : 16 * c + 16] = 200
        Image.fromarray(pixels).save(root / name / "good.png")
        (root / name / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_pixel_mnist_max_samples_pipeline_then_sample_from(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run_script(
        SCRIPT,
        *PIXEL_MNIST,
        "--data-root",
        tiny_mnist,
        *FAST,
        "--max-samples",
        "10",
        "--max_train_steps",
        "2",
        "--num_eval_samples",
        "20",
        "--output-dir",
        out,
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert {"loss_t0", "loss_t3"} & rows[0].keys() and rows[-1]["nonfinite_steps"] == 0
    for name in [
        "run_config.json",
        "loss.png",
        "samples/step-2.png",
        "checkpoint-2/model.safetensors",
        "checkpoint-2/transformer_ema/diffusion_pytorch_model.safetensors",
        "transformer/config.json",
        "scheduler/scheduler_config.json",
    ]:
        assert (out / name).is_file(), name
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["in_channels"] == 1
    assert config["num_embeds_ada_norm"] == 1000  # widened so that DiTPipeline's null class 1000 is ours
    with np.load(out / "eval_samples.npz") as npz:
        assert npz["images"].shape == (20, 28, 28) and npz["images"].dtype == np.uint8
        assert sorted(np.bincount(npz["labels"])) == [2] * 10

    # The export samples again without training, with the same weights: same images for the same seed.
    gen = tmp_path / "gen"
    run_script(
        SCRIPT,
        "--sample_from",
        out,
        "--num_eval_samples",
        "20",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1,3",
        "--output_dir",
        gen,
    )
    assert (gen / "samples" / "export.png").is_file()
    with np.load(out / "eval_samples.npz") as a, np.load(gen / "eval_samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_latent_class_folder_exports_a_dit_pipeline_with_guidance(tiny_vae, class_folder, tmp_path):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    out = tmp_path / "run"
    run_script(
        SCRIPT,
        "--train_data_dir",
        class_folder,
        "--vae_name_or_path",
        tiny_vae,
        "--resolution",
        "32",
        *FAST,
        "--model",
        "DiT-S/2",
        "--random_flip",
        "--max_train_steps",
        "2",
        "--num_eval_samples",
        "6",
        "--report_to",
        "tensorboard",
        "--tracker_project_name",
        "tiny",
        "--output_dir",
        out,
    )
    export = json.loads((out / "export_config.json").read_text())
    assert export["num_classes"] == 3 and export["label_names"] == ["cat", "dog", "fox"]
    assert export["input_shape"] == [4, 16, 16]
    # Loadable and usable with diffusers alone, guidance included (null class id 1000 inside DiTPipeline).
    # DiTPipeline does not save id2label: the names are in export_config.json and can be passed back.
    pipe = DiTPipeline.from_pretrained(out, id2label=dict(enumerate(export["label_names"])))
    assert pipe.get_label_ids(["dog"]) == [1]
    images = pipe(class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()

    # The export's manifest covers every part of the pipeline. A checkpoint holds the EMA transformer in
    # save_pretrained layout (at the last step: the export's weights, whose label tables the export widens to
    # DiTPipeline's 1000 classes + null) and what --sample_from needs, the VAE by reference, not a copy.
    td = train_dit()
    checkpoint = out / "checkpoint-2"
    assert td.manifest_problem(out) is None and td.manifest_problem(checkpoint) is None
    parts = {name.split("/")[0] for name in json.loads((out / "manifest.json").read_text())["files"]}
    assert parts == {
        "model_index.json",
        "transformer",
        "vae",
        "scheduler",
        "export_config.json",
        "README.md",
        "samples.png",
    }
    assert not (checkpoint / "vae").exists() and (checkpoint / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((checkpoint / "export_config.json").read_text())["vae"] == {
        "name_or_path": str(tiny_vae),
        "subfolder": None,
    }
    ema = DiTTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer_ema").state_dict()
    exported = pipe.transformer.state_dict()
    assert ema.keys() == exported.keys()
    for key, value in ema.items():
        if key.endswith("class_embedder.embedding_table.weight"):  # 3 classes + null; exported: null at 1000
            assert torch.equal(value[:3], exported[key][:3]) and torch.equal(value[3], exported[key][1000]), key
        else:
            assert torch.equal(value, exported[key]), key
    # TensorBoard got the scalars and the validation grid; the export says what it is (Hub model card).
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Images("validation")] == [2] and events.Images("validation")[0].width > 100
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license and "class-conditional" in card.data.tags
    assert "--max_train_steps 2" in card.text and "(samples.png)" in card.text and (out / "samples.png").is_file()

    gen = tmp_path / "from-checkpoint"
    run_script(
        SCRIPT,
        "--sample_from",
        checkpoint,
        "--num_eval_samples",
        "6",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1,3",
        "--output_dir",
        gen,
    )
    with np.load(out / "eval_samples.npz") as a, np.load(gen / "eval_samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])  # the same samples as at the end of training


def test_text_conditional_flow_from_captions_then_sample_from(tiny_vae, tiny_clip, tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    proc = run_script(
        SCRIPT,
        "--train_data_dir",
        tiny_imagefolder,
        "--conditioning",
        "text",
        "--text_encoder_name_or_path",
        tiny_clip,
        "--tokenizer_max_length",
        "12",
        "--vae_name_or_path",
        tiny_vae,
        "--resolution",
        "32",
        *FAST,
        "--model",
        "DiT-S/2",
        "--objective",
        "flow",
        "--flow_shift",
        "2",
        "--guidance_interval",
        "0.1,0.9",
        "--cond_dropout_prob",
        "0.5",
        "--max_train_steps",
        "2",
        "--output_dir",
        out,
    )
    assert "input [4, 16, 16] (latents)" in proc.stdout
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.0
    gen = tmp_path / "gen"
    run_script(
        SCRIPT,
        "--sample_from",
        out,
        "--validation_prompts",
        "a red square",
        "a blue circle",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "2",
        "--output_dir",
        gen,
    )
    assert (gen / "samples" / "export.png").is_file()


def test_precomputed_shards_class_and_text(tiny_vae, tiny_clip, tiny_mnist, tmp_path):
    shards = tmp_path / "shards"
    # A prefix and the mask given to the encoder: not what train_dit.py does online, so the export must say so.
    run_script(
        "prepare_data_multi_gpu.py",
        "--data_root",
        tiny_mnist,
        "--max_samples",
        "12",
        "--vae_name_or_path",
        tiny_vae,
        "--text_encoder_name_or_path",
        tiny_clip,
        "--tokenizer_max_length",
        "12",
        "--resolution",
        "32",
        "--shard_size",
        "5",
        "--text_prefix",
        "a photo: ",
        "--text_encoder_attention_mask",
        "on",
        "--output_dir",
        shards,
    )
    index = json.loads((shards / "index.json").read_text())
    assert "label" in index["tensors"] and index["vae"]["latent_size"] == 16
    for conditioning in ("class", "text"):
        out = tmp_path / conditioning
        proc = run_script(
            SCRIPT,
            "--precomputed_data_dir",
            shards,
            "--conditioning",
            conditioning,
            *FAST,
            "--model",
            "DiT-S/2",
            "--max_train_steps",
            "2",
            "--output_dir",
            out,
        )
        assert "12 examples" in proc.stdout and "input [4, 16, 16] (latents)" in proc.stdout
        assert all(math.isfinite(r["loss"]) for r in metrics(out))
        assert (out / "samples" / "step-2.png").is_file()

    # The text export names the shards' encoder and encodes prompts as the shards were encoded (not the flag's
    # defaults); the VAE is recorded as from_pretrained loads it.
    export = json.loads((tmp_path / "text" / "export_config.json").read_text())
    assert export["vae"] == {"name_or_path": str(tiny_vae), "subfolder": None}
    assert export["text"] == {
        "text_encoder": str(tiny_clip),
        "tokenizer": str(tiny_clip),
        "prefix": "a photo: ",
        "use_attention_mask": True,
        "tokenizer_max_length": 12,
    }
    td = train_dit()
    tokenizer, encoder = td.load_text_encoder(export["text"]["text_encoder"], export["text"]["tokenizer"])
    states, mask = td.encode_prompts(tokenizer, encoder, [""], export["text"], "cpu")
    empty = load_file(shards / "empty_prompt.safetensors")
    assert torch.equal(mask, empty["text_encoder.attention_mask"])
    torch.testing.assert_close(states, empty["text_encoder.hidden_states"].float(), atol=1e-2, rtol=1e-2)
    gen = tmp_path / "gen"
    run_script(
        SCRIPT,
        "--sample_from",
        tmp_path / "text",
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "2",
        "--output_dir",
        gen,
    )
    assert (gen / "samples" / "export.png").is_file()


def test_two_processes(broken_folder, tmp_path):
    """Two processes over gloo (the stop request is agreed every step). Half the images are unreadable and batches
    hold one image, so a process's whole batch is unreadable: it must still run the step with the other process
    (a stand-in image), and the count is summed over the processes. Then the 2-process checkpoint resumes on 1."""
    out = tmp_path / "run"
    args = [
        "--train_data_dir",
        broken_folder,
        "--vae_name_or_path",
        "none",
        "--resolution",
        "32",
        *FAST,
        "--train_batch_size",
        "1",
        "--objective",
        "flow",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "4",
        "--validation_steps",
        "100",
        "--max_train_steps",
        "2",
    ]
    run_script(SCRIPT, *args, "--checkpointing_steps", "1", "--output_dir", out, launcher="accelerate", timeout=300)
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_processes"] == 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["samples_per_s"] > 0 and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoint-2" / "train_rng_1.safetensors").is_file()
    assert rows[-1]["skipped_images"] == 2  # 4 images, 2 steps x 2 processes x 1: each drawn once
    assert json.loads((out / "train_summary.json").read_text())["skipped_images"] == 2

    # Resumed on 1 process: same step, learning rate (in optimizer steps) and data position (in batches of 1).
    one = tmp_path / "one"
    shutil.copytree(out / "checkpoint-1", one / "checkpoint-1")
    proc = run_script(SCRIPT, *args, "--output_dir", one, "--resume_from_checkpoint", "latest")
    assert "written by 2 processes, resumed on 1" in proc.stdout
    assert [r["step"] for r in metrics(one)] == [2]
    assert metrics(one)[0]["lr"] == rows[1]["lr"] == pytest.approx(0.5e-4)
    state = json.loads((one / "checkpoint-2" / "training_state.json").read_text())
    assert (state["num_processes"], state["epoch"], state["epoch_batches"]) == (1, 0, 3)  # 2 batches, then 1


def test_resume_is_exact_and_total_limit_prunes(tiny_mnist, tmp_path):
    # 24 examples in batches of 4: 6 steps per epoch, so step 2 is mid-epoch. Flow, flips and guidance dropout
    # all draw random numbers: the resumed run must restore the data position and every generator.
    common = [
        *PIXEL_MNIST,
        "--data_root",
        tiny_mnist,
        *FAST,
        "--objective",
        "flow",
        "--random_flip",
        "--max_samples",
        "24",
        "--validation_steps",
        "100",
        "--cond_dropout_prob",
        "0.3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(SCRIPT, *common, "--max_train_steps", "4", "--output_dir", straight)
    run_script(
        SCRIPT,
        *common,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
        "--output_dir",
        resumed,
    )
    proc = run_script(
        SCRIPT,
        *common,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "100",
        "--checkpoints_total_limit",
        "2",
        "--resume_from_checkpoint",
        "latest",
        "--output_dir",
        resumed,
    )
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same_weights(straight / "checkpoint-4", resumed / "checkpoint-4")
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_two_data_sources_are_one_line_exit_2_before_any_work(tmp_path, capsys):
    """The data source is one flag of three: none given (and no MNIST default asked for) is refused by check_args."""
    td = train_dit()
    args = [*FAST, "--vae_name_or_path", "none", "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as stopped:
        td.check_args(td.parse_args(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and "give exactly one of" in lines[0]


def test_label_dropout_happens_once_per_example_not_per_block():
    """diffusers' LabelEmbedding drops labels by itself in train mode, independently in each DiT block and from the
    global RNG; train_dit.py switches that off and drops whole examples to the null class in training_step."""
    td = train_dit()
    args = td.parse_args([*TINY, "--dataset_name", "mnist", "--weight_init", "adaln_zero"])
    model = td.build_transformer(args, 1, 32, 10, None).train()
    assert (
        model(torch.randn(2, 1, 32, 32), timestep=torch.tensor([1, 999]), class_labels=torch.tensor([0, 1]))
        .sample.abs()
        .max()
        == 0
    )  # adaLN-Zero: DiT's init, output 0
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
    dropped = td.drop_condition({"class_labels": labels}, null, drop)["class_labels"]
    assert dropped.tolist() == [10 if d else 3 for d in drop.tolist()]


def test_bf16_from_the_flag_or_from_accelerate(tiny_mnist, tiny_vae, class_folder, tmp_path):
    """bf16 autocast runs on CPU; the precision accelerate resolves (flag, or the launcher's environment when the
    flag is left out) is the one recorded, and the export is fp32, its VAE the one loaded (not the bf16 copy that
    encoded the training images)."""
    flag, env = tmp_path / "flag", tmp_path / "env"
    fast = [*FAST, "--max_train_steps", "2", "--validation_steps", "100", "--validation_guidance_scales", "1"]
    latent = ["--train_data_dir", class_folder, "--vae_name_or_path", tiny_vae, "--resolution", "32"]
    run_script(SCRIPT, *latent, *fast, "--mixed_precision", "bf16", "--output_dir", flag)
    # What `accelerate launch --mixed_precision bf16` (or an accelerate config set to bf16) hands the script.
    pixels = [*PIXEL_MNIST, "--data_root", tiny_mnist]
    run_script(SCRIPT, *pixels, *fast, "--output_dir", env, env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    for out in (flag, env):
        assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "bf16"
        assert all(math.isfinite(r["loss"]) for r in metrics(out))
        weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    exported, loaded = (load_file(f / "diffusion_pytorch_model.safetensors") for f in (flag / "vae", tiny_vae))
    assert exported.keys() == loaded.keys() and all(torch.equal(exported[k], loaded[k]) for k in loaded)


def test_unreadable_images_never_leave_a_batch_empty():
    """A batch whose every image is unreadable still has its size (stand-ins: the next readable examples) and counts
    them, so no process skips a step alone."""
    import io

    from datasets import Dataset
    from datasets import Image as ImageFeature

    td = train_dit()
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    good, bad = {"bytes": buffer.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}
    table = Dataset.from_dict({"image": [bad, bad, good, bad], "label": [0, 1, 2, 3]})
    table = table.cast_column("image", ImageFeature(decode=False))
    args = td.parse_args(["--train_data_dir", ".", "--resolution", "32"])
    dataset = td.HFImageDataset(table, args, 3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=td.collate)
    first, second = list(loader)
    assert first["pixels"].shape == (2, 3, 32, 32) and first["label"].tolist() == [2, 2] and first["skipped"] == 2
    assert second["label"].tolist() == [2, 2] and second["skipped"] == 1  # example 3 wraps around to example 2
    # The resize uses --image_interpolation_mode (default lanczos).
    resize = dataset.transform.transforms[0]
    assert resize.interpolation == torchvision.transforms.InterpolationMode.LANCZOS
    args = td.parse_args(["--train_data_dir", ".", "--resolution", "32", "--image_interpolation_mode", "bicubic"])
    resize = td.HFImageDataset(table, args, 3).transform.transforms[0]
    assert resize.interpolation == torchvision.transforms.InterpolationMode.BICUBIC


def test_precomputed_text_convention_is_the_shards_or_refused(tiny_vae, tmp_path, capsys):
    """Text states from shards are used with the encoder, tokenizer, prefix, length and mask setting they were
    encoded with (index.json); flags that contradict them and shards without the padding mask are refused."""
    td = train_dit()
    entry = {
        "key": "text_encoder",
        "name_or_path": "org/sd/text_encoder",
        "tokenizer": "org/sd/tokenizer",
        "max_length": 12,
        "prefix": "query: ",
        "use_attention_mask": False,
    }
    tensors = {"text_encoder.hidden_states": {"shape": [12, 32]}, "text_encoder.attention_mask": {"shape": [12]}}
    index = {"text_encoders": [entry], "tensors": tensors}
    common = ["--precomputed_data_dir", str(tmp_path), "--conditioning", "text"]
    assert td.text_convention(td.parse_args(common), index) == {
        "text_encoder": "org/sd/text_encoder",
        "tokenizer": "org/sd/tokenizer",
        "prefix": "query: ",
        "use_attention_mask": False,
        "tokenizer_max_length": 12,
    }
    assert td.split_subfolder("org/sd/text_encoder") == ("org/sd", "text_encoder")
    refused = {
        "--text_encoder_name_or_path other": (common + ["--text_encoder_name_or_path", "other"], index),
        "--tokenizer_max_length 77": (common + ["--tokenizer_max_length", "77"], index),
        "--precomputed_data_dir": (
            common,
            {"text_encoders": [entry], "tensors": {"text_encoder.hidden_states": {"shape": [12, 32]}}},
        ),
    }
    for expected, (argv, bad_index) in refused.items():
        with pytest.raises(SystemExit) as stopped:
            td.text_convention(td.parse_args(argv), bad_index)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    # index.json's VAE: name_or_path + subfolder, as from_pretrained loads it.
    shutil.copytree(tiny_vae, tmp_path / "pipeline" / "autoencoder")
    vae = td.load_vae(str(tmp_path / "pipeline"), "autoencoder")
    assert vae.loaded_from == {"name_or_path": str(tmp_path / "pipeline"), "subfolder": "autoencoder"}


def export_fixture(td, tiny_vae, num_classes, shift_factor=0.0):
    from diffusers import AutoencoderKL

    args = td.parse_args([*TINY, "--model", "DiT-S/2", "--dataset_name", "x"])
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    if shift_factor:
        shifted = AutoencoderKL.from_config({**vae.config, "shift_factor": shift_factor})
        shifted.load_state_dict(vae.state_dict())
        vae = shifted
    model = td.build_transformer(args, 4, 16, num_classes, None)
    sampler = td.build_sampler(args, td.build_noise_scheduler(args), pixel_space=False)
    meta = {
        "conditioning": "class",
        "num_classes": num_classes,
        "label_names": None,
        "vae_scale": {"scaling_factor": vae.config.scaling_factor, "shift_factor": shift_factor},
    }
    return args, model, sampler, vae, meta


def card_and_grid(tmp_path):
    """A model card and a sample grid for export_model."""
    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(grid)
    return "---\nlibrary_name: diffusers\n---\n\n# card\n", grid


def test_dit_pipeline_export_unnamed_classes_and_1000_plus(tiny_vae, tmp_path):
    """Classes without names export as DiTPipeline (names "0", "1", ...); with more than 1000 classes DiTPipeline's
    null class 1000 would be a real class, so the plain layout is written and export_config.json says why."""
    from diffusers import DiTPipeline

    td = train_dit()
    small = tmp_path / "small"
    args, model, sampler, vae, meta = export_fixture(td, tiny_vae, 3)
    td.export_model(model, sampler, vae, args, meta, small, *card_and_grid(tmp_path))
    assert json.loads((small / "export_config.json").read_text())["diffusers_pipeline"] == "DiTPipeline"
    pipe = DiTPipeline.from_pretrained(small, id2label={0: "0", 1: "1", 2: "2"})
    assert pipe.transformer.config.num_embeds_ada_norm == 1000 and pipe.get_label_ids(["2"]) == [2]

    big = tmp_path / "big"
    args, model, sampler, vae, meta = export_fixture(td, tiny_vae, 1001)
    td.export_model(model, sampler, vae, args, meta, big, *card_and_grid(tmp_path))
    export = json.loads((big / "export_config.json").read_text())
    assert not (big / "model_index.json").exists() and export["diffusers_pipeline"] is None
    assert "1000" in export["why_no_pipeline"]
    assert json.loads((big / "transformer" / "config.json").read_text())["num_embeds_ada_norm"] == 1001
    assert (big / "vae" / "config.json").is_file() and (big / "scheduler" / "scheduler_config.json").is_file()


def test_vae_with_shift_factor_exports_plain_layout_and_decodes_with_the_shift(tiny_vae, tmp_path):
    """DiTPipeline decodes z / scaling_factor without adding the VAE's shift_factor back: such a VAE gets the plain
    layout, documented in export_config.json; the script's own decoding (--sample_from) adds it back."""
    td = train_dit()
    out = tmp_path / "export"
    args, model, sampler, vae, meta = export_fixture(td, tiny_vae, 3, shift_factor=0.5)
    td.export_model(model, sampler, vae, args, meta, out, *card_and_grid(tmp_path))
    export = json.loads((out / "export_config.json").read_text())
    assert not (out / "model_index.json").exists() and "shift_factor" in export["why_no_pipeline"]
    assert "- shift_factor) * scaling_factor" in export["latents"] and export["vae_scale"]["shift_factor"] == 0.5
    loaded = td.load_vae(str(out), "vae", flag="--sample_from")
    assert loaded.config.shift_factor == 0.5
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.decode(z / loaded.config.scaling_factor + 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(td.decode(z, loaded, export["vae_scale"]), expected)


def test_damaged_checkpoint_falls_back_and_the_folder_is_one_runs(tiny_mnist, tmp_path, capsys):
    """`latest` skips a damaged checkpoint (one line) for the newest intact one; a damaged explicit path, a locked
    folder and a new run into another run's checkpoints are one-line errors that change nothing."""
    out = tmp_path / "run"
    args = [
        *PIXEL_MNIST,
        "--data_root",
        tiny_mnist,
        *FAST,
        "--max_samples",
        "8",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
        "--validation_guidance_scales",
        "1",
        "--output_dir",
        out,
    ]
    run_script(SCRIPT, *args, "--max_train_steps", "3")
    assert not (out / "run.lock").exists()  # released at the end
    check_damaged_checkpoint_and_claims(SCRIPT, train_dit(), args, out, capsys, metrics)


def test_disk_full_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: one line, exit 1, no half folder, the previous checkpoint intact and the
    one `latest` picks. The model is compiled in place as --torch_compile does: the EMA keeps the plain names."""
    import errno

    from accelerate import Accelerator
    from diffusers import DiTTransformer2DModel
    from diffusers.training_utils import EMAModel

    td = train_dit()
    out = tmp_path / "run"
    args = td.parse_args([*TINY, *PIXEL_MNIST, "--output_dir", str(out)])
    accelerator = Accelerator(cpu=True)
    model = td.build_transformer(args, 1, 32, 10, None)
    names = [name for name, _ in model.named_parameters()]
    ema = EMAModel(model.parameters(), foreach=True)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model.compile()
    rng = torch.Generator().manual_seed(0)
    out.mkdir()
    sampler = td.build_sampler(args, td.build_noise_scheduler(args), pixel_space=True)
    sampling = functools.partial(td.write_sampling_files, sampler, {"conditioning": "class", "vae": None})
    td.save_checkpoint(accelerator, args, model, ema, rng, 1, (0, 1), sampling)
    weights = load_file(out / "checkpoint-1" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert set(names) <= weights.keys() and not any("_orig_mod" in key for key in weights)
    DiTTransformer2DModel.from_pretrained(out / "checkpoint-1", subfolder="transformer_ema")

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(td, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        td.save_checkpoint(accelerator, args, model, ema, rng, 2, (0, 2), sampling)
    assert stopped.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert td.list_checkpoints(out) == [out / "checkpoint-1"]
    assert td.manifest_problem(out / "checkpoint-1") is None
