"""Names are data: a file or folder name made safe for each place it is shown or stored.

Usage: `print(shown(message))`, `writer.writerow([cell(v) for v in row])` and `uncell(text)` to read it back,
`code(name)` for a Markdown code span. A name comes from the user's disk and may hold anything a file system
allows: spreadsheet formulas, terminal escape sequences, backticks, `$...$`, bytes that are not UTF-8.
"""
import re
import sys

# a spreadsheet reads a cell starting with one of these as a formula (OWASP, "CSV injection")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# one or more apostrophes before a formula character: what `cell` adds one apostrophe to, and `uncell` removes
_GUARDED = re.compile(r"^'*[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# C0 controls but newline and tab, DEL, C1 controls: a terminal acts on them (ESC starts a sequence)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\udc80-\udcff]")  # a byte that was not UTF-8, as Python's file-name decoding keeps it


def cell(value):
    """A CSV cell a spreadsheet shows as text: a string that would start a formula gets a leading apostrophe.

    Plain numbers stay numbers; a string already starting with apostrophes before a formula character gets one
    more, so that `uncell` gives every string back as it was.
    """
    if isinstance(value, str) and _GUARDED.match(value) and not _NUMBER.match(value):
        return "'" + value
    return value


def uncell(text: str) -> str:
    """The string `cell` was given."""
    return text[1:] if _GUARDED.match(text) and text.startswith("'") else text


def printable(text: str) -> str:
    """`text` with control characters and undecodable bytes as visible escapes (\\x1b, \\xe9); newlines stay."""
    text = _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xdc00:02x}", text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def shown(text) -> str:
    """A message for the terminal, with every name in it printable (nothing in it can move the cursor)."""
    return printable(str(text))


def code(text) -> str:
    """A Markdown code span holding `text` literally: its fence is longer than any run of backticks inside, so a
    backtick in a name cannot close it and let HTML out (CommonMark 6.1)."""
    text = printable(str(text)).replace("\n", " ")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def say(text, file=None) -> None:
    """print(shown(text)): a line for the terminal that carries names."""
    print(shown(text), file=file or sys.stdout)
