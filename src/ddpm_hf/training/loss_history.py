"""The run's loss curve: ``(step, loss)`` rows appended to ``loss_history.csv`` in the output folder at every
logging step, and drawn as ``loss.png`` (matplotlib) with each export, for the model card.

The CSV lives beside the checkpoints, so it outlasts a resume: a resumed run first drops the rows past the step it
resumed from (they are replayed, bit-identically), then appends. Rows are appended one line at a time; a line cut
short by a crash is skipped when read.
"""

from __future__ import annotations

import math
import os

HISTORY_FILENAME = "loss_history.csv"
PLOT_FILENAME = "loss.png"
_HEADER = "step,loss\n"


def read_history(output_dir: str) -> list[tuple[int, float]]:
    """The ``(step, loss)`` rows of ``output_dir``'s history, in file order (malformed lines skipped).

    Args:
        output_dir: the run's output folder.

    Returns:
        The rows; empty when there is no history yet.
    """
    path = os.path.join(output_dir, HISTORY_FILENAME)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            fields = line.strip().split(",")
            try:
                rows.append((int(fields[0]), float(fields[1])))
            except (ValueError, IndexError):  # the header, or a line a crash cut short
                continue
    return rows


def truncate_history(output_dir: str, step: int) -> None:
    """Keep only the rows up to ``step`` (where a resumed run stands; 0 for a fresh run), replacing the file
    atomically."""
    path = os.path.join(output_dir, HISTORY_FILENAME)
    if not os.path.isfile(path):
        return
    kept = [(s, loss) for s, loss in read_history(output_dir) if s <= step]
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(_HEADER + "".join(f"{s},{loss!r}\n" for s, loss in kept))
    os.replace(partial, path)


def append_loss(output_dir: str, step: int, loss: float) -> None:
    """Append one ``(step, loss)`` row (the header first when the file is new)."""
    path = os.path.join(output_dir, HISTORY_FILENAME)
    new = not os.path.isfile(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write((_HEADER if new else "") + f"{int(step)},{float(loss)!r}\n")


def plot_history(rows: list[tuple[int, float]], path: str) -> bool:
    """Draw the loss against the optimizer step (log scale when the loss is positive) as a PNG.

    Args:
        rows: ``(step, loss)`` rows.
        path: the PNG to write.

    Returns:
        False (nothing written) when no row has a finite loss.
    """
    rows = [(s, loss) for s, loss in rows if math.isfinite(loss)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs headless
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([s for s, _ in rows], [loss for _, loss in rows], linewidth=1)
    if all(loss > 0 for _, loss in rows):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (mean over the logging window)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return True
