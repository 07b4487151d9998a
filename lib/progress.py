"""Progress for people: bars on a terminal, plain lines when the output goes to a file.

Usage: `bar = progress.track(n, "decoding images", "img"); bar.update(); bar.close()`.
A log redirected to a file (nohup, a cluster job, CI) would otherwise fill with tqdm's carriage-return
frames; there each step instead prints one line with its count, time and rate when it ends, and one a minute
with the rate and the time left while it runs (an archive takes hours).
"""
import sys
import time

from tqdm import tqdm


def on_terminal() -> bool:
    """Whether both stdout and stderr are terminals: only then are progress frames readable."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


EVERY = 60.0  # seconds between a log's lines while a step runs


class Lines:
    """tqdm's interface, for logs: a line a minute with the rate and the time left, and one when closed."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n, self.start = total, desc, unit, initial, time.perf_counter()
        self.initial, self.closed, self.said = initial, False, self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.said >= EVERY and self.n < self.total:
            self.said = now
            rate = (self.n - self.initial) / (now - self.start)
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: {self.n:,} of {self.total:,} {self.unit}, {rate:,.1f} {self.unit}/s, "
                  f"{left / 60:.0f} min left", flush=True)

    def set_postfix(self, *args, **kwargs) -> None:
        """Shown on a terminal only; a log has its own line per epoch."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done, seconds = self.n - self.initial, time.perf_counter() - self.start
        per_second = done / seconds if seconds > 0 else 0.0
        rate = ""
        if done:
            rate = f" ({per_second:,.0f} {self.unit}/s)" if per_second >= 10 else f" ({per_second:.2g} {self.unit}/s)"
        print(f"{self.desc}: {done:,} {self.unit} in {seconds:.1f} s{rate}", flush=True)


class _Off:
    """Nothing shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def track(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A progress bar on a terminal, a closing line in a log, nothing when not `enabled` or when there is no work."""
    if not enabled or total <= 0:
        return _Off()
    if on_terminal():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return Lines(total, desc, unit, initial)
