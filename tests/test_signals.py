"""Pre-emption, one table for every trainer: SIGTERM or SIGINT during training saves a checkpoint at the next step and
exits 0, without an export (the run is not finished); the checkpoint resumes. Each trainer gets one signal as a real
process (the two alternate), and both signals are checked in-process on each script's StopRequest."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from accelerate import Accelerator
from conftest import CONTINUOUS, DISCRETE, DIT, LDM, MNIST, OFFLINE_ENV, REPO, run_script, tiny_run_args

SCRIPTS = [MNIST, LDM, DIT, DISCRETE, CONTINUOUS]
SIGNALS = {script: [signal.SIGTERM, signal.SIGINT][i % 2] for i, script in enumerate(SCRIPTS)}


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{s[6:-3]}-{SIGNALS[s].name}" for s in SCRIPTS])
def test_signal_checkpoints_and_exits_zero(script, tiny_fixtures, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_run_args(script, tiny_fixtures, out), "--max_train_steps", "100000"]
    args += ["--checkpointing_steps", "100000", "--validation_steps", "100000", "--logging_steps", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # a logged step: the stop handler is in place
    proc.send_signal(SIGNALS[script])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    step = json.loads((checkpoints[0] / "training_state.json").read_text())["global_step"]
    assert 1 <= step < 100000
    assert not (out / "manifest.json").exists()  # pre-empted: no export, only the checkpoint to resume from
    assert not list(out.glob(".checkpoint-*"))
    assert not (out / "run.lock").exists()
    # The pre-empted run continues to the end, with flags that combine badly if anything does: validation at every
    # step, before the first logged step; a checkpoint at every step, one kept.
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 2), "--validation_steps", "1"]
    resume += ["--logging_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"]
    run_script(script, *args, *resume)
    assert (out / "manifest.json").is_file()  # the export's commit point
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step + 2}"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_both_signals_raise_the_stop_request(script):
    spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in handlers:
            stop = module.StopRequest(Accelerator(cpu=True))
            assert not stop()
            os.kill(os.getpid(), sig)
            time.sleep(0.1)
            assert stop()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_at_the_last_step_lets_the_run_finish(script, tiny_fixtures, tmp_path, monkeypatch):
    """The stop request arrives during the last step: the run ends as usual, with its checkpoint and export."""
    spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.StopRequest, "__call__", lambda self: True)
    monkeypatch.setattr(module.StopRequest, "__init__", lambda self, accelerator: None)
    monkeypatch.setattr(module.StopRequest, "close", lambda self: None)
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    module.main(module.parse_args([str(a) for a in tiny_run_args(script, tiny_fixtures, out)]))
    assert (out / "manifest.json").is_file()  # the export's commit point
    assert (out / "checkpoint-1" / "manifest.json").is_file()
