"""The bad-input matrix, one table for every trainer: each case is one `error:` line naming the flag or file (and the
fix), exit code 2, raised before any model or data loads, with what was already in the output folder left as it was.
The cases run `main()` in-process (cheap); one per script runs as a real process, to show that no traceback leaks."""

import hashlib
import importlib.util
import json

import pytest
from conftest import CONTINUOUS, DISCRETE, DIT, LDM, MNIST, REPO, one_error, run_script, tiny_run_args

# (case, flags appended to the base run, words the error line names). {tmp}: the test's folder; {bert}: a tiny BERT.
COMMON = [
    ("lr_zero", ["--learning_rate", "0"], ["--learning_rate", "> 0"]),
    ("lr_negative", ["--learning_rate", "-1"], ["--learning_rate"]),
    ("batch_zero", ["--train_batch_size", "0"], ["--train_batch_size"]),
    ("epochs_zero", ["--num_train_epochs", "0"], ["--num_train_epochs"]),
    ("steps_negative", ["--max_train_steps", "-3"], ["--max_train_steps"]),
    ("accumulation_zero", ["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    ("dropout_above_one", ["--cond_dropout_prob", "1.5"], ["--cond_dropout_prob"]),
    ("ema_decay_above_one", ["--ema_decay", "1.5"], ["--ema_decay", "(0, 1)"]),
    ("guidance_negative", ["--validation_guidance_scales", "1,-2"], ["--validation_guidance_scales"]),
    ("checkpointing_zero", ["--checkpointing_steps", "0"], ["--checkpointing_steps"]),
    ("grad_norm_negative", ["--max_grad_norm", "-1"], ["--max_grad_norm"]),
    ("output_is_a_file", ["--output_dir", "{tmp}/a_file"], ["--output_dir", "is a file"]),
    ("output_under_a_file", ["--output_dir", "{tmp}/a_file/run"], ["--output_dir"]),
    ("resume_missing", ["--resume_from_checkpoint", "{tmp}/nowhere"], ["--resume_from_checkpoint"]),
    ("resume_other_script", ["--resume_from_checkpoint", "{tmp}/foreign/checkpoint-1"], ["--resume_from_checkpoint"]),
    ("sample_from_missing", ["--sample_from", "{tmp}/nowhere"], ["--sample_from"]),
    ("max_samples_zero", ["--max_samples", "0"], ["--max_samples"]),
    ("fp16_on_cpu", ["--mixed_precision", "fp16", "--device", "cpu"], ["--mixed_precision fp16"]),
]
if not importlib.util.find_spec("wandb"):  # not a dependency of the suite
    COMMON.append(("tracker_not_installed", ["--report_to", "wandb"], ["--report_to wandb", "pip install"]))
# A missing dataset path, in each script's data flag.
MISSING_DATA = {
    MNIST: ["--data_root", "{tmp}/nowhere", "--max_samples", "4"],
    LDM: ["--train_data_dir", "{tmp}/nowhere"],
    DIT: ["--dataset_name", "{tmp}/nowhere"],
    DISCRETE: ["--data_root", "{tmp}/nowhere"],
    CONTINUOUS: ["--data_root", "{tmp}/nowhere"],
}
# A shape the model cannot take.
BAD_SHAPE = {
    MNIST: ["--block_out_channels", "8,8,8,8,8,8"],
    LDM: ["--resolution", "36"],
    DIT: ["--resolution", "30"],
    DISCRETE: ["--resolution", "30"],
    CONTINUOUS: ["--resolution", "30"],
}
# A dataset folder without a single example.
EMPTY_DATA = {
    LDM: ["--train_data_dir", "{tmp}/empty"],
    DISCRETE: ["--data_root", "{tmp}/empty"],
    CONTINUOUS: ["--data_root", "{tmp}/empty"],
}
# What only one script has: its frozen model, its width and class checks.
OWN = [
    (MNIST, "encoder_missing", ["--text_encoder_name_or_path", "{tmp}/nowhere"], ["--text_encoder_name_or_path"]),
    (LDM, "model_missing", ["--pretrained_model_name_or_path", "{tmp}/nowhere"], ["--pretrained_model_name_or_path"]),
    (DIT, "num_classes_wrong", ["--num_classes", "7"], ["--num_classes 7"]),
    (DIT, "unknown_preset", ["--model", "DiT-Q/2"], ["--model DiT-Q/2"]),
    (DISCRETE, "encoder_missing", ["--tokenizer", "{tmp}/nowhere"], ["--tokenizer"]),
    (
        DISCRETE,
        "dim_text_mismatch",
        ["--text_encoder_name_or_path", "{bert}", "--dim_text", "768"],
        ["--dim_text 768", "(32)", "pass --dim_text 32"],
    ),
    (CONTINUOUS, "encoder_missing", ["--text_encoder_name_or_path", "{tmp}/nowhere"], ["--text_encoder_name_or_path"]),
    (CONTINUOUS, "dim_text_mismatch", ["--dim_text", "768"], ["--dim_text 768", "(32)", "pass --dim_text 32"]),
    (CONTINUOUS, "text_latent_too_wide", ["--text_latent_dim", "33"], ["--text_latent_dim 33", "[0, 32]"]),
]
CASES = [(script, *case) for script in MISSING_DATA for case in COMMON]
CASES += [(script, "data_missing", flags, [flags[0]]) for script, flags in MISSING_DATA.items()]
CASES += [(script, "bad_shape", flags, [flags[0]]) for script, flags in BAD_SHAPE.items()]
CASES += [(script, "empty_data", flags, [flags[0]]) for script, flags in EMPTY_DATA.items()]
CASES += OWN


@pytest.fixture(scope="module")
def modules():
    loaded = {}
    for script in MISSING_DATA:
        spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
        loaded[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[script])
    return loaded


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (mixed precision, device) per process: each in-process case starts from none."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def prepare(script, case, flags, tmp_path, bert):
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes\n")
    if case == "resume_other_script":  # an intact checkpoint of another script
        other = DIT if script != DIT else MNIST
        checkpoint = tmp_path / "foreign" / "checkpoint-1"
        checkpoint.mkdir(parents=True)
        (checkpoint / "training_state.json").write_text(json.dumps({"script": other, "global_step": 1}))
    return out, [str(a).replace("{tmp}", str(tmp_path)).replace("{bert}", str(bert)) for a in flags]


@pytest.mark.parametrize("script,case,flags,words", CASES, ids=[f"{c[0][6:-3]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2(script, case, flags, words, modules, tiny_fixtures, tmp_path, capsys):
    module = modules[script]
    out, flags = prepare(script, case, flags, tmp_path, tiny_fixtures["bert"])
    before = snapshot(tmp_path)
    argv = [str(a) for a in tiny_run_args(script, tiny_fixtures, out)] + flags
    with pytest.raises(SystemExit) as stopped:
        module.main(module.parse_args(argv))
    assert stopped.value.code == 2
    one_error(capsys.readouterr().err, *words)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("script", list(MISSING_DATA))
def test_bad_input_as_a_real_process_has_no_traceback(script, tiny_fixtures, tmp_path):
    out, flags = prepare(script, "lr_zero", ["--learning_rate", "0"], tmp_path, None)
    proc = run_script(script, *tiny_run_args(script, tiny_fixtures, out), *flags, expect_rc=2)
    one_error(proc.stderr, "--learning_rate")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
