"""Entry point of the ``cryofield`` command.

Each sub-command lives in ``cryofield.cli.<name>`` and defines ``add_arguments(parser)``
and ``run(args) -> int``; its module docstring's first line is its one-line summary and
the rest (with an example) is its ``--help`` epilog. Modules are imported only when
their command runs, so ``cryofield --help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from cryofield import __version__
from cryofield.errors import CryofieldError

#: command name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("cryofield.cli.info", "Summarise a particle stack or metadata file."),
    "parse": ("cryofield.cli.parse", "Write a particle table (.npz) from .star/.cs/.mrcs/.txt."),
    "downsample": ("cryofield.cli.downsample", "Fourier-crop a particle stack to a smaller box."),
    "simulate": ("cryofield.cli.simulate", "Simulate a particle dataset with exact truth."),
    "backproject": ("cryofield.cli.backproject", "Reconstruct a map from known poses."),
    "train": ("cryofield.cli.train", "Neural ab initio / fixed-pose reconstruction."),
    "analyze": ("cryofield.cli.analyze", "Latent-space analysis, volumes and HTML report."),
    "eval-vol": ("cryofield.cli.eval_vol", "Generate volumes at chosen latent points."),
    "select": ("cryofield.cli.select", "Write a particle subset back as .star/.cs."),
    "export": ("cryofield.cli.export", "Export poses/latents/classes to RELION/cryoSPARC."),
    "evaluate": ("cryofield.cli.evaluate", "Score a run against simulation truth."),
    "demo": ("cryofield.cli.demo", "Simulate the demo dataset and run the whole pipeline."),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="cryofield",
        description="Neural ab initio heterogeneous cryo-EM reconstruction.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'cryofield COMMAND --help' for details.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cryofield {__version__}")
    parser.add_argument("command", nargs="?", help="command to run")
    return parser


def build_command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """Import the module of command ``name`` and return its parser and module."""
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    doc = (module.__doc__ or summary).strip()
    epilog = doc.split("\n", 1)[1].strip() if "\n" in doc else None
    parser = argparse.ArgumentParser(
        prog=f"cryofield {name}",
        description=summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Run ``cryofield``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser = _top_parser()
        parser.parse_args(argv)
        parser.print_help()
        return 0 if argv else 1
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cryofield: unknown command '{name}' (see 'cryofield --help')", file=sys.stderr)
        return 2
    parser, module = build_command_parser(name)
    args = parser.parse_args(rest)
    from cryofield.logs import close_run_log, log_to_run_log

    close_run_log()  # only this command's run.log gets its messages
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe (cryofield info X | head -1) shows up here
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except (CryofieldError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        msg = str(err) if isinstance(err, CryofieldError) else os_error_message(err)
        line = f"cryofield {name}: error: {msg}"
        log_to_run_log(line)
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log_to_run_log(f"cryofield {name}: interrupted")
        print(f"cryofield {name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        log_to_run_log(f"cryofield {name}: crashed:\n{traceback.format_exc()}")
        raise
    finally:
        close_run_log()


def _silence_stdout() -> None:
    """After the reader of stdout went away: send what is left to /dev/null, so that the
    interpreter's final flush does not fail again (the recipe of the Python docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (tests)
        pass


#: errno -> (what to say, what to do)
_OS_ADVICE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("cannot write", "free some space or choose another output path (-o)"),
    errno.EDQUOT: ("cannot write", "free some space or choose another output path (-o)"),
    errno.EROFS: ("cannot write", "choose another output path (-o)"),
    errno.EACCES: ("cannot access", "check its permissions or choose another path"),
    errno.EPERM: ("cannot access", "check its permissions or choose another path"),
    errno.EMFILE: ("cannot open", "too many open files: raise 'ulimit -n'"),
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the file, the reason, what to do."""
    reason = err.strerror or (os.strerror(err.errno) if err.errno else None) or str(err)
    path = err.filename if err.filename is not None else None
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    if err.errno in _OS_ADVICE:
        verb, advice = _OS_ADVICE[err.errno]
        where = f" {path}" if path is not None else ""
        return f"{verb}{where}: {reason}; {advice}"
    return f"{path}: {reason}" if path is not None else reason


if __name__ == "__main__":
    sys.exit(main())
