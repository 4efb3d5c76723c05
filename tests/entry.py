"""The entry points in pipelines/ called in this process: ``main(argv)`` as a user's command
line runs it, without the seconds a new interpreter spends importing torch. For input that
must be refused: Ray may not start, and the environment is left as it was."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
_loaded: dict[str, ModuleType] = {}


def load(script: str) -> ModuleType:
    """pipelines/<script> as a module, executed once per test process."""
    if script not in _loaded:
        name = f"pipelines_{Path(script).stem}"
        spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle find a class's module by its name
        spec.loader.exec_module(module)
        _loaded[script] = module
    return _loaded[script]


@dataclass(frozen=True)
class Exit:
    """What the shell would see: the exit status and the two streams."""

    code: int
    out: str
    err: str

    def one_line(self, message: str) -> None:
        """Refused with status 2 in one line of stderr that holds ``message``."""
        assert self.code == 2, (self.code, self.err[-2000:])
        assert message in self.err and len(self.err.strip().splitlines()) == 1, self.err[-2000:]


def call(capfd, script: str, *argv: str) -> Exit:
    """``main(argv)`` of pipelines/<script>, its output read from file descriptors 1 and 2
    (pytest's capfd) as a shell would; an argparse error (SystemExit) gives its status."""
    module = load(script)
    capfd.readouterr()  # only what main prints
    with ray_refused(), environment_kept():
        try:
            code = module.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    out, err = capfd.readouterr()
    if isinstance(code, str):  # what the interpreter does with sys.exit("message")
        code, err = 1, err + code + "\n"
    return Exit(0 if code is None else code, out, err)


def ray_is_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def ray_refused():
    """ray.init fails the test: in-process, a local Ray would outlive the call and clash with
    the Ray of tests in the other lane."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called: the entry point did not refuse the input before Ray")

    started, ray.init = ray.init, refuse
    try:
        yield
    finally:
        ray.init = started
    assert not ray.is_initialized()


@contextlib.contextmanager
def environment_kept():
    """os.environ and the working directory as they were before the call."""
    environ, cwd = dict(os.environ), os.getcwd()
    try:
        yield
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        os.chdir(cwd)
