"""Runs the repo's scripts for the tests without paying their imports on every run.

The test harness (conftest.run_script) starts this file once per test process. It imports the packages every
script needs (torch, torchvision, accelerate, transformers, diffusers: most of a tiny run's time), then reads one
JSON request per line from stdin: {"argv", "cwd", "env", "stdout", "stderr"}. For each it forks a child that runs
argv[0] as `__main__` with that argv, working folder and environment, stdout and stderr going to the two files, as
`python script args...` would; the exit code follows Python's rules (SystemExit, an uncaught exception: 1). It
answers two lines: the child's pid, then its exit code (negative: the signal that killed it).

Each run is still its own process. What differs from `python script.py`: the imports above ran before the run (and
with the environment this process started with), and all runs share one hash seed.
"""

import atexit
import json
import os
import random
import runpy
import sys
import threading
import traceback

import accelerate  # noqa: F401  (importing is the point)
import numpy as np
import torch  # noqa: F401
import torchvision  # noqa: F401
import transformers  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (loads diffusers' model modules)


def exit_code(stop):
    """What the interpreter does with a SystemExit that reaches the top."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    random.seed()  # the parent's random states are not this process's
    np.random.seed()
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = exit_code(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    return code


def main():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = run_child(request)
            except SystemExit as stop:
                code = exit_code(stop)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
