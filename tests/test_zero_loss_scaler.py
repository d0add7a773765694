"""Dynamic and static loss scaling rules."""
import torch

from zerocore.zero.config import ZeroConfig
from zerocore.zero.loss_scaler import DynamicLossScaler, StaticLossScaler, make_loss_scaler


def test_hysteresis_delays_backoff():
    s = DynamicLossScaler(init_scale=2.0 ** 16, window=1000, hysteresis=2, min_scale=1.0)
    s.update(overflow=True)
    assert s.scale == 2.0 ** 16                 # first overflow only uses up hysteresis
    s.update(overflow=True)
    assert s.scale == 2.0 ** 15


def test_growth_after_window_and_floor():
    s = DynamicLossScaler(init_scale=4.0, window=3, hysteresis=1, min_scale=2.0)
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 8.0
    for _ in range(5):
        s.update(overflow=True)
    assert s.scale == 2.0                       # never below min_scale


def test_state_round_trip():
    s = DynamicLossScaler(init_scale=8.0, window=2, hysteresis=2)
    s.update(overflow=True)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.hysteresis_left) == (8.0, 1)


def test_which_scaler():
    assert isinstance(make_loss_scaler(ZeroConfig(dtype=torch.float16)), DynamicLossScaler)
    st = make_loss_scaler(ZeroConfig(dtype=torch.float16, loss_scale=128.0))
    assert isinstance(st, StaticLossScaler) and st.scale == 128.0
    assert make_loss_scaler(ZeroConfig(dtype=torch.bfloat16)).scale == 1.0
