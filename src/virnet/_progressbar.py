"""The command line's transfer progress bar on stderr.  Imports rich, so the command
line imports this module only when a bar is shown (start-up time matters)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ._units import format_rate as _format_rate


def format_rate(bytes_per_second: float) -> str:
    """The rate as the bar and the summary line both print it."""
    return _format_rate(bytes_per_second)


class RateColumn(ProgressColumn):
    """The average rate since the start (the same measure as the summary line), or the
    final rate once ``ProgressBar.finish()`` set it."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        if rate is None:
            elapsed = task.elapsed or 0.0
            rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(format_rate(rate), style="progress.data.speed")


class ProgressBar:
    """Bytes, rate and ETA of one transfer; the total may be unknown (a pipe).  While
    the transfer commits, the description says so."""

    def __init__(self, description: str, console: Console | None = None) -> None:
        self.description = description
        self.console = console if console is not None else Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            RateColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=None)
        self._total: int | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def total(self, n: int) -> None:
        self._total = n
        self._progress.update(self._task, total=n)

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def committing(self) -> None:
        text = f"committing {self.description}"
        self._progress.update(self._task, description=text)
        if self.console.is_terminal:
            self._progress.refresh()  # now, not at the next tick: a commit may be short
        else:
            # Without a terminal only the final bar is drawn: say it in a line.
            self.console.print(f"{text} ...", highlight=False, markup=False)

    def finish(self, done: int, elapsed: float) -> None:
        """The final state: everything done, at the rate the summary line reports."""
        self._progress.update(
            self._task,
            description=self.description,
            total=done if self._total is None else self._total,
            completed=done,
            rate=done / max(elapsed, 1e-9),
        )
