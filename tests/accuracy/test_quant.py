import pytest
import torch

from pyprune.accuracy import quantize_int8
from pyprune.accuracy.lowrank import relative_error
from pyprune.accuracy.quant import is_quantized


@pytest.mark.parametrize("mode", ["auto", "dynamic"])
def test_int8_runs_and_stays_close(trained_lenet, small_task, mode):
    x, _ = next(iter(small_task[1]))
    q, note = quantize_int8(trained_lenet, small_task[0], mode=mode)
    assert is_quantized(q) and not is_quantized(trained_lenet)
    assert ("static" in note) == (mode == "auto")  # the static FX path works on this torch's CPU build
    with torch.no_grad():
        ref, out = trained_lenet(x), q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert relative_error(ref, out) < 0.1
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.95


def test_int8_bad_input(trained_lenet):
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_int8(trained_lenet, [])
    with pytest.raises(ValueError, match="mode"):
        quantize_int8(trained_lenet, [torch.zeros(1, 1, 32, 32)], mode="int4")
    with pytest.raises(ValueError, match="calibration_batches must be an int >= 1"):  # 0 calibrated on 1
        quantize_int8(trained_lenet, [torch.zeros(1, 1, 32, 32)], calibration_batches=0)
