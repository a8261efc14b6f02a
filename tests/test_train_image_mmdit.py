"""Tests of train_image_discrete.py and train_image_continuous.py: the seed commands with tiny sizes, both text
encoder options, shards, exact resume, two processes, bad input; and the MDLM objective and samplers in-process."""

import importlib.util
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO,
    assert_same_weights,
    check_damaged_checkpoint_and_claims,
    one_error,
    resume_in_new_folder,
    run_script,
)
from safetensors.torch import load_file, save_file

DISCRETE, CONTINUOUS = "train_image_discrete.py", "train_image_continuous.py"
TINY = [
    "--dim-image",
    "32",
    "--depth",
    "1",
    "--num-heads",
    "2",
    "--num-inference-steps",
    "2",
    "--validation-guidance-scales",
    "1,2",
    "--logging-steps",
    "1",
    "--tokenizer-max-length",
    "8",
    "--num-validation-images",
    "3",
    "--device",
    "cpu",
]


def text_flags(script, tiny_bert, frozen=False):
    if script == DISCRETE:
        return ["--tokenizer", tiny_bert] + (
            ["--text-encoder-name-or-path", tiny_bert, "--dim-text", "32"] if frozen else ["--dim-text", "32"]
        )
    return ["--text-encoder-name-or-path", tiny_bert, "--dim-text", "32"]


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def check_tensorboard_and_model_card(out, steps, kind_tag):
    """TensorBoard got the losses and the final validation grid; the export says what it is (Hub model card)."""
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    for key in ("loss", "image_loss", "text_loss"):
        assert [e.step for e in events.Scalars(key)] == steps
    assert [e.step for e in events.Images("validation")] == steps[-1:] and events.Images("validation")[0].width > 100
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license and card.data.datasets == ["ylecun/mnist"]
    assert {"diffusers", "mmdit", "text-to-image", "image-to-text", kind_tag} <= set(card.data.tags)
    assert f"--max_train_steps {steps[-1]}" in card.text and "(samples.png)" in card.text
    assert f"final loss {read_metrics(out)[-1]['loss']:.4f}" in card.text and (out / "samples.png").is_file()


def read_samples(folder):
    """What --prompts_file, --images_file and --num_joint_samples wrote into folder."""
    with np.load(folder / "prompt_samples.npz") as t2i, np.load(folder / "joint_samples.npz") as joint:
        return {
            "images": t2i["images"],
            "prompts": t2i["prompts"].tolist(),
            "captions": [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()],
            "joint_images": joint["images"],
            "joint_captions": joint["captions"].tolist(),
        }


def run_in_process(module, argv):
    """main() of a loaded script in this process, on one thread as the scripts' subprocesses run (the suite runs
    two workers on two cores); accelerate's per-process state is reset afterwards."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(module.parse_args([str(a) for a in argv]))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def load_module(script):
    spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_seed_command_whole_pipeline_then_sample_from(script, tiny_mnist, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    # The seed command with tiny sizes (hyphen spellings and seed aliases), then generation from the export.
    run_script(
        script,
        "--data-root",
        tiny_mnist,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--max-samples",
        "10",
        *text_flags(script, tiny_bert),
        *TINY,
        "--output-dir",
        out,
        "--checkpointing-steps",
        "3",
    )
    # 10 samples, batch 4, drop_last: 2 steps per epoch, 2 epochs.
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["image_loss"]) and math.isfinite(r["text_loss"]) for r in rows)
    assert sum(r["text_loss"] for r in rows) > 0 and sum(r["image_loss"] for r in rows) > 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "samples" / "step-4.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    captions = (out / "samples" / "step-4.txt").read_text().splitlines()
    assert "MNIST test images" in captions[0] and sum("true: a handwritten digit" in c for c in captions) == 3
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["num_train_epochs"] == 2 and config["args"]["max_samples"] == 10
    export = json.loads((out / "export_config.json").read_text())
    weights = export_weights(out)
    assert export["script"] == script and all(torch.isfinite(w).all() for w in weights.values())
    if script == DISCRETE:  # a 4-channel conv stem by default, rebuilt by --sample-from
        assert export["mmdit"]["stem_channels"] == 4
        assert weights["mmdit.patch_encoder.stem.0.weight"].shape == (4, 1, 3, 3)
    if script == CONTINUOUS:  # the standardisation statistics travel with the weights
        assert weights["text_mean"].shape == (32,) and (weights["text_std"] > 0).all()
        assert not torch.equal(weights["text_std"], torch.ones(32))
        assert export["text_shift"] == 40.0  # the default, read back by --sample-only
        model_config = json.loads((out / "mmdit" / "config.json").read_text())
        assert model_config["stem_channels"] == 32  # the default conv stem, rebuilt by --sample-only
        assert weights["mmdit.patch_encoder.stem.0.weight"].shape == (32, 1, 3, 3)
        # The default latent width is 64, capped at the encoder's hidden size (32 here): all of it, unrotated.
        assert model_config["dim_text"] == 32 and torch.equal(weights["text_basis"], torch.eye(32))

    # Generation from the export: prompts (a blank line skipped), images to caption, joint pairs; 2 per batch.
    prompts = ["a handwritten digit seven", "a handwritten digit two", "digit 0 in red"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n  {prompts[1]}\n{prompts[2]}\n", encoding="utf-8")
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images, labels=np.arange(5))  # other arrays are ignored
    sample_args = [
        "--sample-from",
        out,
        "--data-root",
        tiny_mnist,
        "--prompts-file",
        tmp_path / "prompts.txt",
        "--images-file",
        tmp_path / "images.npz",
        "--num-joint-samples",
        "3",
        "--eval-batch-size",
        "2",
        "--num-inference-steps",
        "2",
        "--validation-guidance-scales",
        "1",
        "--device",
        "cpu",
    ]
    again = tmp_path / "from-export"
    run_script(script, *sample_args, "--output-dir", again)
    assert (again / "samples" / "step-export.png").is_file()
    first = read_samples(again)
    assert first["images"].shape == (3, 28, 28) and first["images"].dtype == np.uint8
    assert first["prompts"] == prompts
    assert [r["index"] for r in first["captions"]] == list(range(5))
    assert all(isinstance(r["caption"], str) for r in first["captions"])
    assert first["joint_images"].shape == (3, 28, 28) and first["joint_images"].dtype == np.uint8
    assert len(first["joint_captions"]) == 3 and all(isinstance(c, str) for c in first["joint_captions"])

    # The same --seed gives the same files (here in-process); another seed other images.
    module = load_module(script)
    for seed, folder in ((0, tmp_path / "same-seed"), (1, tmp_path / "other-seed")):
        run_in_process(module, [*sample_args, "--output-dir", folder, "--seed", str(seed)])
    same, other = read_samples(tmp_path / "same-seed"), read_samples(tmp_path / "other-seed")
    assert same["captions"] == first["captions"] and same["joint_captions"] == first["joint_captions"]
    for key in ("images", "joint_images"):
        assert np.array_equal(same[key], first[key]) and not np.array_equal(other[key], first[key])

    # Bad sampling inputs: one line each, exit code 2, before any model loads; nothing written.
    (tmp_path / "blank.txt").write_text("\n  \n")
    np.savez(tmp_path / "no-images.npz", pixels=images)
    np.savez(tmp_path / "wrong-size.npz", images=np.zeros((2, 32, 32), np.uint8))
    np.savez(tmp_path / "wrong-dtype.npz", images=images.astype(np.float32))
    bad = tmp_path / "bad"
    capsys.readouterr()
    sampling = ["--sample_from", out, "--output_dir", bad, "--device", "cpu"]
    for flags, words in (
        ([*sampling, "--prompts_file", tmp_path / "nowhere.txt"], ["--prompts_file", "no such file"]),
        ([*sampling, "--prompts_file", tmp_path / "blank.txt"], ["--prompts_file", "no prompt", "one prompt per line"]),
        ([*sampling, "--images_file", tmp_path / "no-images.npz"], ["--images_file", "no `images`", "numpy.savez"]),
        ([*sampling, "--images_file", tmp_path / "wrong-size.npz"], ["--images_file", "[2, 32, 32]", "[N, 28, 28]"]),
        ([*sampling, "--images_file", tmp_path / "wrong-dtype.npz"], ["--images_file", "float32", "uint8"]),
        ([*sampling, "--num_joint_samples", "-1"], ["--num_joint_samples -1"]),
        (["--prompts_file", tmp_path / "prompts.txt", "--output_dir", bad], ["--prompts_file", "--sample_from"]),
    ):
        with pytest.raises(SystemExit) as stopped:
            run_in_process(module, flags)
        assert stopped.value.code == 2
        one_error(capsys.readouterr().err, *words)
    assert not bad.exists()


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_imagefolder_frozen_encoder_counts_missing_images(script, tiny_imagefolder, tiny_bert, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "missing.png", "text": "a red square"}) + "\n")
    out = tmp_path / "run"
    proc = run_script(
        script,
        "--data_root",
        data,
        *text_flags(script, tiny_bert, frozen=True),
        *TINY,
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--output_dir",
        out,
    )
    assert "skipped 1 of 13 images" in proc.stderr  # counted, never a blank image
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    export = json.loads((out / "export_config.json").read_text())
    assert export["text_encoder"] == str(tiny_bert) and export["shape"] == [3, 32, 32]
    if script == DISCRETE:  # the frozen encoder is not part of the trained weights
        assert not any(k.startswith("text_input") or "bert" in k for k in export_weights(out))


def write_shards(root, tiny_vae, n=10):
    """Shards as docs/prepare_data.md describes them (what prepare_data_multi_gpu.py writes)."""
    root.mkdir()
    rng = torch.Generator().manual_seed(0)
    captions = [f"a {'red' if i % 2 else 'blue'} square" for i in range(n)]
    shards = []
    for s, start in enumerate(range(0, n, 6)):
        rows = list(range(start, min(start + 6, n)))
        tensors = {
            "index": torch.tensor(rows),
            "latent_mean": torch.randn(len(rows), 4, 16, 16, generator=rng),
            "latent_std": torch.full((len(rows), 4, 16, 16), 0.1),
        }
        save_file(
            tensors, root / f"shard-{s:05d}.safetensors", metadata={"captions": json.dumps([captions[i] for i in rows])}
        )
        shards.append({"file": f"shard-{s:05d}.safetensors", "num_examples": len(rows)})
    index = {
        "format": "precomputed-diffusion-shards",
        "version": 1,
        "num_examples": n,
        "num_skipped": 0,
        "shard_size": 6,
        "shards": shards,
        "source": {"kind": "imagefolder", "path": "x", "split": "train"},
        "resolution": 32,
        "center_crop": False,
        "random_flip": False,
        "vae": {
            "name_or_path": str(tiny_vae),
            "scaling_factor": 0.18215,
            "shift_factor": 0.0,
            "latent_channels": 4,
            "latent_size": 16,
            "dtype": "float32",
        },
        "text_encoders": [],
        "label_names": None,
        "tensors": {"latent_mean": {"shape": [4, 16, 16], "dtype": "float32"}},
    }
    (root / "index.json").write_text(json.dumps(index))


def test_discrete_reads_precomputed_shards(tiny_vae, tiny_bert, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, tiny_vae)
    out = tmp_path / "run"
    proc = run_script(
        DISCRETE,
        "--data-root",
        shards,
        *text_flags(DISCRETE, tiny_bert),
        *TINY,
        "--max-train-steps",
        "2",
        "--batch-size",
        "4",
        "--output-dir",
        out,
    )
    assert "10 examples (precomputed, latents (4, 16, 16))" in proc.stdout
    assert (out / "samples" / "step-2.png").is_file()  # decoded through the shards' VAE
    export = json.loads((out / "export_config.json").read_text())
    assert export["vae"] == str(tiny_vae) and export["kind"] == "latents"

    # A latent model samples and captions images of the size its VAE decodes to: RGB, or gray ones broadcast.
    (tmp_path / "prompts.txt").write_text("a red square\na blue square\n")
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    np.savez(tmp_path / "gray.npz", images=rgb[..., 0])
    for name in ("rgb", "gray"):
        run_script(
            DISCRETE,
            "--sample_from",
            out,
            "--output_dir",
            tmp_path / name,
            "--prompts_file",
            tmp_path / "prompts.txt",
            "--images_file",
            tmp_path / f"{name}.npz",
            "--num_joint_samples",
            "2",
            "--num_inference_steps",
            "2",
            "--validation_guidance_scales",
            "1",
            "--device",
            "cpu",
        )
        samples = read_samples(tmp_path / name)
        assert samples["images"].shape == (2, 32, 32, 3) and samples["prompts"] == ["a red square", "a blue square"]
        assert samples["joint_images"].shape == (2, 32, 32, 3) and len(samples["joint_captions"]) == 2
        assert [r["index"] for r in samples["captions"]] == [0, 1, 2]


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_resume_matches_uninterrupted_run(script, tiny_mnist, tiny_bert, tmp_path):
    straight = tmp_path / "straight"
    latent = ["--text-latent-dim", "16"] if script == CONTINUOUS else []  # a projected caption, 32 -> 16
    args = [
        "--data-root",
        tiny_mnist,
        *text_flags(script, tiny_bert),
        *latent,
        *TINY,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--lr_warmup_steps",
        "1",
        "--ema_power",
        "1.0",
        "--train_batch_size",
        "8",
        "--validation_steps",
        "100",
        "--output_dir",
        straight,
    ]
    run_script(script, *args)
    # Resume in a fresh folder from the step-2 checkpoint (mid-epoch: 64 samples / batch 8 = 8 steps per epoch).
    resumed = tmp_path / "resumed"
    proc = resume_in_new_folder(script, args, straight, resumed)
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    if script == CONTINUOUS:  # the share of the caption variance the projection keeps is printed
        assert re.search(r"diffused in 16 dimensions \(\d+\.\d\d% of their variance\)", proc.stdout)
    assert [r["step"] for r in read_metrics(resumed)] == [3, 4]
    assert_same_weights(straight / "checkpoint-4", resumed / "checkpoint-4")
    w2 = load_file(straight / "checkpoint-2" / "model.safetensors")
    w4 = load_file(straight / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)  # training moved the weights: the comparison is sharp
    if script == CONTINUOUS:
        assert w4["text_basis"].shape == (32, 16) and torch.equal(w2["text_basis"], w4["text_basis"])


@pytest.mark.parametrize("script", [DISCRETE])  # train_image_continuous.py: test_continuous_two_processes_...
def test_two_processes(script, tiny_mnist, tiny_bert, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data_root",
        tiny_mnist,
        *text_flags(script, tiny_bert),
        *TINY[:-2],
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
    ]
    run_script(
        script, *args, "--device", "auto", "--checkpointing_steps", "1", "--output_dir", out, launcher="accelerate"
    )
    assert json.loads((out / "run_config.json").read_text())["num_processes"] == 2
    for rank in (0, 1):
        assert (out / "checkpoint-2" / f"train_rng_{rank}.safetensors").is_file()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and export_weights(out)

    # The 2-process run resumed on 1 process: same step, learning rate and data position (in batches of 4).
    one = tmp_path / "one"
    shutil.copytree(out / "checkpoint-1", one / "checkpoint-1")
    proc = run_script(script, *args, "--device", "cpu", "--output_dir", one, "--resume_from_checkpoint", "latest")
    assert "written by 2 processes, resumed on 1" in proc.stdout
    assert [r["step"] for r in read_metrics(one)] == [2]
    assert read_metrics(one)[0]["lr"] == rows[1]["lr"]
    state = json.loads((one / "checkpoint-2" / "training_state.json").read_text())
    assert (state["num_processes"], state["epoch"], state["epoch_batches"]) == (1, 0, 3)  # 2 batches, then 1


# ---------------------------------------------------------------------------------------------------------------
# In-process: the MDLM objective and samplers of train_image_discrete.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def discrete():
    return load_module(DISCRETE)


@pytest.fixture(scope="module")
def vocabulary(discrete, tiny_bert):
    tokenizer = discrete.load_tokenizer(str(tiny_bert))
    ids = discrete.tokenize(tokenizer, ["a handwritten digit seven", "a digit one"], 8)
    return tokenizer, discrete.Vocabulary.from_captions(tokenizer, ids), ids


def test_vocabulary_mask_is_not_pad_and_never_predicted(discrete, vocabulary):
    tokenizer, vocab, ids = vocabulary
    assert vocab.mask_id != vocab.pad_id and vocab.mask_id == vocab.size
    assert vocab.ids[vocab.mask_id] == tokenizer.mask_token_id and vocab.ids[vocab.pad_id] == tokenizer.pad_token_id
    compact = vocab.compact(ids)
    assert (compact < vocab.size).all() and (compact == vocab.pad_id).any()
    assert vocab.decode(tokenizer, compact) == ["a handwritten digit seven", "a digit one"]
    # The model's caption head has one logit per real token: the mask cannot be predicted.
    model = discrete.TextImageModel(
        1, 8, 4, 16, 16, vocab.size, 1, 2, num_text_tokens=vocab.size + 1, max_text_length=8
    )
    _, logits = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.full((2, 8), vocab.mask_id), torch.ones(2))
    assert logits.shape == (2, 8, vocab.size)


class RecordingModel(torch.nn.Module):
    """Stands in for the MMDiT: uniform logits (cross-entropy log K per token), records the caption it read."""

    def __init__(self, num_tokens):
        super().__init__()
        self.mmdit = torch.nn.Module()
        self.mmdit.patch_size = 4
        self.num_tokens = num_tokens

    def forward(self, image, t_image, text, t_text, key_mask=None):
        self.seen = (text.clone(), t_text.clone(), key_mask)
        return torch.zeros_like(image), torch.zeros(*text.shape, self.num_tokens)


def test_mdlm_loss_masked_tokens_weighted_by_one_over_t(discrete, vocabulary):
    _, vocab, ids = vocabulary
    args = discrete.parse_args(
        ["--data_root", "x", "--image_clean_prob", "0", "--text_clean_prob", "0", "--cond_dropout_prob", "0"]
    )
    n = 64
    clean = vocab.compact(ids)[torch.arange(n) % 2]
    model = RecordingModel(vocab.size)
    generator = torch.Generator().manual_seed(0)
    _, text_loss = discrete.training_step(model, None, torch.randn(n, 1, 8, 8), clean, vocab, args, generator)
    noisy, t, key_mask = model.seen
    masked = noisy == vocab.mask_id
    assert key_mask is None  # nothing dropped: no key-padding mask at all
    # Unmasked tokens are the clean ones; masked ones are the mask id, pads included (EOS padding learns length).
    assert torch.equal(noisy[~masked], clean[~masked]) and masked[clean == vocab.pad_id].any()
    # Antithetic t: one uniform shifted by i/n, so the sorted t are evenly spaced.
    spacing = t.sort().values.diff()
    assert torch.allclose(spacing, torch.full_like(spacing, (1 - discrete.MIN_TEXT_T) / n), atol=1e-5)
    # Cross-entropy (log K per masked token), averaged over positions, weighted by -alpha'/(1 - alpha) = 1/t.
    expected = masked.sum(1) * math.log(vocab.size) / ids.shape[1] / t
    assert torch.allclose(text_loss, expected, rtol=1e-4)
    # Masking rate follows t.
    assert abs(masked.float().mean().item() - t.mean().item()) < 0.1


class OneHardTokenModel(RecordingModel):
    """Certain of every token but position 3 (MNIST's digit word), where its logits are uniform."""

    def __init__(self, clean, num_tokens):
        super().__init__(num_tokens)
        self.logits = 100.0 * F.one_hot(clean, num_tokens).float()
        self.logits[:, 3] = 0.0

    def forward(self, image, t_image, text, t_text, key_mask=None):
        return torch.zeros_like(image), self.logits


def test_mdlm_loss_is_an_unbiased_estimate_of_the_cross_entropy(discrete, vocabulary):
    """For one token, in units of its cross-entropy, the weighted loss has mean 1 and variance
    E[(1 - t) / t] = ln(1 / MIN_TEXT_T) - 1 ~ 5.9 (heavy-tailed: its sample variance scatters from 4.7 to 9.5)."""
    _, vocab, ids = vocabulary
    n = 20000
    clean = vocab.compact(ids)[torch.arange(n) % 2]
    model = OneHardTokenModel(clean, vocab.size)
    args = discrete.parse_args(
        ["--data_root", "x", "--image_clean_prob", "0", "--text_clean_prob", "0", "--cond_dropout_prob", "0"]
    )
    generator = torch.Generator().manual_seed(0)
    losses = [
        discrete.training_step(model, None, torch.zeros(n, 1, 8, 8), clean, vocab, args, generator)[1]
        for _ in range(10)
    ]
    per_token = torch.cat(losses) * ids.shape[1] / math.log(vocab.size)  # the hard token's loss / its CE
    assert abs(per_token.mean().item() - 1) < 0.03 and per_token.var().item() > 4.5


def test_dropped_modalities_are_removed_from_attention(discrete, vocabulary):
    _, vocab, ids = vocabulary
    args = discrete.parse_args(
        ["--data_root", "x", "--image_clean_prob", "0", "--text_clean_prob", "0", "--cond_dropout_prob", "0.45"]
    )
    model = RecordingModel(vocab.size)
    n = 64
    image_loss, text_loss = discrete.training_step(
        model,
        None,
        torch.randn(n, 1, 8, 8),
        vocab.compact(ids)[torch.arange(n) % 2],
        vocab,
        args,
        torch.Generator().manual_seed(1),
    )
    _, _, key_mask = model.seen
    image_kept, text_kept = key_mask[:, 0], key_mask[:, -1]
    assert not (~image_kept & ~text_kept).any() and (~image_kept).any() and (~text_kept).any()
    assert (image_loss[~image_kept] == 0).all() and (text_loss[~text_kept] == 0).all()


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_samplers_carry_over_unmasked_tokens(discrete, sampler):
    mask_id, n, length, steps = 9, 16, 8, 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((n, length), mask_id)
    history = [ids]
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        log_probs = torch.randn(n, length, mask_id, generator=generator).log_softmax(-1)
        ids = discrete.unmask_step(ids, log_probs, t, s, steps - i, sampler, mask_id, generator)
        history.append(ids)
    for before, after in zip(history[:-1], history[1:], strict=True):
        revealed = before != mask_id
        assert torch.equal(after[revealed], before[revealed])  # never changed once unmasked
    assert (ids != mask_id).all()  # s = 0 at the last step: everything revealed, no mask ever emitted


def test_discrete_joint_draws_the_caption_without_the_image_then_the_image_from_it(discrete, vocabulary):
    _, vocab, _ = vocabulary
    torch.manual_seed(0)
    config = dict(
        in_channels=1,
        image_size=8,
        patch_size=4,
        dim_image=16,
        dim_text=16,
        text_out_dim=vocab.size,
        depth=1,
        num_heads=2,
    )
    model = discrete.build_model(config, "learned", vocab.size + 1, 8).eval()
    calls, forward = [], model.forward

    def spy(image, t_image, text, t_text, key_mask=None):
        calls.append((t_image, text, t_text, key_mask))
        return forward(image, t_image, text, t_text, key_mask)

    model.forward = spy
    x, ids = discrete.sample_joint(model, None, 3, (1, 8, 8), vocab, 8, 2.0, 5, 4, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and (ids != vocab.mask_id).all()
    assert len(calls) == 4 + 5  # 4 unmasking steps, then 5 guided Euler steps
    for t_image, _, _, key_mask in calls[:4]:  # the caption: the image dropped, as in training
        assert (t_image == 1).all() and not key_mask[:, :4].any() and key_mask[:, 4:].all()
    for _, text, t_text, _ in calls[4:]:  # the image, guided [uncond; cond]: the caption dropped, then clean
        assert torch.equal(text[3:], ids) and (t_text[:3] == 1).all() and (t_text[3:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# In-process: train_image_continuous.py's text statistics and retrieval
# ---------------------------------------------------------------------------------------------------------------
def test_continuous_standardisation_and_retrieval():
    continuous = load_module(CONTINUOUS)
    table = torch.randn(5, 4, 6) * 3 + 2
    caption_ids = torch.tensor([0, 0, 0, 1, 2, 3, 4, 4])
    mean, std = continuous.text_statistics(table, caption_ids, "cpu")
    examples = (table[caption_ids] - mean) / std
    assert torch.allclose(examples.mean(dim=(0, 1)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(examples.var(dim=(0, 1), unbiased=False), torch.ones(6), atol=1e-4)
    captions = [f"caption {i}" for i in range(5)]
    assert continuous.nearest_captions(table + 0.01 * torch.randn(5, 4, 6), table, captions) == captions
    model = continuous.TextImageModel(
        1, 8, 4, dim_image=16, dim_text=6, text_out_dim=6, depth=1, num_heads=2, max_text_length=4, encoder_dim=6
    )
    model.text_mean, model.text_std = mean, std
    assert torch.allclose(model.unstandardise(model.standardise(table)), table, atol=1e-4)


def test_continuous_text_basis_keeps_what_tells_captions_apart():
    continuous = load_module(CONTINUOUS)
    generator = torch.Generator().manual_seed(0)
    # 6 captions x 3 tokens in 10 dimensions whose tokens span only 4 directions (plus a constant offset).
    directions = torch.linalg.qr(torch.randn(10, 4, generator=generator))[0]
    table = torch.randn(6, 3, 4, generator=generator) * torch.tensor([5.0, 3.0, 2.0, 1.0]) @ directions.T + 0.5
    caption_ids = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])
    mean, std = continuous.text_statistics(table, caption_ids, "cpu")
    standardised = (table - mean) / std
    basis, kept = continuous.text_basis(table, mean, std, caption_ids, 4, "cpu")
    assert basis.shape == (10, 4) and torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    assert kept == pytest.approx(1.0, abs=1e-6)  # the table has rank 4
    identity, share = continuous.text_basis(table, mean, std, caption_ids, 0, "cpu")
    assert torch.equal(identity, torch.eye(10)) and share == 1.0
    model = continuous.TextImageModel(
        1, 8, 4, dim_image=16, dim_text=4, text_out_dim=4, depth=1, num_heads=2, max_text_length=3, encoder_dim=10
    )
    model.text_mean, model.text_std, model.text_basis = mean, std, basis
    latent = model.standardise(table)  # [6, 3, 4]: the whole table lives in 4 directions, nothing is lost
    assert latent.shape == (6, 3, 4) and torch.allclose(model.unstandardise(latent), table, atol=1e-4)
    assert torch.allclose(
        torch.cdist(latent.flatten(1), latent.flatten(1)),
        torch.cdist(standardised.flatten(1), standardised.flatten(1)),
        atol=1e-3,
    )
    # Two directions keep the two of largest variance: more than any other pair of the four.
    examples = standardised[caption_ids].flatten(0, 1)  # every token of every example, as the basis weighs them
    top2, share = continuous.text_basis(table, mean, std, caption_ids, 2, "cpu")
    kept = (examples @ top2).pow(2).sum()
    assert kept > 0.5 * examples.pow(2).sum() and kept > (examples @ basis[:, 2:]).pow(2).sum()
    assert share == pytest.approx(float(kept / examples.pow(2).sum()), rel=1e-4)
    # Samplers clip in standardised units of the encoder's dimensions (then project back: no longer than that).
    clipped = model.clip_text(latent * 100, 5.0)
    assert clipped.shape == latent.shape and (clipped.norm(dim=-1) <= 5.0 * 10**0.5 + 1e-4).all()
    assert torch.equal(model.clip_text(latent, 1e4), latent @ basis.T @ basis)


def test_continuous_text_loss_is_averaged_over_the_encoder_dimensions():
    # A caption in a 4-d latent of a 16-d encoder: the summed squared error is divided by 16, not 4, so the text
    # loss weighs what it did in the full space whatever --text_latent_dim is. A model that predicts zeros
    # against epsilon targets has a per-example loss of sum(eps^2) / (L * 16), about 4 / 16.
    continuous = load_module(CONTINUOUS)
    args = continuous.parse_args(
        [
            "--prediction_type",
            "epsilon",
            "--image_clean_prob",
            "0",
            "--text_clean_prob",
            "0",
            "--cond_dropout_prob",
            "0",
        ]
    )
    scheduler = continuous.build_noise_scheduler(args)

    def zeros(image, t_image, text, t_text):
        return torch.zeros_like(image), torch.zeros_like(text)

    generator = torch.Generator().manual_seed(0)
    image_loss, text_loss = continuous.training_step(
        zeros, scheduler, scheduler, torch.zeros(512, 1, 8, 8), torch.zeros(512, 8, 4), 16, args, generator
    )
    assert text_loss.shape == (512,) and abs(float(text_loss.mean()) - 4 / 16) < 0.01
    assert abs(float(image_loss.mean()) - 1.0) < 0.05  # the image's MSE stays a per-element mean


def test_continuous_text_shift_divides_every_snr():
    # --text_shift s: the caption's schedule has the image's timesteps with SNR / s^2, in training and sampling.
    continuous = load_module(CONTINUOUS)
    image = continuous.build_noise_scheduler(continuous.parse_args([]))
    betas = continuous.text_betas(image.config, 5.0)
    text = continuous.DDPMScheduler.from_config(image.config, trained_betas=betas)
    sampler = continuous.build_sampler(text.config)

    def snr(abar):
        return abar.double() / (1 - abar.double())

    ratio = snr(image.alphas_cumprod) / snr(text.alphas_cumprod)
    assert torch.allclose(ratio, torch.full_like(ratio, 25.0), rtol=1e-3)
    assert torch.equal(sampler.alphas_cumprod, text.alphas_cumprod)
    assert continuous.text_betas(image.config, 1.0) is None


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_continuous_prediction_recovers_x0(prediction_type):
    # The sampler's x0 from an exact training target is the clean input, for both parameterisations.
    continuous = load_module(CONTINUOUS)
    args = continuous.parse_args(["--prediction_type", prediction_type])
    scheduler = continuous.build_noise_scheduler(args)
    x0, eps = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    t = torch.tensor([0, 250, 600, 900])
    target = continuous.training_target(scheduler, x0, eps, t)
    assert torch.equal(target, eps) == (prediction_type == "epsilon")
    recovered = continuous.x0_from_prediction(
        scheduler.add_noise(x0, eps, t), target, t, scheduler.alphas_cumprod, prediction_type, clip=1e4
    )
    assert torch.allclose(recovered, x0, atol=1e-4)


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_weight_init_adaln_zero_starts_at_zero_output_pytorch_does_not(script):
    module = load_module(script)
    image, t, text = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.randn(2, 3, 12)
    outputs = {}
    for adaln_zero in (True, False):
        torch.manual_seed(0)
        mmdit = module.MMDiT(
            1, 8, 4, dim_image=16, dim_text=12, text_out_dim=5, depth=2, num_heads=2, adaln_zero=adaln_zero
        )
        outputs[adaln_zero] = mmdit(image, t, text, t)
    assert all(out.abs().max() == 0 for out in outputs[True])  # DiT's: every block and output layer at zero
    assert all(out.abs().mean() > 1e-3 for out in outputs[False])


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_pooled_text_leaves_a_dropped_caption_unseen(script):
    # The pooled text vector conditions every block, so it must also ignore a caption the key mask removes:
    # otherwise the unconditional branch of guidance would still see the prompt.
    module = load_module(script)
    torch.manual_seed(0)
    mmdit = module.MMDiT(1, 8, 4, dim_image=16, dim_text=12, text_out_dim=5, depth=1, num_heads=2, pooled_text=True)
    with torch.no_grad():
        for p in mmdit.parameters():  # leave the zero init, or every output is zero
            p.normal_(0, 0.3)
    image, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    text_a, text_b = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    drop = torch.tensor([[True] * 4 + [False] * 3] * 2)
    out_a, _ = mmdit(image, t, text_a, t, drop)
    out_b, _ = mmdit(image, t, text_b, t, drop)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    keep = torch.ones(2, 7, dtype=torch.bool)
    assert not torch.allclose(mmdit(image, t, text_a, t, keep)[0], mmdit(image, t, text_b, t, keep)[0], atol=1e-3)


@pytest.mark.parametrize("script", [DISCRETE, CONTINUOUS])
def test_conv_stem_lets_a_patch_token_see_its_neighbours_edge(script):
    # Without the stem a 4x4 patch token depends on its own 16 pixels only; the 3x3 stem widens that by one pixel.
    module = load_module(script)
    torch.manual_seed(0)
    image = torch.randn(1, 1, 8, 8)
    nudged = image.clone()
    nudged[0, 0, 0, 4] += 1.0  # the left edge pixel of the top-right patch, next to the top-left patch
    for stem_channels, sees in ((0, False), (6, True)):
        encoder = module.ImagePatchEncoder(1, 8, 4, 16, stem_channels)
        tokens, moved = encoder(image), encoder(nudged)
        assert tokens.shape == (1, 4, 16)
        assert not torch.equal(tokens[0, 1], moved[0, 1])  # the nudged patch itself
        assert (not torch.equal(tokens[0, 0], moved[0, 0])) == sees  # its left neighbour
        assert torch.equal(tokens[0, 2:], moved[0, 2:])  # the bottom row is out of reach either way


def test_continuous_two_processes_then_resume_on_one(tiny_mnist, tiny_bert, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data_root",
        tiny_mnist,
        *text_flags(CONTINUOUS, tiny_bert),
        *TINY[:-2],
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--validation_steps",
        "100",
    ]
    run_script(
        CONTINUOUS, *args, "--device", "auto", "--checkpointing_steps", "1", "--output_dir", out, launcher="accelerate"
    )
    assert json.loads((out / "run_config.json").read_text())["num_processes"] == 2
    for rank in (0, 1):
        assert (out / "checkpoint-2" / f"train_rng_{rank}.safetensors").is_file()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and export_weights(out)

    # The 2-process run resumed on 1 process: same step, learning rate and data position (in batches of 4).
    one = tmp_path / "one"
    shutil.copytree(out / "checkpoint-1", one / "checkpoint-1")
    # Under bf16 from what `accelerate launch --mixed_precision bf16` (or an accelerate config) hands the script.
    resume = [*args, "--device", "cpu", "--output_dir", one, "--resume_from_checkpoint", "latest"]
    proc = run_script(CONTINUOUS, *resume, env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "written by 2 processes, resumed on 1" in proc.stdout
    assert [r["step"] for r in read_metrics(one)] == [2]
    assert read_metrics(one)[0]["lr"] == rows[1]["lr"]
    state = json.loads((one / "checkpoint-2" / "training_state.json").read_text())
    assert (state["num_processes"], state["epoch"], state["epoch_batches"]) == (1, 0, 3)  # 2 batches, then 1
    check_bf16_run(one, [2])


def check_bf16_run(out, steps):
    """bf16 autocast runs on CPU; the precision accelerate resolved (the flag, or the launcher's environment when
    the flag is left out) is the one recorded, and the weights stay fp32 and finite."""
    assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "bf16"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == steps and all(r["nonfinite_steps"] == 0 for r in rows)
    assert all(math.isfinite(r["image_loss"]) and math.isfinite(r["text_loss"]) for r in rows)
    weights = export_weights(out)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    assert (out / "samples" / f"step-{steps[-1]}.png").is_file()  # the final validation sampled under bf16


def test_discrete_bf16_from_the_flag_or_from_accelerate(tiny_mnist, tiny_bert, tmp_path):
    """bf16 autocast runs on CPU, the frozen text encoder in bf16 too; the precision accelerate resolves (flag, or
    the launcher's environment when the flag is left out) is the one recorded."""
    flag, env = tmp_path / "flag", tmp_path / "env"
    args = [
        "--data_root",
        tiny_mnist,
        *text_flags(DISCRETE, tiny_bert, frozen=True),
        *TINY,
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--validation_steps",
        "100",
    ]
    run_script(DISCRETE, *args, "--output_dir", flag, "--mixed_precision", "bf16")
    # What `accelerate launch --mixed_precision bf16` (or an accelerate config set to bf16) hands the script.
    run_script(DISCRETE, *args, "--output_dir", env, env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    for out in (flag, env):
        assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "bf16"
        rows = read_metrics(out)
        assert [r["step"] for r in rows] == [1, 2] and all(r["nonfinite_steps"] == 0 for r in rows)
        assert all(math.isfinite(r["image_loss"]) and math.isfinite(r["text_loss"]) for r in rows)
        weights = export_weights(out)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
        assert (out / "samples" / "step-2.png").is_file()  # the final validation sampled under bf16 autocast


def test_discrete_frozen_encoder_in_bf16_gives_fp32_states(discrete, vocabulary, tiny_bert):
    """A bf16 run casts the frozen encoder's weights to bf16; the states it hands the MMDiT stay fp32."""
    _, vocab, ids = vocabulary
    frozen = discrete.BertTextEncoder(str(tiny_bert), vocab)
    reference = frozen(vocab.compact(ids))
    frozen.to(dtype=torch.bfloat16)
    assert frozen.to_tokenizer.dtype == torch.int64  # the id map is not a weight
    assert all(p.dtype == torch.bfloat16 for p in frozen.parameters())
    states = frozen(vocab.compact(ids))
    assert states.dtype == torch.float32 and torch.allclose(states, reference, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# train_image_discrete.py: the model in diffusers layout, checkpoint/export v2
# ---------------------------------------------------------------------------------------------------------------
def export_weights(out):
    """The exported weights: mmdit/ in save_pretrained layout, else the single model.safetensors of older
    exports."""
    folder = out / "mmdit" / "diffusion_pytorch_model.safetensors"
    return load_file(folder if folder.is_file() else out / "model.safetensors")


@pytest.mark.parametrize("learned", [True, False])
def test_discrete_model_save_pretrained_round_trip_is_bitwise(discrete, learned, tmp_path):
    torch.manual_seed(0)
    model = discrete.build_model(
        dict(
            in_channels=1,
            image_size=8,
            patch_size=4,
            dim_image=16,
            dim_text=16,
            text_out_dim=7,
            depth=1,
            num_heads=2,
            stem_channels=3,
        ),
        "learned" if learned else "frozen-bert",
        8,
        8,
    )
    model.save_pretrained(tmp_path / "mmdit")
    assert sorted(p.name for p in (tmp_path / "mmdit").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((tmp_path / "mmdit" / "config.json").read_text())
    assert config["num_text_tokens"] == (8 if learned else None) and config["stem_channels"] == 3
    loaded = discrete.TextImageModel.from_pretrained(tmp_path / "mmdit")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_input") for k in a) == learned  # a frozen encoder is never part of it
    inputs = (
        torch.randn(2, 1, 8, 8),
        torch.rand(2),
        torch.randint(0, 8, (2, 8)) if learned else torch.randn(2, 8, 16),
        torch.rand(2),
    )
    for x, y in zip(model.eval()(*inputs), loaded(*inputs), strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# train_image_continuous.py: the model in diffusers layout, checkpoint/export v2
# ---------------------------------------------------------------------------------------------------------------
def test_continuous_model_save_pretrained_round_trip_is_bitwise(tmp_path):
    continuous = load_module(CONTINUOUS)
    torch.manual_seed(0)
    model = continuous.TextImageModel(
        in_channels=1,
        image_size=8,
        patch_size=4,
        dim_image=16,
        dim_text=4,
        text_out_dim=4,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
        stem_channels=3,
        max_text_length=5,
        encoder_dim=10,
    )
    model.text_mean, model.text_std = torch.randn(10), torch.rand(10) + 0.5  # the caption statistics: buffers
    model.text_basis = torch.linalg.qr(torch.randn(10, 4))[0]
    model.save_pretrained(tmp_path / "mmdit")
    assert sorted(p.name for p in (tmp_path / "mmdit").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((tmp_path / "mmdit" / "config.json").read_text())
    assert (config["encoder_dim"], config["dim_text"], config["max_text_length"]) == (10, 4, 5)
    loaded = continuous.TextImageModel.from_pretrained(tmp_path / "mmdit")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and {"text_mean", "text_std", "text_basis"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    inputs = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 5, 4), torch.rand(2)
    for x, y in zip(model.eval()(*inputs), loaded(*inputs), strict=True):
        assert torch.equal(x, y)


def test_continuous_checkpoint_v2_damaged_falls_back_and_the_folder_is_one_runs(
    tiny_mnist, tiny_bert, tmp_path, capsys
):
    """A checkpoint holds the EMA model in save_pretrained layout (at the last step: the export's weights) and all
    that --sample_from needs, behind a manifest. `latest` skips a damaged checkpoint (one line) for the newest intact
    one; a damaged explicit path, a locked folder and a new run into another run's checkpoints are one-line errors
    that change nothing; a stale lock is taken over; --overwrite_output_dir starts anew."""

    continuous = load_module(CONTINUOUS)
    out = tmp_path / "run"
    args = [
        "--data-root",
        tiny_mnist,
        *text_flags(CONTINUOUS, tiny_bert),
        *TINY,
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
        "--output_dir",
        out,
    ]
    tracker = ["--report_to", "tensorboard", "--tracker_project_name", "tiny"]
    run_script(CONTINUOUS, *args, "--max_train_steps", "3", *tracker, "--mixed_precision", "bf16")
    check_bf16_run(out, [1, 2, 3])
    assert not (out / "run.lock").exists()  # released at the end
    assert continuous.manifest_problem(out) is None and continuous.manifest_problem(out / "checkpoint-3") is None
    assert not list(out.rglob("ema.safetensors")) and not (out / ".export.tmp").exists()
    ema = continuous.TextImageModel.from_pretrained(out / "checkpoint-3", subfolder="mmdit_ema")
    export = continuous.TextImageModel.from_pretrained(out / "mmdit")
    a, b = ema.state_dict(), export.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_tensorboard_and_model_card(out, [1, 2, 3], "continuous-text-embedding-diffusion")
    again = tmp_path / "from-checkpoint"
    run_script(
        CONTINUOUS,
        "--sample_from",
        out / "checkpoint-3",
        "--data-root",
        tiny_mnist,
        "--output_dir",
        again,
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1",
        "--device",
        "cpu",
    )
    assert (again / "samples" / "step-export.png").is_file()

    check_damaged_checkpoint_and_claims(CONTINUOUS, continuous, args, out, capsys, read_metrics)


def test_continuous_disk_full_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: one line, exit 1, no half folder, the previous checkpoint intact and the
    one `latest` picks."""
    import errno

    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    continuous = load_module(CONTINUOUS)
    out = tmp_path / "run"
    args = continuous.parse_args(["--output_dir", str(out), "--max_train_steps", "1"])
    accelerator = Accelerator(cpu=True)
    model = continuous.TextImageModel(1, 8, 4, 16, 4, 4, depth=1, num_heads=2, max_text_length=5, encoder_dim=10)
    ema = EMAModel(model.parameters(), foreach=True)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = torch.Generator().manual_seed(0)
    out.mkdir()
    sampler = continuous.build_sampler(continuous.build_noise_scheduler(args).config)
    sampling = continuous.functools.partial(continuous.write_sampling_files, sampler, sampler, {"script": CONTINUOUS})
    continuous.save_checkpoint(accelerator, args, model, ema, rng, 1, (0, 1), sampling)
    assert (out / "checkpoint-1" / "mmdit_ema" / "config.json").is_file()

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(continuous, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        continuous.save_checkpoint(accelerator, args, model, ema, rng, 2, (0, 2), sampling)
    assert stopped.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert continuous.list_checkpoints(out) == [out / "checkpoint-1"]
    assert continuous.manifest_problem(out / "checkpoint-1") is None


def test_discrete_checkpoint_v2_damaged_falls_back_and_the_folder_is_one_runs(
    discrete, tiny_mnist, tiny_bert, tmp_path, capsys
):
    """A checkpoint holds the EMA model in save_pretrained layout (at the last step: the export's weights) and all
    that --sample_from needs, behind a manifest. `latest` skips a damaged checkpoint (one line) for the newest intact
    one; a damaged explicit path, a locked folder and a new run into another run's checkpoints are one-line errors
    that change nothing; a stale lock is taken over; --overwrite_output_dir starts anew."""

    out = tmp_path / "run"
    args = [
        "--data-root",
        tiny_mnist,
        *text_flags(DISCRETE, tiny_bert),
        *TINY,
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
        "--output_dir",
        out,
    ]
    run_script(
        DISCRETE, *args, "--max_train_steps", "3", "--report_to", "tensorboard", "--tracker_project_name", "tiny"
    )
    assert not (out / "run.lock").exists()  # released at the end
    assert discrete.manifest_problem(out) is None and discrete.manifest_problem(out / "checkpoint-3") is None
    assert not list(out.rglob("ema.safetensors")) and not (out / ".export.tmp").exists()
    assert {"mmdit", "export_config.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    ema = discrete.TextImageModel.from_pretrained(out / "checkpoint-3", subfolder="mmdit_ema")
    export = discrete.TextImageModel.from_pretrained(out / "mmdit")
    a, b = ema.state_dict(), export.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_tensorboard_and_model_card(out, [1, 2, 3], "masked-discrete-text-diffusion")
    again = tmp_path / "from-checkpoint"
    run_script(
        DISCRETE,
        "--sample_from",
        out / "checkpoint-3",
        "--data-root",
        tiny_mnist,
        "--output_dir",
        again,
        "--num_inference_steps",
        "2",
        "--validation_guidance_scales",
        "1",
        "--device",
        "cpu",
    )
    assert (again / "samples" / "step-export.png").is_file()

    check_damaged_checkpoint_and_claims(DISCRETE, discrete, args, out, capsys, read_metrics)


def test_discrete_disk_full_while_saving_leaves_the_previous_checkpoint(discrete, tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: one line, exit 1, no half folder, the previous checkpoint intact and the
    one `latest` picks."""
    import errno
    import functools

    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    out = tmp_path / "run"
    args = discrete.parse_args(["--data_root", "x", "--output_dir", str(out)])
    accelerator = Accelerator(cpu=True)
    model = discrete.build_model(
        dict(
            in_channels=1, image_size=8, patch_size=4, dim_image=16, dim_text=16, text_out_dim=7, depth=1, num_heads=2
        ),
        "learned",
        8,
        8,
    )
    ema = EMAModel(model.parameters(), foreach=True)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = torch.Generator().manual_seed(0)
    out.mkdir()

    def sampling(config, folder):
        (folder / "export_config.json").write_text(json.dumps(config))

    sampling = functools.partial(sampling, {"script": DISCRETE})
    discrete.save_checkpoint(accelerator, args, model, ema, rng, 1, (0, 1), sampling)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(discrete, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        discrete.save_checkpoint(accelerator, args, model, ema, rng, 2, (0, 2), sampling)
    assert stopped.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert discrete.list_checkpoints(out) == [out / "checkpoint-1"]
    assert discrete.manifest_problem(out / "checkpoint-1") is None
    assert discrete.TextImageModel.from_pretrained(out / "checkpoint-1", subfolder="mmdit_ema")


def test_caption_statistics_read_in_chunks_match_the_whole_table():
    """The caption table of a large dataset is read a chunk of 4096 captions at a time (it stays on the host): the
    mean, std and principal basis match a float64 computation over the whole table."""
    module = load_module(CONTINUOUS)
    gen = torch.Generator().manual_seed(0)
    structure = torch.randn(3, 16, generator=gen) * torch.tensor([[9.0], [4.0], [2.0]])  # 3 clear directions
    table = torch.randn(5000, 4, 3, generator=gen) @ structure + 0.1 * torch.randn(5000, 4, 16, generator=gen) + 1
    ids = torch.randint(0, 5000, (20000,), generator=gen)
    mean, std = module.text_statistics(table, ids, "cpu")
    basis, kept = module.text_basis(table, mean, std, ids, 3, "cpu")

    weights = torch.bincount(ids, minlength=5000).double().repeat_interleave(4)[:, None]
    tokens = table.double().flatten(0, 1)
    ref_mean = (tokens * weights).sum(0) / weights.sum()
    ref_std = (((tokens - ref_mean) ** 2 * weights).sum(0) / weights.sum()).sqrt()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-5)
    z = (tokens - ref_mean) / ref_std
    values, vectors = torch.linalg.eigh((z * weights).T @ z / weights.sum())
    top = vectors[:, -3:]
    torch.testing.assert_close(basis.double() @ basis.double().T, top @ top.T, atol=1e-4, rtol=0)
    assert kept == pytest.approx(float(values[-3:].sum() / values.sum()), rel=1e-5)
