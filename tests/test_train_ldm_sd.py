"""Smoke, resume, export and bad-input tests of train_ldm_sd.py, run as users run it (subprocess, offline, CPU)."""

import errno
import importlib.util
import json
import math

import pytest
import torch
from conftest import REPO, assert_same_weights, check_damaged_checkpoint_and_claims, resume_in_new_folder, run_script
from safetensors.torch import load_file

SCRIPT = "train_ldm_sd.py"
FAST = [
    "--resolution",
    "32",
    "--train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-3",
    "--num_inference_steps",
    "2",
    "--validation_guidance_scales",
    "1,3",
    "--num_validation_images",
    "1",
    "--validation_prompts",
    "a red square",
    "a blue circle",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
    "--lr_warmup_steps",
    "0",
    "--report_to",
    "none",
]


@pytest.fixture(scope="module")
def ldm():
    """The script as a module, for the checks that run its functions in this process."""
    spec = importlib.util.spec_from_file_location("train_ldm_sd", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_shards(folder, text_encoder, tokenizer, vae=None):
    """An index.json of prepare_data_multi_gpu.py (no shard files: enough for the checks made before loading)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "format": "precomputed-diffusion-shards",
        "version": 1,
        "resolution": 32,
        "random_flip": False,
        "shards": [],
        "vae": vae
        or {
            "name_or_path": "org/sd",
            "subfolder": "vae",
            "scaling_factor": 0.18215,
            "shift_factor": 0.0,
            "latent_channels": 4,
        },
        "text_encoders": [
            {
                "key": "text_encoder",
                "name_or_path": text_encoder,
                "tokenizer": tokenizer,
                "max_length": 16,
                "hidden_size": 32,
                "prefix": "",
                "use_attention_mask": False,
            }
        ],
    }
    (folder / "index.json").write_text(json.dumps(index))
    return index


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def load_weights(checkpoint, name):
    return load_file(checkpoint / name)


def test_finetune_two_steps_then_export_makes_an_image(ldm, tiny_sd, tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    run_script(
        SCRIPT,
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        tiny_imagefolder,
        "--output_dir",
        out,
        *FAST,
        "--max_train_steps",
        "2",
        "--random_flip",
        "--snr_gamma",
        "5",
        "--noise_offset",
        "0.05",
        "--input_perturbation",
        "0.1",
        "--proportion_empty_prompts",
        "0.5",
        "--report_to",
        "tensorboard",
        "--tracker_project_name",
        "tiny",
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(
        (out / "checkpoint-2" / f).is_file()
        for f in ("model.safetensors", "unet_ema/config.json", "unet_ema/diffusion_pytorch_model.safetensors")
    )
    assert not (out / "checkpoint-2" / "ema.safetensors").exists() and not (out / "checkpoint-2" / "vae").exists()
    assert (out / "samples" / "step-2.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["max_train_steps"] == 2 and config["args"]["cond_dropout_prob"] == 0.5

    # The export is a StableDiffusionPipeline folder that diffusers loads alone, EMA UNet in fp32.
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.model_max_length == 16
    image = pipe(
        "a red square",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and (image >= 0).all() and (image <= 1).all()
    # Fine-tuned: the export's UNet has the folder's architecture, and its weights are the EMA's, not the raw ones.
    original = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert pipe.unet.config.block_out_channels == original.config.block_out_channels
    # The checkpoint holds the EMA UNet in save_pretrained layout: at the last step, the export's weights bitwise.
    ema = UNet2DConditionModel.from_pretrained(out / "checkpoint-2", subfolder="unet_ema")
    exported = pipe.unet.state_dict()
    assert ema.state_dict().keys() == exported.keys()
    assert all(torch.equal(v, exported[k]) for k, v in ema.state_dict().items())
    assert ldm.manifest_problem(out) is None and ldm.manifest_problem(out / "checkpoint-2") is None
    assert not (out / ".export.tmp").exists()
    # TensorBoard got the scalars and the validation grid; the export says what it is (Hub model card).
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Images("validation")] == [2] and events.Images("validation")[0].width > 100
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license and "text-to-image" in card.data.tags
    assert "--max_train_steps 2" in card.text and "(samples.png)" in card.text and (out / "samples.png").is_file()
    assert (out / "samples.png").read_bytes() == (out / "samples" / "step-2.png").read_bytes()
    assert {"README.md", "samples.png"} <= set(json.loads((out / "manifest.json").read_text())["files"])

    # --sample_from an export (the pipeline folder) or a checkpoint (its UNet with the base pipeline's VAE and
    # text encoder, which the checkpoint names): the grid of the recorded prompts, no training flag needed.
    for source in (out, out / "checkpoint-2"):
        again = tmp_path / f"from-{source.name}"
        run_script(
            SCRIPT,
            "--sample_from",
            source,
            "--output_dir",
            again,
            "--num_inference_steps",
            "2",
            "--validation_guidance_scales",
            "1",
            "--num_validation_images",
            "1",
        )
        assert (again / "samples" / "export.png").stat().st_size > 1000
        assert not (again / "run.lock").exists()
    # At the last step the checkpoint's UNet is the export's, and its parts are the export's: the same grid.
    grids = [(tmp_path / f"from-{name}" / "samples" / "export.png").read_bytes() for name in ("run", "checkpoint-2")]
    assert grids[0] == grids[1]


def test_from_scratch_max_samples_whole_pipeline(tiny_sd, tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    # Hyphen spellings and the aliases are accepted.
    run_script(
        SCRIPT,
        "--pretrained-model-name-or-path",
        tiny_sd,
        "--train-data-dir",
        tiny_imagefolder,
        "--output-dir",
        out,
        *FAST,
        "--unet-from-scratch",
        "--unet-config",
        "tiny",
        "--max-samples",
        "10",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--checkpointing-steps",
        "3",
        "--validation_epochs",
        "1",
        "--center_crop",
        "--prediction_type",
        "v_prediction",
        "--rescale_betas_zero_snr",
        "--image_interpolation_mode",
        "bicubic",
        "--cache_dir",
        tmp_path / "cache",
    )
    # 10 samples, batch 4, drop_last: 2 steps per epoch, 2 epochs.
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "samples" / "step-2.png").is_file() and (out / "samples" / "step-4.png").is_file()
    assert any((tmp_path / "cache").iterdir())  # the imagefolder's datasets cache went to --cache_dir
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert list(unet.config.block_out_channels) == [16, 32] and unet.config.cross_attention_dim == 32
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"]


def test_resume_matches_uninterrupted_run_and_total_limit(tiny_sd, tiny_imagefolder, tmp_path):
    straight = tmp_path / "straight"
    args = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        tiny_imagefolder,
        "--output_dir",
        straight,
        *FAST,
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "100",
        "--random_flip",
        "--ema_power",
        "1.0",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
    ]
    run_script(SCRIPT, *args)
    # Resume in a fresh folder from the step-2 checkpoint, mid-epoch (12 images / batch 2 = 6 steps per epoch).
    resumed = tmp_path / "resumed"
    args[args.index("--checkpointing_steps") + 1] = "1"
    proc = resume_in_new_folder(SCRIPT, args, straight, resumed, extra=("--checkpoints_total_limit", "2"))
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert [r["step"] for r in read_metrics(resumed)] == [3, 4]
    # --checkpoints_total_limit 2 pruned checkpoint-2 once checkpoint-3 and checkpoint-4 were complete.
    assert sorted(p.name for p in resumed.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    assert (resumed / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_weights(straight / "checkpoint-4", resumed / "checkpoint-4")
    # The comparison is sharp only if steps 3 and 4 moved the weights.
    w2, w4 = (load_weights(straight / f"checkpoint-{s}", "model.safetensors") for s in (2, 4))
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)


@pytest.mark.parametrize(
    "case", ["caption_column", "xformers", "bitsandbytes", "shards_text_encoder", "zero_snr_epsilon"]
)
def test_bad_input_is_one_line_exit_2(case, ldm, tiny_sd, tiny_imagefolder, tmp_path, capsys):
    """The mistakes only this script can make (the shared ones are in test_bad_inputs.py), in-process."""
    args = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        tiny_imagefolder,
        "--output_dir",
        tmp_path / "run",
        *FAST,
        "--max_train_steps",
        "1",
    ]
    flag = {
        "caption_column": "--caption_column",
        "xformers": "--enable_xformers_memory_efficient_attention",
        "bitsandbytes": "--use_8bit_adam",
        "shards_text_encoder": "--precomputed_data_dir",
        "zero_snr_epsilon": "--rescale_betas_zero_snr",
    }[case]
    if case == "shards_text_encoder":  # captions encoded by another 32-d encoder: refused before any model loads
        fake_shards(tmp_path / "shards", "org/other-clip", "org/other-clip")
        args[args.index("--train_data_dir") : args.index("--train_data_dir") + 2] = [flag, tmp_path / "shards"]
    elif case == "caption_column":
        args += ["--caption_column", "caption"]
    else:  # zero_snr_epsilon: the folder's scheduler predicts epsilon
        args += [flag]
    with pytest.raises(SystemExit) as stopped:
        ldm.main(ldm.parse_args([str(a) for a in args]))
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], stderr[-2000:]
    assert not (tmp_path / "run").exists()
    if case == "caption_column":  # the message names the columns that exist
        assert "image" in errors[0] and "text" in errors[0]
    if case == "shards_text_encoder":  # both encoders, and the fix
        assert "org/other-clip" in errors[0] and f"{tiny_sd}/text_encoder" in errors[0]
        assert "--text_encoder_name_or_path org/other-clip" in errors[0]
    if case == "zero_snr_epsilon":
        assert "--prediction_type epsilon" in errors[0] and "--prediction_type v_prediction" in errors[0]


def test_bf16_from_the_flag_or_from_accelerate(tiny_sd, tiny_imagefolder, tmp_path):
    """bf16 autocast runs on CPU; the precision accelerate resolves (flag, or the launcher's environment when the
    flag is left out) is the one recorded. The second run also updates its offloaded EMA every 3 steps: the 2 steps
    are caught up at the end, with the decay of both (0 at the first step: the EMA is the last weights)."""
    flag, env = tmp_path / "flag", tmp_path / "env"
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        tiny_imagefolder,
        *FAST,
        "--max_train_steps",
        "2",
        "--validation_steps",
        "100",
        "--validation_guidance_scales",
        "3",
    ]
    run_script(
        SCRIPT,
        *common,
        "--output_dir",
        flag,
        "--mixed_precision",
        "bf16",
        "--report_to",
        "tensorboard",
        "--logging_dir",
        "tb",
    )
    # What `accelerate launch --mixed_precision bf16` (or an accelerate config set to bf16) hands the script.
    run_script(
        SCRIPT,
        *common,
        "--output_dir",
        env,
        "--offload_ema",
        "--ema_update_every",
        "3",
        env={"ACCELERATE_MIXED_PRECISION": "bf16"},
    )
    assert list((flag / "tb" / "text2image-fine-tune").glob("events.out.tfevents.*"))  # --logging_dir, default project
    for out in (flag, env):
        assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "bf16"
        assert all(math.isfinite(r["loss"]) for r in read_metrics(out))
        unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in unet.values())
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    model.load_state_dict(load_weights(env / "checkpoint-2", "model.safetensors"))
    ema = load_weights(env / "checkpoint-2", "unet_ema/diffusion_pytorch_model.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema[name], p.detach())


def test_strided_ema_is_the_product_of_the_steps_decays(ldm):
    """--ema_update_every N: one update with the product of the N decays; N = 1 is diffusers' EMAModel exactly."""
    from diffusers.training_utils import EMAModel

    weights = [torch.nn.Parameter(torch.zeros(3))]
    plain, strided = EMAModel(weights, power=2 / 3), ldm.StridedEMA(weights, power=2 / 3)
    for step in range(1, 6):
        weights[0].data.fill_(float(step))
        plain.step(weights)
        if step in (1, 2):
            strided.step_over(weights, 1)
            assert torch.equal(plain.shadow_params[0], strided.shadow_params[0])
    before = strided.shadow_params[0].clone()
    strided.step_over(weights, 3)  # steps 3, 4, 5 in one update, from the weights of step 5
    decay = math.prod(plain.get_decay(s) for s in (3, 4, 5))
    expected = decay * before + (1 - decay) * 5.0
    assert strided.optimization_step == plain.optimization_step == 5
    torch.testing.assert_close(strided.shadow_params[0], expected)


def test_shards_text_encoder_identity_and_vae_from_index(ldm, tiny_sd, tmp_path, capsys, monkeypatch):
    """Shards are used only with the text encoder and tokenizer that encoded them (same path however written);
    their VAE loads from index.json's name_or_path + subfolder, or, in older shards, from name_or_path alone."""
    monkeypatch.chdir(tiny_sd.parent)
    index = fake_shards(
        tmp_path / "shards",
        f"./{tiny_sd.name}/text_encoder",
        f"{tiny_sd.name}/tokenizer",
        vae={"name_or_path": str(tiny_sd), "subfolder": "vae", "scaling_factor": 0.18215},
    )
    args = ldm.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd), "--precomputed_data_dir", str(tmp_path / "shards")]
    )
    ldm.check_shards_text_encoder(args, index)  # the same folder, written relative
    assert ldm.vae_source(args, index)[:2] == (str(tiny_sd), "vae")
    assert ldm.load_vae(args, ldm.vae_source(args, index)).config.latent_channels == 4
    old = {**index, "vae": {"name_or_path": f"{tiny_sd}/vae", "scaling_factor": 0.18215}}  # no subfolder field
    assert ldm.load_vae(args, ldm.vae_source(args, old)).config.latent_channels == 4
    refused = {
        "--precomputed_data_dir": ([], fake_shards(tmp_path / "other", "org/sd/text_encoder", "org/sd/tokenizer")),
        "--tokenizer_max_length 77": (["--tokenizer_max_length", "77"], index),
        "--vae_name_or_path": (["--vae_name_or_path", str(tmp_path)], index),
    }
    for expected, (extra, bad_index) in refused.items():
        with pytest.raises(SystemExit) as stopped:
            bad_args = ldm.parse_args(
                [
                    "--pretrained_model_name_or_path",
                    str(tiny_sd),
                    "--precomputed_data_dir",
                    str(tmp_path / "shards"),
                    *extra,
                ]
            )
            ldm.check_shards_text_encoder(bad_args, bad_index)
            ldm.vae_source(bad_args, bad_index)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
        if expected == "--precomputed_data_dir":  # the fix names the folder the shards' encoder came from
            assert "--pretrained_model_name_or_path org/sd without" in lines[0], lines


def test_vae_shift_factor_is_not_applied_so_the_pipeline_decodes_right(ldm, tiny_sd):
    """StableDiffusionPipeline decodes vae.decode(z / scaling_factor) and adds no shift_factor back: latents are
    trained unshifted whatever the VAE's shift_factor (recorded in run_config.json)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    shifted = AutoencoderKL.from_config({**vae.config, "shift_factor": 0.5})
    info = ldm.latent_scale(shifted)
    assert info == {
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": 0.0,
        "vae_shift_factor_not_applied": 0.5,
    }
    args = ldm.parse_args(["--dataset_name", "x"])
    mean = torch.randn(2, 4, 16, 16)
    z = ldm.batch_to_latents(
        {"latent_mean": mean, "latent_std": torch.zeros_like(mean)},
        shifted,
        info,
        args,
        torch.Generator().manual_seed(0),
        torch.float32,
    )
    torch.testing.assert_close(z / shifted.config.scaling_factor, mean)  # what the pipeline hands vae.decode


def test_zero_terminal_snr_min_snr_weight_is_finite_with_v_prediction(ldm, tiny_sd):
    """At t = T zero terminal SNR makes the min-SNR weight 0 / 0 for epsilon (refused, see the bad-input test);
    with v_prediction it is min(0, gamma) / (0 + 1) = 0, and finite at every timestep."""
    args = ldm.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_sd),
            "--prediction_type",
            "v_prediction",
            "--rescale_betas_zero_snr",
            "--snr_gamma",
            "5",
        ]
    )
    scheduler = ldm.build_noise_scheduler(args)
    timesteps = torch.arange(scheduler.config.num_train_timesteps)
    weights = ldm.min_snr_weight(scheduler, timesteps, 5.0)
    assert torch.isfinite(weights).all() and weights[-1] == 0 and (weights[:-1] > 0).all()
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # the terminal SNR is exactly zero


def test_damaged_checkpoint_falls_back_and_the_folder_is_one_runs(ldm, tiny_sd, tiny_imagefolder, tmp_path, capsys):
    """`latest` skips a damaged checkpoint (one line) for the newest intact one; a damaged explicit path, a locked
    folder and a new run into another run's checkpoints are one-line errors that change nothing."""
    out = tmp_path / "run"
    args = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--train_data_dir",
        tiny_imagefolder,
        "--output_dir",
        out,
        *FAST,
        "--checkpointing_steps",
        "1",
        "--validation_steps",
        "100",
    ]
    run_script(SCRIPT, *args, "--max_train_steps", "3")
    assert not (out / "run.lock").exists()  # released at the end
    check_damaged_checkpoint_and_claims(SCRIPT, ldm, args, out, capsys, read_metrics)


def test_disk_full_while_saving_leaves_the_previous_checkpoint(ldm, tiny_sd, tmp_path, monkeypatch):
    """ENOSPC in the middle of a save: one line, exit 1, no half folder, the previous checkpoint intact and the
    one `latest` picks."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    args = ldm.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_sd),
            "--output_dir",
            str(out),
            "--unet_from_scratch",
            "--unet_config",
            "tiny",
            "--resolution",
            "32",
        ]
    )
    accelerator = Accelerator(cpu=True)
    unet = ldm.build_unet(args, latent_channels=4, latent_size=16, cross_attention_dim=32)
    ema = ldm.StridedEMA(unet.parameters(), foreach=True)
    optimizer = torch.optim.AdamW(unet.parameters())
    unet, optimizer = accelerator.prepare(unet, optimizer)
    rng = torch.Generator().manual_seed(0)
    out.mkdir()
    sampler = ldm.build_sampler(ldm.build_noise_scheduler(args))
    sampling = ldm.functools.partial(
        ldm.write_sampling_files, sampler, ldm.export_config(args, ldm.vae_source(args, None), 16, ["a red square"])
    )
    ldm.save_checkpoint(accelerator, args, unet, ema, rng, 1, (0, 1), sampling)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ldm, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        ldm.save_checkpoint(accelerator, args, unet, ema, rng, 2, (0, 2), sampling)
    assert stopped.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert ldm.list_checkpoints(out) == [out / "checkpoint-1"]
    assert ldm.manifest_problem(out / "checkpoint-1") is None


def test_diffusers_flags_parse_and_check(ldm, tiny_sd, tiny_imagefolder, tmp_path, capsys):
    """The flags shared with diffusers' train_text_to_image.py default as there; --max_train_samples is --max_samples;
    --image_interpolation_mode picks the resize filter (lanczos by default); --validation_epochs (5 by default) and
    --validation_steps exclude each other; --logging_dir and --cache_dir."""
    from torchvision.transforms import InterpolationMode

    base = [
        "--pretrained_model_name_or_path",
        str(tiny_sd),
        "--train_data_dir",
        str(tiny_imagefolder),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    args = ldm.parse_args([*base, "--max-train-samples", "3"])
    ldm.check_args(args)
    assert args.max_samples == 3 and args.validation_steps is None and args.validation_epochs == 5
    assert args.logging_dir == "logs" and args.cache_dir is None and args.report_to == ["tensorboard"]
    assert args.tracker_project_name == "text2image-fine-tune" and args.output_dir.endswith("run")
    defaults = ldm.parse_args([])
    assert (defaults.gradient_accumulation_steps, defaults.train_batch_size, defaults.num_train_epochs) == (1, 16, 100)
    assert (defaults.learning_rate, defaults.lr_warmup_steps, defaults.lr_scheduler) == (1e-4, 500, "constant")
    assert (defaults.resolution, defaults.checkpointing_steps, defaults.output_dir) == (512, 500, "sd-model-finetuned")
    assert defaults.adam_weight_decay == 1e-2 and not defaults.foreach_ema
    assert ldm.ImageCaptions(args, None, 16, "RGB").resize.interpolation == InterpolationMode.LANCZOS
    args = ldm.parse_args([*base, "--image_interpolation_mode", "nearest_exact", "--validation_epochs", "2"])
    ldm.check_args(args)
    assert ldm.ImageCaptions(args, None, 16, "RGB").resize.interpolation == InterpolationMode.NEAREST_EXACT
    assert args.validation_steps is None
    # Every 2 epochs (at the end of epochs 2, 4, ...), never at the last step; steps alone: every N steps.
    assert [e for e in range(6) if ldm.validation_due(args, 10, 100, epoch_end=e)] == [1, 3, 5]
    assert not any(ldm.validation_due(args, s, 100) for s in range(1, 100))
    assert not ldm.validation_due(args, 100, 100, epoch_end=1)
    steps = ldm.parse_args([*base, "--validation_steps", "3"])
    ldm.check_args(steps)
    assert [s for s in range(1, 10) if ldm.validation_due(steps, s, 9)] == [3, 6]
    assert not ldm.validation_due(steps, 3, 9, epoch_end=0)
    for extra, flag in (
        (["--validation_epochs", "1", "--validation_steps", "500"], "--validation_epochs"),
        (["--validation_epochs", "0"], "--validation_epochs 0"),
    ):
        with pytest.raises(SystemExit) as stopped:
            ldm.check_args(ldm.parse_args([*base, *extra]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and flag in lines[0], lines
    with pytest.raises(SystemExit) as stopped:
        ldm.parse_args([*base, "--image_interpolation_mode", "cubic"])
    assert stopped.value.code == 2 and "lanczos" in capsys.readouterr().err


def test_model_card_of_a_hub_base(ldm, tmp_path, monkeypatch):
    """An SD v1 base of the hub: base_model, its license (CreativeML OpenRAIL-M) and the hub dataset in the card's
    YAML; other bases are "other"."""
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ldm.sys, "argv", ["train_ldm_sd.py", "--max_train_steps", "7"])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 7, "loss": 0.125}) + "\n")
    args = ldm.parse_args(["--dataset_name", "lambdalabs/naruto-blip-captions"])
    ldm.check_args(args)
    card = ModelCard(ldm.model_card(args, 7, metrics))
    assert card.data.base_model == ldm.DEFAULT_MODEL and card.data.license == "creativeml-openrail-m"
    assert card.data.datasets == ["lambdalabs/naruto-blip-captions"] and card.data.library_name == "diffusers"
    assert "0.1250" in card.text and "python train_ldm_sd.py --max_train_steps 7" in card.text
    assert ldm.sd_license("stabilityai/stable-diffusion-2-1") == "other" and ldm.sd_license(str(tmp_path)) == "other"


def test_save_to_disk_folders_of_a_dataset_and_of_its_splits_load(ldm, tiny_imagefolder, tmp_path):
    """--dataset_name takes a save_to_disk folder: a Dataset, or a DatasetDict whose train split is used."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(tiny_imagefolder), split="train")
    ds.save_to_disk(tmp_path / "dataset")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "splits")
    for folder in ("dataset", "splits"):
        args = ldm.parse_args(["--dataset_name", str(tmp_path / folder)])
        loaded = ldm.load_hf_dataset(args)
        assert len(loaded) == len(ds) and loaded.column_names == ["image", "text"]
