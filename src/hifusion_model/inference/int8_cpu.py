"""int8 convolutions on the CPU: an exported graph quantised statically by ONNX Runtime.

The encoders' convolutions, ReLUs and max-pooling run on int8 weights (per output channel) and
uint8 activations; everything else (the z-score, the level alignment, the fusion, attention and
the head) stays fp32. On the development CPU (2-core AMD EPYC with VNNI) the bundled model ran
2.2× as fast as fp32 through ONNX Runtime end to end and 1.4× compiled bf16, with predictions
within a per-gene PCC of 0.993 of fp32 on every gene of the four HER2ST sections with images
(docs/experiments.md, 2026-12-04). Two choices carry that, both measured there:

* only the encoders: quantising the attention's and the head's matrix products as well dropped
  the worst gene to 0.934; the ReLUs and max-pooling quantised with the convolutions spare
  a dequantise and quantise between every two convolutions (23 % of the int8 graph's time);
* activation ranges by their extremes on the calibration spots: ranges cut at the 99.999th
  percentile held C4 as well but clipped tissue of another patient (B4's worst gene 0.956,
  against 0.994).

The ranges are calibrated once per set of weights on :data:`CALIBRATION_SPOTS` spots of the
packaged HER2ST C4 sample (its images only, never its counts), so that the same input always
gives the same prediction, whatever the job; the quantised graph is cached with the fp32
exports (:func:`~.fast_cpu.export_path`).
"""

from __future__ import annotations

import contextlib
import io
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..devices import cpu_has_vnni
from ..models.config import ModelConfig

#: Spots of the packaged sample the activation ranges are calibrated on.
CALIBRATION_SPOTS = 64
#: The operators quantised: the encoders' own. With their ReLUs and max-pooling in fp32, every
#: convolution's output was dequantised and quantised again on its way to the next (23 % of the
#: int8 graph's time); attention's and the head's matrix products stay fp32 for accuracy.
ENCODER_OPS = ["Conv", "Relu", "MaxPool"]


def weight_bits() -> int:
    """8, or 7 on an x86 CPU without VNNI: there ONNX Runtime's uint8 × int8 kernels add pairs
    of products in int16, which 8-bit weights can overflow (255 · 127 · 2 > 32,767) and 7-bit
    weights cannot (its ``reduce_range``)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return 7 if x86 and not cpu_has_vnni() else 8


def quantize(graph: bytes, calibration: Sequence[Sequence[Tensor]]) -> bytes:
    """``graph`` (fp32 ONNX, inputs ``input0``, ``input1``, …) with its :data:`ENCODER_OPS` in
    int8: activation ranges from the extremes over ``calibration`` (one tuple of inputs per
    call, of a size the graph takes), weights of :func:`weight_bits` bits."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """One call's inputs at a time (``set_range``): the calibrator keeps every activation
        of what it is given, so given all calls at once (8 spots each) it held 10 GB for the
        bundled model's per-spot part; call by call it merges each into its ranges and lets it
        go (2.6 GB; with one spot a call, 1.6 GB)."""

        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(())

        def __len__(self) -> int:
            return len(calibration)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds = iter(
                {f"input{i}": x.float().contiguous().numpy() for i, x in enumerate(inputs)}
                for inputs in calibration[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    ort.set_default_logger_severity(3)  # not the optimiser's notes on what it left unfolded
    with tempfile.TemporaryDirectory(prefix="hifusion-int8-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):
        fp32, folded, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "folded", "int8"))
        fp32.write_bytes(graph)
        # BatchNorm folded into the convolutions first, so that the folded weights are quantised
        quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
        quantize_static(str(folded), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=weight_bits() == 7,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=ENCODER_OPS,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1})  # one call at a time
        return int8.read_bytes()


def sample_patches(config: ModelConfig, chunk: int,
                   n: int = CALIBRATION_SPOTS) -> list[tuple[Tensor, Tensor]]:
    """``n`` spots spread over the packaged sample, as ``chunk``-spot ``(spot, region)`` pairs of
    ``[0, 1]`` float patches at ``config``'s sizes (the last chunk filled from the first spots,
    so that every call has the same size)."""
    from ..data.dataset import SpotDataset
    from ..data.sections import section_slide
    from ..samples import load_sample_section

    section = load_sample_section()
    picks = np.linspace(0, section.n_obs - 1, n).round().astype(int)
    picks = np.resize(picks, -(-n // chunk) * chunk)
    with section_slide(section) as slide:
        dataset = SpotDataset(section, slide, config, None)
        items = [dataset[int(i)] for i in picks]
    spot, region = (torch.stack([it[k] for it in items]) for k in ("spot", "region"))
    return [(spot[i:i + chunk], region[i:i + chunk]) for i in range(0, len(spot), chunk)]


__all__ = ["CALIBRATION_SPOTS", "ENCODER_OPS", "quantize", "sample_patches", "weight_bits"]
