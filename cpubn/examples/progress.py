"""A dependency-free progress bar on stderr.

On a terminal it redraws one line in place; when stderr is a file or a pipe (CI logs) it
writes a single summary line per bar instead of a stream of carriage returns.
"""
import sys
import time


class ProgressBar:
    def __init__(self, total, label, enabled=True, stream=None, width=30):
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.count = 0
        self._drawn_fraction = -1.0
        self._start = time.perf_counter()
        self._interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._closed = False

    def update(self, n=1, note=""):
        self.count += n
        fraction = self.count / self.total if self.total else 1.0
        # Redraw at most every 1%: drawing is slower than a training step of these small nets.
        if self._interactive and (fraction - self._drawn_fraction >= 0.01 or self.count == self.total):
            self._drawn_fraction = fraction
            self._draw(fraction, note)

    def close(self, note=""):
        if not self.enabled or self._closed:
            return
        self._closed = True
        fraction = self.count / self.total if self.total else 1.0
        if self._interactive:
            self._draw(fraction, note)
            self.stream.write("\n")
        else:
            self.stream.write(self._line(fraction, note) + "\n")
        self.stream.flush()

    def _line(self, fraction, note):
        filled = int(round(self.width * fraction))
        elapsed = time.perf_counter() - self._start
        bar = "#" * filled + "." * (self.width - filled)
        text = f"{self.label} [{bar}] {self.count}/{self.total} {elapsed:5.1f}s"
        return f"{text} {note}" if note else text

    def _draw(self, fraction, note):
        self.stream.write("\r" + self._line(fraction, note) + "\x1b[K")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False
