"""The live progress line printed while training.

    line = ProgressLine()
    print("\\r" + line.format(step, clock.progress, loss.item(), h["lr_mult"], dt, tok_s, mfu,
                             clock.remaining_seconds, epoch), end="", flush=True)
gives
    step 00042 (12.3%) | loss 3.4568 | lrm 1.00 | 123.4 ms | 531,234 tok/s | mfu 12.3% | epoch 1 | 263 s left

The loss shown is an exponential moving average (beta 0.9) of the losses passed in,
debiased so the first values are not pulled toward 0. Either call `update(loss)` on every
step and `format(...)` only on the steps you print (format then does not count that step's
loss twice), or call `format` on every step and let it fold the loss in itself.
"""
import math

EMA_BETA = 0.9


class ProgressLine:
    def __init__(self, beta: float = EMA_BETA):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self._ema = 0.0
        self._count = 0
        self._updated_since_format = False

    def update(self, loss: float) -> float:
        """Fold one loss into the average and return the debiased average."""
        self._ema = self.beta * self._ema + (1.0 - self.beta) * float(loss)
        self._count += 1
        self._updated_since_format = True
        return self.smoothed

    @property
    def smoothed(self) -> float | None:
        if self._count == 0:
            return None
        return self._ema / (1.0 - self.beta ** self._count)

    def format(self, step: int, progress: float, loss: float, lr_mult: float, step_seconds: float,
               tok_per_sec: float, mfu: float | None, remaining_s: float, epoch: int | None) -> str:
        """One status line (no newline) showing the smoothed loss.

        `loss` is this step's loss; it is folded into the average unless `update()` has been
        called since the last `format()` (then the caller already folded it in).
        """
        if not self._updated_since_format:
            self.update(loss)
        self._updated_since_format = False
        smoothed = self.smoothed
        mfu_text = "unknown" if mfu is None or not math.isfinite(mfu) else f"{mfu:.1f}%"
        epoch_text = "?" if epoch is None else str(epoch)
        return " | ".join((
            f"step {step:05d} ({100.0 * progress:.1f}%)",
            f"loss {smoothed:.4f}",
            f"lrm {lr_mult:.2f}",
            f"{1000.0 * step_seconds:.1f} ms",
            f"{round(tok_per_sec):,} tok/s",
            f"mfu {mfu_text}",
            f"epoch {epoch_text}",
            f"{max(0.0, remaining_s):.0f} s left",
        ))
