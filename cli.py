"""The command line of every script: flags, their value types, one-line errors, rank-0 printing,
progress bars. Its boundary: argv, stdout and stderr only. No tensors, models or data live here;
those have their own files.
    p = parser(__doc__); p.add_argument("--n", type=COUNT); args = p.parse_args(argv)
"""
import argparse
import contextlib
import functools
import math
import os
import sys

import torch
from tqdm import tqdm


class DataError(Exception):
    """Bad or missing data or checkpoint: the scripts print it with die(), one line."""


def die(msg, code=2):
    """Bad input: one line on stderr, exit code 2, no traceback (also argparse's p.error)."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def script(main):
    """Wraps a script's main(argv): a DataError in it ends the script with its one line (die)."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except DataError as err:
            die(str(err))
    return run


def print0(*args):
    """print, flushed, on rank 0 only: under torchrun one line, not one per process."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


# --- argparse: the parser and the value types, named by what they accept

def parser(doc, device=True, dist=False):
    """A script's argparse: --help shows its docstring, a bad flag is one line (die).
    device: --device (cuda if any); dist: --dist_timeout, for the scripts that run under
    torchrun."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda (under torchrun: cuda:LOCAL_RANK), cuda:N or cpu")
    if dist:
        p.add_argument("--dist_timeout", type=COUNT, default=7200,
                       help="seconds a process waits for the others in a collective "
                       "(e.g. rank 0 writing last.pt)")
    return p


def int_list(text):
    """An argparse type: integers like 1,2,4."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers like 1,2,4, got {text!r}") from None


def steps_list(text):
    """An argparse type: step counts like 1,2,4, each >= 1."""
    with contextlib.suppress(ValueError):
        if min(steps := [int(t) for t in text.split(",")]) >= 1:
            return steps
    raise argparse.ArgumentTypeError(f"must be integers >= 1 like 1,2,4, got {text}")


def classes_list(text):
    """An argparse type: 'all' (None) or class ids like 3,5."""
    try:
        return None if text == "all" else [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers like 1,2,4 (or 'all'), got {text!r}") from None


def number(lo, hi=None, cast=float, lo_open=False, hi_open=False):
    """An argparse type: a finite number (an int for cast=int) in [lo, hi]; lo_open, hi_open make an
    end open, and with no hi it is >= lo. Else argparse's one-line error naming the flag, such as:
    argument --alpha: must be a number in (0, 90), got '95'."""
    what = "an integer" if cast is int else "a number"
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    what += f" {'>' if lo_open else '>='} {lo}" if hi is None else f" in {left}{lo}, {hi}{right}"

    def parse(text):
        # A text that is not a number raises ValueError here and ends at the error below.
        with contextlib.suppress(ValueError):
            v = cast(text)
            above = v > lo or v == lo and not lo_open
            below = hi is None or v < hi or v == hi and not hi_open
            if math.isfinite(v) and above and below:
                return v
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return parse


ANGLE = number(0, 90, lo_open=True, hi_open=True)       # degrees, strictly between 0 and 90
PROB = number(0, 1)                                     # a probability in [0, 1]
DECAY = number(0, 1, hi_open=True)                      # an EMA decay in [0, 1)
NONNEG = number(0)                                      # a real >= 0: loss weights, rates, epochs
POSITIVE = number(0, lo_open=True)                      # a real > 0: learning rates, clips, scales
COUNT = number(1, cast=int)                             # an integer >= 1: sizes and counts
NONNEG_INT = number(0, cast=int)                        # an integer >= 0: steps, seeds, workers, class ids
SEED = number(0, 2 ** 32 - 1, cast=int)                 # a seed numpy and torch both take


# --- progress bars: tqdm on a terminal, plain lines in a log file

class Lines(tqdm):
    """tqdm for a log file or pipe: a plain line at most every mininterval s and one at the end,
    never a \\r."""
    # No monitor thread redrawing the bar.
    monitor_interval = 0

    def display(self, msg=None, pos=None, last=False):
        # shown: the (time, n) of the last line written.
        shown = getattr(self, "shown", (-math.inf, None))
        due = self._time() - shown[0] >= self.mininterval
        if msg is None and (due or last and shown[1] != self.n):
            self.shown = (self._time(), self.n)
            print(self, file=self.fp, flush=True)

    def clear(self, nolock=False):
        # A line, once written, has nothing to erase.
        pass

    def close(self):
        if not self.disable:
            # The last line shows the overall rate, as tqdm's own last line does.
            self._ema_dt = lambda: None
            self.display(last=True)
        # tqdm's close then writes nothing more.
        self.leave = False
        super().close()


def progress(iterable=None, **kw):
    """tqdm(iterable, **kw) on a terminal. To a file or pipe (Slurm, > log): Lines, a line every
    TQDM_MININTERVAL seconds (default 30)."""
    if getattr(kw.get("file") or sys.stderr, "isatty", lambda: False)():
        return tqdm(iterable, **kw)
    every = float(os.environ.get("TQDM_MININTERVAL", 30))
    return Lines(iterable, **{"mininterval": every, "ascii": True, **kw})
