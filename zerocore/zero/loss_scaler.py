"""Loss scaling for fp16 training: a static scale, or a dynamic one that backs off on overflow.

Dynamic rule (DeepSpeed-compatible): start at 2**initial_scale_power; an overflow skips the step and, once
`hysteresis` overflows have been seen since the last scale change, halves the scale (never below min_scale);
after `window` consecutive clean steps the scale doubles and the hysteresis budget is restored.

>>> s = DynamicLossScaler(init_scale=8.0, window=2, hysteresis=1, min_scale=1.0)
>>> s.update(overflow=True); s.scale
4.0
>>> s.update(overflow=False); s.update(overflow=False); s.scale
8.0
"""
from __future__ import annotations


class StaticLossScaler:
    """A fixed scale (1.0 when no scaling is wanted); overflowing steps are still skipped."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "static", "scale": self.scale}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, factor: float = 2.0):
        self.scale = float(init_scale)
        self.window, self.hysteresis, self.min_scale, self.factor = window, hysteresis, float(min_scale), factor
        self.hysteresis_left = hysteresis
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.clean_steps = 0
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.hysteresis_left -= 1
            return
        self.clean_steps += 1
        if self.clean_steps % self.window == 0:
            self.scale *= self.factor
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"kind": "dynamic", "scale": self.scale, "hysteresis_left": self.hysteresis_left,
                "clean_steps": self.clean_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.hysteresis_left = int(sd.get("hysteresis_left", self.hysteresis))
        self.clean_steps = int(sd.get("clean_steps", 0))


def make_loss_scaler(cfg):
    """The scaler a ZeroConfig asks for: dynamic for fp16 without a fixed loss_scale, else static."""
    import torch
    if cfg.dtype != torch.float16:
        return StaticLossScaler(cfg.loss_scale or 1.0)
    if cfg.loss_scale is not None:
        return StaticLossScaler(cfg.loss_scale)
    return DynamicLossScaler(2.0 ** cfg.initial_scale_power, cfg.loss_scale_window, cfg.hysteresis,
                             cfg.min_loss_scale)
