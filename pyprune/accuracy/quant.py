"""int8 post-training quantization for the CPU with PyTorch's own ``torch.ao.quantization``.

Path 1, ``"static"``: FX graph mode static quantization (``prepare_fx`` / ``convert_fx``) with the x86 backend's
default qconfig (per-channel int8 weights, uint8 activations calibrated on a few batches): convs and linears
run as int8 kernels (fbgemm / oneDNN). Path 2, ``"dynamic"``: ``quantize_dynamic`` on the Linear layers only
(int8 weights, activations quantized on the fly); convolutions stay float. ``mode="auto"`` tries static and
falls back to dynamic, saying why in the returned note.

torch.ao.quantization is deprecated in recent torch (2.13 prints a DeprecationWarning pointing to torchao)
but still works on the CPU; the warnings are silenced here because the user has chosen this path.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

MODES = ("auto", "static", "dynamic")


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for e in ("x86", "fbgemm", "onednn", "qnnpack"):
        if e in engines:
            return e
    raise RuntimeError(f"this torch build has no quantized CPU engine (supported: {engines})")


def quantize_int8(
    model: nn.Module,
    calibration: Iterable,
    example_inputs: torch.Tensor | tuple | None = None,
    mode: str = "auto",
    calibration_batches: int = 8,
) -> tuple[nn.Module, str]:
    """A quantized copy of ``model`` (float in, float out) and a note saying which path ran.

    calibration: iterable of (x, y) batches (or tensors); the first ``calibration_batches`` are run through the
    observers (static path). example_inputs: for the FX trace (default: the first calibration batch).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    n = calibration_batches
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration_batches must be an int >= 1, got {calibration_batches!r}")
    batches = []
    for b in calibration:
        batches.append(b[0] if isinstance(b, (tuple, list)) else b)
        if len(batches) >= calibration_batches:
            break
    if not batches:
        raise ValueError("calibration is empty: int8 static quantization needs at least one batch")
    if example_inputs is None:
        example_inputs = (batches[0],)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    engine = _engine()
    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            why = ""
            if mode in ("auto", "static"):
                try:
                    from torch.ao.quantization import get_default_qconfig_mapping
                    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

                    prepared = prepare_fx(
                        float_model, get_default_qconfig_mapping(engine), tuple(example_inputs)
                    )
                    with torch.no_grad():
                        for x in batches:
                            prepared(x)
                    q = convert_fx(prepared)
                    with torch.no_grad():
                        q(*example_inputs)  # fails here, not later, if a kernel is missing
                    return q, f"int8 static (FX, {engine}): convs and linears int8"
                except Exception as exc:
                    if mode == "static":
                        raise RuntimeError(
                            f"FX static int8 quantization failed on this torch: {exc}"
                        ) from exc
                    why = f"static FX failed ({type(exc).__name__}: {str(exc)[:80]}); "
            q = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
            return q, why + f"int8 dynamic ({engine}): linears int8, convs float"
        finally:
            torch.backends.quantized.engine = old


def is_quantized(model: nn.Module) -> bool:
    """True if any submodule is a quantized (torch.ao.nn.quantized*) module."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
