"""The training progress bar, and the one way the recipe prints: through the bar, so lines never land inside it."""
from __future__ import annotations


class Progress:
    """tqdm when installed and enabled, else a plain line every 10 % of the steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled, self.bar = total, initial, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, loss: float) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"step {self.n}/{self.total} loss {loss:.4f}", flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
