"""Data faults, for every script that reads image files (train_ldm_sd.py, train_dit.py, prepare_data_multi_gpu.py):
CMYK, 16-bit, RGBA and palette-with-transparency images are converted; a truncated image is skipped and counted;
an empty, missing or overlong caption trains. Never a crash."""

import importlib.util
import json

import numpy as np
import pytest
from conftest import REPO, run_script
from PIL import Image
from test_train_ldm_sd import FAST

READERS = ["train_ldm_sd.py", "train_dit.py", "prepare_data_multi_gpu.py"]
LONG_CAPTION = " ".join(["a very long caption"] * 200)  # far past any tokenizer limit


def load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def faulty_folder(tmp_path_factory):
    """An imagefolder with one image of each kind a scraped dataset holds, and captions of each kind."""
    root = tmp_path_factory.mktemp("faulty")
    grey16 = np.full((40, 40), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bits
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # transparent black: white once composited
    rgba[20:, :] = (200, 0, 0, 255)  # opaque red bottom half
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1  # colour 1 (blue) is transparent: white
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(root / "plain.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    Image.fromarray(grey16).save(root / "grey16.png")
    Image.fromarray(rgba).save(root / "rgba.png")
    palette.save(root / "palette.png", transparency=1)
    (root / "torn.png").write_bytes((root / "plain.png").read_bytes()[:60])  # a failed copy
    captions = {
        "plain.png": "a grey square",
        "cmyk.jpg": "",
        "grey16.png": None,
        "rgba.png": LONG_CAPTION,
        "palette.png": "white",
        "torn.png": "never read",
    }
    with open(root / "metadata.jsonl", "w") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root


@pytest.mark.parametrize("script", READERS)
def test_image_kinds_are_converted_and_a_torn_file_is_none(script, faulty_folder):
    decode = load(script).decode_image
    rgb = {name: decode(str(faulty_folder / name), "RGB") for name in ("cmyk.jpg", "grey16.png", "rgba.png")}
    assert all(image.mode == "RGB" and image.size == (40, 40) for image in rgb.values())
    assert np.asarray(rgb["grey16.png"])[0, 0].tolist() == [128, 128, 128]  # scaled, not clipped to 255
    assert np.asarray(rgb["rgba.png"])[0, 0].tolist() == [255, 255, 255]  # transparent: white
    assert np.asarray(rgb["rgba.png"])[-1, 0].tolist() == [200, 0, 0]
    red = np.asarray(rgb["cmyk.jpg"]).astype(int)[20, 20]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert np.asarray(decode(str(faulty_folder / "palette.png"), "RGB"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(decode(str(faulty_folder / "grey16.png"), "L"))[0, 0] == 128
    assert decode(str(faulty_folder / "torn.png"), "RGB") is None
    assert decode({"path": None, "bytes": b"not an image"}, "RGB") is None


def test_ldm_trains_on_the_faulty_folder(faulty_folder, tiny_sd, tmp_path):
    """All six rows in one batch: the torn image is replaced by the next one and counted; the captions that are
    empty, missing or far too long are tokenized to the text length."""
    out = tmp_path / "run"
    args = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", faulty_folder, "--output_dir", out]
    args += [*FAST, "--resolution", "32", "--train_batch_size", "6", "--max_train_steps", "1"]
    run_script("train_ldm_sd.py", *args, "--validation_steps", "100")
    assert json.loads((out / "train_summary.json").read_text())["num_bad_images"] == 1
    assert (out / "manifest.json").is_file()  # exported


def test_dit_reads_the_faulty_folder(faulty_folder, tmp_path):
    """The text-conditioned DiT's dataset: every example has pixels in [-1, 1], a caption string, and the torn
    image is skipped (replaced by the next one, counted)."""
    dit = load("train_dit.py")
    args = dit.parse_args(["--train_data_dir", str(faulty_folder), "--conditioning", "text", "--resolution", "32"])
    dataset = dit.build_dataset(args, 3, None)
    examples = [dataset[i] for i in range(len(dataset))]
    assert len(examples) == 6 and sum(e["skipped"] for e in examples) == 1
    assert all(e["pixels"].shape == (3, 32, 32) and e["pixels"].abs().max() <= 1 for e in examples)
    assert all(isinstance(e["caption"], str) for e in examples)


def test_prepare_data_encodes_the_faulty_folder(faulty_folder, tiny_sd, tmp_path):
    out = tmp_path / "shards"
    args = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", faulty_folder, "--resolution", "32"]
    proc = run_script("prepare_data_multi_gpu.py", *args, "--output_dir", out)
    index = json.loads((out / "index.json").read_text())
    assert index["num_examples"] == 5 and index["num_skipped"] == 1, proc.stdout[-2000:]
