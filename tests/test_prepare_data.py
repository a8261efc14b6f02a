"""prepare_data_multi_gpu.py: two real processes, the shard format, re-runs (same and other settings), bad images,
sources, streaming; then training train_ldm_sd.py from the shards it wrote."""

import datetime
import importlib.util
import json
import math
import os
import shutil

import pytest
import torch
from conftest import REPO, run_script
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_ldm_sd import FAST

SCRIPT = "prepare_data_multi_gpu.py"


def shard_tensors(folder):
    index = json.loads((folder / "index.json").read_text())
    return index, [load_file(folder / s["file"]) for s in index["shards"]]


@pytest.fixture(scope="module")
def script():
    """The script as a module, for the checks that run its functions in this process."""
    spec = importlib.util.spec_from_file_location("prepare_data_multi_gpu", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_write_the_format_then_train_from_it_then_rerun_on_a_shrunk_source(
    tiny_sd,  # noqa: F811
    tiny_imagefolder,
    tmp_path,
):
    images = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, images)
    shards = tmp_path / "shards"
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--resolution",
        "32",
        "--random_flip",
        "--shard_size",
        "5",
        "--batch_size",
        "3",
    ]
    # Two processes streaming the folder: each rank takes its own shards' examples out of the stream.
    streaming = [*common, "--dataset_name", images, "--streaming", "--output_dir", shards]
    proc = run_script(SCRIPT, *streaming, launcher="accelerate")
    assert "with 2 process(es)" in proc.stdout and "rank 1: encoded 5 images" in proc.stdout
    index, tensors = shard_tensors(shards)
    assert index["format"] == "precomputed-diffusion-shards" and index["version"] == 1
    assert index["num_examples"] == 12 and index["num_skipped"] == 0 and index["shard_size"] == 5
    assert [s["num_examples"] for s in index["shards"]] == [5, 5, 2]
    assert index["vae"]["latent_channels"] == 4 and index["vae"]["latent_size"] == 16 and index["random_flip"]
    # The VAE is recorded as from_pretrained loads it: the SD folder plus its subfolder.
    assert index["vae"]["name_or_path"] == str(tiny_sd) and index["vae"]["subfolder"] == "vae"
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(index["vae"]["name_or_path"], subfolder=index["vae"]["subfolder"])
    settings = json.loads((shards / "settings.json").read_text())
    assert index["settings"] == settings and settings["resolution"] == 32 and settings["shard_size"] == 5
    assert settings["dataset_name"] == str(images.resolve()) and "batch_size" not in settings
    enc = index["text_encoders"][0]
    assert enc["key"] == "text_encoder" and enc["max_length"] == 16 and enc["hidden_size"] == 32
    assert enc["use_attention_mask"] is False  # as StableDiffusionPipeline runs CLIP
    assert index["tensors"]["latent_mean"] == {"shape": [4, 16, 16], "dtype": "float16"}
    assert index["tensors"]["text_encoder.hidden_states"] == {"shape": [16, 32], "dtype": "float16"}
    assert index["tensors"]["text_encoder.pooled"]["shape"] == [32]
    assert torch.cat([t["index"] for t in tensors]).tolist() == list(range(12))
    assert all(
        (t["latent_std"] > 0).all() and not torch.equal(t["latent_mean"], t["latent_mean_flipped"]) for t in tensors
    )
    with safe_open(str(shards / "shard-00000.safetensors"), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
    assert captions[1] == "a red square" and len(captions) == 5  # metadata.jsonl order
    empty = load_file(shards / "empty_prompt.safetensors")
    assert empty["text_encoder.hidden_states"].shape == (1, 16, 32)

    # One process reading the folder as a whole writes the same shards (the assignment depends on nothing else).
    single = tmp_path / "single"
    run_script(SCRIPT, *common, "--train_data_dir", tiny_imagefolder, "--output_dir", single)
    for a, b in zip(tensors, shard_tensors(single)[1], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Train from the shards: neither the VAE nor the text encoder runs per step.
    out = tmp_path / "run"
    proc = run_script(
        "train_ldm_sd.py",
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--precomputed_data_dir",
        shards,
        "--output_dir",
        out,
        *FAST,
        "--unet_from_scratch",
        "--unet_config",
        "tiny",
        "--random_flip",
        "--max_train_steps",
        "2",
        "--cond_dropout_prob",
        "0.3",
    )
    assert "data: precomputed" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # A streamed re-run after the source shrank to 6 examples: shard 1 shrinks to [5, 6) and is encoded again,
    # shard 2 is left over and removed; shard 0 is finished and kept.
    lines = (images / "metadata.jsonl").read_text().splitlines()
    (images / "metadata.jsonl").write_text("\n".join(lines[:6]) + "\n")
    for i in range(6, 12):
        (images / f"{i:03d}.png").unlink()
    os.utime(shards / "shard-00000.safetensors", (1, 1))
    proc = run_script(SCRIPT, *streaming)
    assert "encoded 1 images" in proc.stdout and "removed 1 shard files" in proc.stdout
    index, after = shard_tensors(shards)
    assert index["num_examples"] == 6 and [s["file"] for s in index["shards"]] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert not (shards / "shard-00002.safetensors").exists()
    assert (shards / "shard-00000.safetensors").stat().st_mtime == 1
    assert all(torch.equal(tensors[0][k], after[0][k]) for k in tensors[0])
    assert after[1]["index"].tolist() == [5]


def test_rerun_same_settings_resumes_other_settings_refused_bad_images_counted(
    tiny_sd,  # noqa: F811
    tiny_imagefolder,
    script,
    tmp_path,
    capsys,
):
    images = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, images)
    (images / "005.png").write_bytes(b"not a png")  # unreadable: skipped and counted
    shards = tmp_path / "shards"
    args = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        images,
        "--resolution",
        "32",
        "--shard_size",
        "4",
        "--output_dir",
        shards,
        "--latent_dtype",
        "float32",
        "--text_encoder_name_or_path",
        "none",
    ]
    proc = run_script(SCRIPT, *args)
    assert "1 unreadable images were skipped" in proc.stderr
    index, tensors = shard_tensors(shards)
    assert index["num_examples"] == 11 and index["num_skipped"] == 1
    assert 5 not in tensors[1]["index"].tolist() and len(tensors[1]["index"]) == 3
    assert index["tensors"]["latent_mean"]["dtype"] == "float32" and "latent_mean_flipped" not in tensors[0]
    assert index["text_encoders"] == [] and not any(k.startswith("text_encoder") for k in tensors[0])

    first = shards / "shard-00000.safetensors"
    os.utime(first, (1, 1))  # a finished shard is left alone
    before = tensors[2]
    (shards / "shard-00002.safetensors").rename(shards / "shard-00002.safetensors.tmp")  # a partial shard: redone
    proc = run_script(SCRIPT, *args)
    assert "encoded 4 images" in proc.stdout
    assert first.stat().st_mtime == 1 and not (shards / "shard-00002.safetensors.tmp").exists()
    after = load_file(shards / "shard-00002.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((shards / "index.json").read_text())["num_skipped"] == 1  # counted from the shards on disk

    # Other settings into the same folder: refused before any model loads (the model folder named does not exist),
    # naming every differing setting; the shards and index.json are left as they were. Run in this process: the
    # check comes before the accelerator starts.
    other = [a if a != tiny_sd else tmp_path / "no-model" for a in args] + [
        "--seed",
        "1",
        "--image_interpolation_mode",
        "bicubic",
    ]
    other[other.index("--shard_size") + 1] = "3"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.parse_args([str(a) for a in other]))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "--shard_size 4 there, 3 now" in errors[0] and "--seed 0 there, 1 now" in errors[0]
    assert '--image_interpolation_mode "lanczos" there, "bicubic" now' in errors[0]
    assert "--pretrained_model_name_or_path" in errors[0] and "another --output_dir" in errors[0]
    assert first.stat().st_mtime == 1 and (shards / "index.json").is_file()

    # Shards without settings.json (their settings are unknown) are refused too; an empty folder is not.
    (shards / "settings.json").unlink()
    settings = script.content_settings(script.parse_args([str(a) for a in args]))
    with pytest.raises(SystemExit) as exit_info:
        script.check_settings(shards, settings)
    assert exit_info.value.code == 2
    script.check_settings(tmp_path / "new", settings)

    # The resize uses --image_interpolation_mode (default lanczos).
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    for mode in ["lanczos", "nearest"]:
        argv = [str(a) for a in args] + ["--center_crop", "--image_interpolation_mode", mode]
        resized = transforms.Resize(32, interpolation=getattr(transforms.InterpolationMode, mode.upper()))(image)
        expected = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(transforms.CenterCrop(32)(resized)))
        assert torch.equal(script.image_transform(script.parse_args(argv))(image, 0), expected)


def test_mnist_and_captions_json_sources_with_two_text_encoders(
    tiny_vae, tiny_clip, tiny_bert, tiny_mnist, tiny_imagefolder, tmp_path
):
    encoders = [
        "--vae_name_or_path",
        tiny_vae,
        "--text_encoder_name_or_path",
        tiny_clip,
        "--text_encoder_name_or_path",
        tiny_bert,
        "--tokenizer_max_length",
        "8",
        "--resolution",
        "32",
    ]
    mnist = tmp_path / "mnist"
    run_script(SCRIPT, "--data_root", tiny_mnist, "--max_samples", "12", "--output_dir", mnist, *encoders)
    index, tensors = shard_tensors(mnist)
    assert index["source"]["kind"] == "mnist" and index["label_names"] == [str(d) for d in range(10)]
    assert index["vae"]["name_or_path"] == str(tiny_vae) and index["vae"]["subfolder"] is None
    assert tensors[0]["label"].tolist() == [d % 10 for d in range(12)]  # the fake digits are 0, 1, ..., 9, 0, 1
    assert [e["key"] for e in index["text_encoders"]] == ["text_encoder", "text_encoder_2"]
    assert tensors[0]["text_encoder_2.input_ids"].shape == (12, 8) and "text_encoder_2.pooled" in tensors[0]
    with safe_open(str(mnist / "shard-00000.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["captions"])[3] == "A handwritten digit 3"

    entries = [{"image": str(tiny_imagefolder / f"{i:03d}.png"), "caption": f"picture {i}"} for i in range(3)]
    entries.append({"image": "missing.png", "caption": "gone"})
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    coco = tmp_path / "coco"
    run_script(SCRIPT, "--captions_json", tmp_path / "captions.json", "--output_dir", coco, *encoders)
    index, tensors = shard_tensors(coco)
    assert index["source"]["kind"] == "coco_json" and index["num_examples"] == 3 and index["num_skipped"] == 1
    assert index["label_names"] is None and "label" not in tensors[0]


def test_streaming_ranks_take_only_their_shards_examples(script, tiny_imagefolder, tmp_path, monkeypatch):
    """Each rank reads the stream but converts only the examples of its own shards (shard s: rank s % world)."""
    args = script.parse_args(
        [
            "--dataset_name",
            str(tiny_imagefolder),
            "--streaming",
            "--shard_size",
            "5",
            "--vae_name_or_path",
            "none",
            "--output_dir",
            str(tmp_path),
        ]
    )
    converted = []
    pick_caption = script.pick_caption

    def counted(value, position, seed):  # called once per example taken out of the stream
        converted.append(position)
        return pick_caption(value, position, seed)

    monkeypatch.setattr(script, "pick_caption", counted)
    taken = {}
    for rank in (0, 1):
        source = script.open_source(args)
        converted.clear()
        taken[rank] = [(s, [row[0] for row in rows]) for s, rows in script.my_shards(source, args, rank, 2, tmp_path)]
        assert sorted(converted) == [i for _, positions in taken[rank] for i in positions]
        assert source.length == 12  # known once the stream has ended
    assert taken == {0: [(0, [0, 1, 2, 3, 4]), (2, [10, 11])], 1: [(1, [5, 6, 7, 8, 9])]}


def test_ddp_timeout_reaches_the_process_group(script, tiny_vae, tiny_imagefolder, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    seen = {}

    def accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(script, "Accelerator", accelerator)
    common = [
        "--train_data_dir",
        str(tiny_imagefolder),
        "--vae_name_or_path",
        str(tiny_vae),
        "--text_encoder_name_or_path",
        "none",
        "--resolution",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    for flags, seconds in (([], 1800), (["--ddp_timeout", "7200"], 7200)):
        with pytest.raises(Stop):
            script.main(script.parse_args(common + flags))
        (handler,) = [h for h in seen["kwargs_handlers"] if type(h).__name__ == "InitProcessGroupKwargs"]
        assert handler.timeout == datetime.timedelta(seconds=seconds)
    with pytest.raises(SystemExit) as exit_info:
        script.main(script.parse_args(common + ["--ddp_timeout", "0"]))
    assert exit_info.value.code == 2


@pytest.mark.parametrize("case", ["resolution", "caption_column", "no_text_encoder"])
def test_bad_input_is_one_line_exit_2(case, script, tiny_vae, tiny_clip, tiny_imagefolder, tmp_path, capsys):
    """In this process, through the steps main() takes before it loads a model."""
    args = [
        "--vae_name_or_path",
        tiny_vae,
        "--text_encoder_name_or_path",
        tiny_clip,
        "--resolution",
        "32",
        "--output_dir",
        tmp_path / "out",
        "--train_data_dir",
        tiny_imagefolder,
    ]
    flag = {"resolution": "--resolution", "caption_column": "--caption_column"}.get(case, "--text_encoder_name_or_path")
    if case == "resolution":
        args[args.index("--resolution") + 1] = "30"
    elif case == "caption_column":
        args += ["--caption_column", "prompt"]
    else:  # a VAE alone: the text encoder is neither given nor found in an SD folder
        del args[2:4]
    parsed = script.parse_args([str(a) for a in args])
    with pytest.raises(SystemExit) as exit_info:
        script.check_args(parsed)
        script.open_source(parsed)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and flag in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def test_kill_9_mid_run_then_rerun_gives_the_shards_of_an_uninterrupted_run(tiny_sd, tiny_imagefolder, tmp_path):
    """SIGKILL (no handler runs) once the first shards are on disk; the re-run keeps them, redoes the rest, and every
    shard and index.json equal those of a run that was never interrupted, byte for byte."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import OFFLINE_ENV

    def args(out):
        return [
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--train_data_dir",
            tiny_imagefolder,
            "--resolution",
            "32",
            "--shard_size",
            "2",
            "--batch_size",
            "1",
            "--output_dir",
            out,
        ]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script(SCRIPT, *args(straight))
    cmd = [sys.executable, str(REPO / SCRIPT), *map(str, args(killed))]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "shard-00001.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (killed / "index.json").exists()  # killed mid-run
    run_script(SCRIPT, *args(killed))
    files = sorted(p.name for p in straight.iterdir())
    assert sorted(p.name for p in killed.iterdir()) == files and "shard-00005.safetensors" in files
    for name in files:
        if name.endswith(".safetensors") or name == "index.json":
            assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
