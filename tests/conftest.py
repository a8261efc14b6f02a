"""Shared test harness: tiny models and datasets built offline in seconds, and a script runner.

Every fixture writes into a session temp folder with `save_pretrained` (or the file layout the real thing has),
so the scripts load them through exactly the code path they use for hub models and real data.
"""

import atexit
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
}
WORDS = [
    "a",
    "handwritten",
    "digit",
    "photo",
    "of",
    "the",
    "number",
    "red",
    "blue",
    "square",
    "circle",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, launcher="python", expect_rc=0, timeout=600, env=None):
    """Run a repo script the way users do, offline, and fail the test with its output if the exit code differs.

    launcher="python": `python script ...` (forked after the imports: ForkRunner); launcher="accelerate": two real
    processes talking over gloo.
    accelerate 1.x runs `accelerate launch --cpu --num_processes 2` as ONE process (multi-CPU there means mpirun),
    so the CPU launch is `accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA: torchrun
    starts both ranks and the scripts' `--device auto` picks the CPU and gloo.
    """
    if launcher == "python":
        cmd = [sys.executable, str(REPO / script)]
    elif launcher == "accelerate":
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),  # two launches at once (pytest -n 2) must not share the default port
            str(REPO / script),
        ]
    else:
        raise ValueError(launcher)
    cmd += [str(a) for a in args]
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    if launcher == "accelerate":
        full_env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks even on a GPU machine
    if launcher == "python" and env is None:  # forked from a process that has the imports done (fork_runner.py)
        proc = ForkRunner.get().run(cmd[1:], full_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        output = (proc.stdout + "\n" + proc.stderr)[-6000:]
        pytest.fail(f"{' '.join(cmd)}\nexit code {proc.returncode}, expected {expect_rc}\n{output}", pytrace=False)
    return proc


class ForkRunner:
    """One tests/fork_runner.py per test process: it runs each script in a child forked after the imports, so that
    a run does not import torch and diffusers anew. `run` returns what subprocess.run would."""

    runner = None

    @classmethod
    def get(cls):
        if cls.runner is None or cls.runner.process.poll() is not None:
            cls.runner = cls()
        return cls.runner

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fork_runner.py")],
            cwd=REPO,
            env={**os.environ, **OFFLINE_ENV},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self.pending = b""
        atexit.register(self.process.kill)

    def read_line(self, deadline):
        """The runner's next answer line, or None at the deadline."""
        import select

        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("tests/fork_runner.py exited; run the test with a real process to see why")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def run(self, argv, env, timeout):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"argv": argv, "cwd": str(REPO), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            deadline = time.monotonic() + timeout
            pid = int(self.read_line(deadline + 60))
            rc = self.read_line(deadline)
            if rc is None:  # as subprocess.run does: kill the child, then raise
                os.kill(pid, signal.SIGKILL)
                self.read_line(time.monotonic() + 60)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
            stdout, stderr = (p.read_text(errors="replace") for p in (out, err))
        return subprocess.CompletedProcess([sys.executable, *argv], int(rc), stdout, stderr)


def resume_in_new_folder(script, args, straight, resumed, step=2, extra=()):
    """Copy checkpoint-<step> of the run in `straight` into a fresh `resumed` folder and run the same `args` there
    (output dir swapped) with --resume_from_checkpoint latest; returns the finished process."""
    import shutil

    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    args = [resumed if a == straight else a for a in args]
    return run_script(script, *args, "--resume_from_checkpoint", "latest", *extra)


def assert_same_weights(checkpoint_a, checkpoint_b):
    """Bitwise equality of every safetensors file of two checkpoint folders (model, EMA in whatever layout, the
    objective's RNG states): the exact-resume check."""
    import torch
    from safetensors.torch import load_file

    names = sorted(str(p.relative_to(checkpoint_a)) for p in checkpoint_a.rglob("*.safetensors"))
    assert names == sorted(str(p.relative_to(checkpoint_b)) for p in checkpoint_b.rglob("*.safetensors"))
    assert any("model" in name for name in names), names
    for name in names:
        a, b = load_file(checkpoint_a / name), load_file(checkpoint_b / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


# ---------------------------------------------------------------------------------------------------------------
# Tiny text encoders
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A CLIP BPE tokenizer with a character-level vocabulary and a 2-layer, 32-wide CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    chars = [chr(c) for c in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A word-piece tokenizer over a few caption words and a 2-layer, 32-wide BertModel."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny image models
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A 2-level AutoencoderKL: 3x32x32 images <-> 4x16x16 latents."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("tiny-vae")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory, tiny_clip, tiny_vae):
    """A StableDiffusionPipeline folder: tiny CLIP text encoder (16 tokens), tiny VAE, tiny UNet, DDPM schedule."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    tokenizer.model_max_length = 16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_vae),
        text_encoder=CLIPTextModel.from_pretrained(tiny_clip),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny datasets
# ---------------------------------------------------------------------------------------------------------------
def fake_digits(n, seed):
    """n 28x28 uint8 images (a bright bar whose position depends on the label) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 4:24, 2 + 2 * label : 5 + 2 * label] = 255
    return images, labels.astype(np.uint8)


def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A 64-train / 20-test MNIST in torchvision's raw layout: pass the returned folder as the dataset root."""
    root = tmp_path_factory.mktemp("tiny-mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", 64, 0), ("t10k", 20, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, 2049)
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """12 RGB 32x32 PNGs with captions in metadata.jsonl (the `datasets` imagefolder layout)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-imagefolder")
    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(12):
            color = "red" if i % 2 else "blue"
            shape = "square" if i % 3 else "circle"
            pixels = rng.integers(0, 40, size=(32, 32, 3), dtype=np.uint8)
            pixels[8:24, 8:24] = colors[color]
            Image.fromarray(pixels).save(root / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {color} {shape}"}) + "\n")
    return root


# The five trainers, and the tiny valid run of each that table-driven tests start from.
MNIST, LDM, DIT, DISCRETE, CONTINUOUS = (
    "train_mnist.py",
    "train_ldm_sd.py",
    "train_dit.py",
    "train_image_discrete.py",
    "train_image_continuous.py",
)
MMDIT_TINY = ["--dim_image", "32", "--depth", "1", "--num_heads", "2", "--tokenizer_max_length", "8", "--device", "cpu"]


def tiny_run_args(script, fx, out):
    """A tiny valid run of `script` into `out` (`fx`: the `tiny_fixtures` fixture); tests change one thing of it."""
    if script == MNIST:
        data = ["--data_root", fx["mnist"], "--text_encoder_name_or_path", fx["clip"], "--block_out_channels", "16,32"]
        data += ["--cross_attention_levels", "1", "--attention_head_dim", "8"]
    elif script == LDM:
        data = ["--pretrained_model_name_or_path", fx["sd"], "--train_data_dir", fx["folder"], "--resolution", "32"]
        data += ["--report_to", "none", "--lr_warmup_steps", "0"]
    elif script == DIT:
        data = ["--dataset_name", "mnist", "--data_root", fx["mnist"], "--vae_name_or_path", "none"]
        data += ["--resolution", "32", "--model", "DiT-S/4", "--depth", "2", "--hidden_size", "32", "--num_heads", "2"]
    else:
        data = ["--data_root", fx["mnist"], "--dim_text", "32", *MMDIT_TINY]
        data += ["--tokenizer" if script == DISCRETE else "--text_encoder_name_or_path", fx["bert"]]
    return [*data, "--output_dir", out, "--train_batch_size", "4", "--max_train_steps", "1"]


@pytest.fixture
def tiny_fixtures(tiny_mnist, tiny_clip, tiny_sd, tiny_imagefolder, tiny_bert):
    return {"mnist": tiny_mnist, "clip": tiny_clip, "sd": tiny_sd, "folder": tiny_imagefolder, "bert": tiny_bert}


# accelerate turns FSDP on for GPU processes only; torch's FSDP2 runs on CPU processes over gloo as well. This
# sitecustomize, put on the PYTHONPATH of a test run, lifts accelerate's gate: every Accelerator is an FSDP2 one.
FSDP_ON_CPU = """
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

accelerator_init = accelerate.Accelerator.__init__


def fsdp_init(self, *args, **kwargs):
    accelerator_init(self, *args, **kwargs)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    if self.mixed_precision != "no":  # as AcceleratorState does for an FSDP plugin
        plugin.set_mixed_precision(self.mixed_precision)
    self.state.fsdp_plugin = plugin


accelerate.Accelerator.__init__ = fsdp_init
"""


@pytest.fixture
def fsdp_on_cpu(tmp_path):
    """The environment of a run whose Accelerator is an FSDP2 one, also on CPU processes."""
    shim = tmp_path / "fsdp_shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FSDP_ON_CPU)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}


def one_error(stderr, *words):
    """The one-line error contract: exactly one `error:` line naming `words`, no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), stderr[-2000:]
    assert "Traceback" not in stderr


def check_damaged_checkpoint_and_claims(script, module, args, out, capsys, read_metrics):
    """Shared by every trainer. The run in `out` wrote checkpoint-1..3 with the flags `args` (no --max_train_steps);
    checkpoint-3 is cut short here. Then: a damaged explicit checkpoint and a damaged --sample_from are one-line
    errors (a real run: no traceback); claim_output_dir, the first thing a training run does (in-process here),
    refuses a new run into the old run's checkpoints and a live lock, changing nothing; `latest` falls back to
    checkpoint-2 (a real run to step 4); a stale lock is taken over and --overwrite_output_dir deletes the old run."""
    import socket
    import time

    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    before = sorted(p.name for p in out.iterdir())
    proc = run_script(
        script, *args, "--max_train_steps", "4", "--resume_from_checkpoint", out / "checkpoint-3", expect_rc=2
    )
    one_error(proc.stderr, "--resume_from_checkpoint", "damaged")
    with pytest.raises(SystemExit) as stopped:  # checked before any data or model is loaded
        module.check_args(
            module.parse_args(["--sample_from", str(out / "checkpoint-3"), "--output_dir", str(out.parent / "samples")])
        )
    assert stopped.value.code == 2
    one_error(capsys.readouterr().err, "--sample_from", "damaged")

    def claim(*argv):
        return module.claim_output_dir(module.parse_args([str(a) for a in [*args, *argv]]))

    for argv, words in (((), ("--overwrite_output_dir",)), (("--resume_from_checkpoint", "latest"), ("PID",))):
        if words == ("PID",):  # a live process on this host holds the lock: this test's parent
            (out / "run.lock").write_text(
                json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "heartbeat": time.time()})
            )
        with pytest.raises(SystemExit) as stopped:
            claim(*argv)
        assert stopped.value.code == 2
        one_error(capsys.readouterr().err, "--output_dir", *words)
    (out / "run.lock").unlink()
    assert sorted(p.name for p in out.iterdir()) == before

    proc = run_script(script, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert "checkpoint-3 is damaged (model.safetensors has" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert [r["step"] for r in read_metrics(out)][-2:] == [3, 4]

    # A stale lock (its process is gone) is taken over; --overwrite_output_dir deletes the old run's steps.
    (out / "run.lock").write_text(
        json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "heartbeat": time.time()})
    )
    lock = claim("--overwrite_output_dir")
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
