"""Pneumonia detector for pediatric chest X-rays: train, evaluate and explain a custom CNN.

Usage: `python main.py` (Kaggle archive in archive/), `python main.py --demo` (synthetic phantoms),
`python main.py evaluate --checkpoint runs/X/best.pt --data DIR`, `python main.py predict IMG --checkpoint ...`,
`python main.py calibrate --checkpoint runs/X/best.pt --data SITE_DIR [--adapt-bn]`,
`python main.py export --checkpoint runs/X/best.pt`.
This file parses the command line and turns every failure into an exit status; app/commands.py wires the steps.
Parsing needs no torch, so `--help` and a refused flag answer at once; torch loads once the command is accepted.
"""
import os
import sys

from lib.errors import Interrupted, UserError
from lib.names import say
from app.settings import parse_command


def main(argv: list[str] | None = None) -> int:
    """Run training or a sub-command (evaluate, predict, calibrate, export); user errors print one sentence and
    return 2, Ctrl-C in a sub-command one line and 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 is shown escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        command, parsed = parse_command(argv)
        from app import commands  # torch and every module below it: only once the command line is accepted

        return commands.RUN[command](parsed)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same refusal: say it once
            say(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        say(str(err), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before a scoring command made its folder, or outside training's own handler
        say("interrupted (Ctrl-C); a training run folder with a last.pt continues with --resume", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk or a folder that became unwritable mid-run
        say(f"error: could not write '{err.filename or 'a file'}' ({err.strerror or err}); every file written "
            f"before it is complete, checkpoints included: free space or fix permissions, then --resume the run "
            f"folder or start again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
