"""Progress through a long job: a tqdm bar on a terminal, one plain line per finished item anywhere else.

A bar redraws itself with carriage returns; written to a log file, a pipe or CI it becomes one line per redraw,
and a sweep's bar with each run's bar inside it piles up as nested, repeated lines. So where the output is not
a terminal, no bar is drawn: `Progress` prints one plain line as each item (a run, a setting, a figure) finishes,
and inner bars (`bar_disabled`) stay silent.

Usage::

    with Progress(len(plan), "sweep", unit="run", enabled=options.progress) as progress:
        for work in plan:
            progress.set_postfix_str(work.label)   # on a terminal: shown beside the bar
            ...
            progress.update(1)                     # elsewhere: "sweep 3/8 runs: sst2 t1 s0 done (41 s)"
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm.auto import tqdm


def is_terminal(stream: object = None) -> bool:
    """Whether `stream` (a text stream; default: standard error, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())  # type: ignore[union-attr]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_disabled(enabled: bool) -> bool:
    """`disable=` for a tqdm bar nested inside a `Progress` item: drawn only when enabled and on a terminal."""
    return not (enabled and is_terminal())


class Progress:
    """`total` items: a tqdm bar on a terminal; elsewhere one plain line per finished item on standard error."""

    def __init__(self, total: int, description: str, unit: str = "item", enabled: bool = True, initial: int = 0):
        self.stream = sys.stderr
        self.total, self.description, self.unit, self.n = total, description, unit, initial
        self.plain = enabled and not is_terminal(self.stream)
        self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, file=self.stream,
                        disable=not enabled or self.plain)
        self.current = ""  # the item being worked on (the bar's postfix)
        self.started = time.monotonic()

    def set_postfix_str(self, text: str) -> None:
        self.current = text
        self.bar.set_postfix_str(text)

    def update(self, n: int = 1, label: str | None = None, note: str = "done") -> None:
        """`n` more items finished (`label`: which one, default the postfix last set; `note`: how)."""
        self.n += n
        self.bar.update(n)
        if self.plain:
            what = label if label is not None else self.current
            seconds = time.monotonic() - self.started
            print(f"{self.description} {self.n}/{self.total} {self.unit}s: {what + ' ' if what else ''}{note} "
                  f"({seconds:.0f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
