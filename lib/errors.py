"""The exceptions every command turns into one sentence and an exit status; torch-free, so main.py can catch them
before anything heavy is imported. Usage: `raise UserError("what is wrong, and what to do")`."""


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder); printed as one sentence, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM in a sub-command; its message names the folder left INCOMPLETE (exit status 130)."""
