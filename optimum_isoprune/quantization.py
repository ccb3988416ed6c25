"""int8 quantization of an exported ONNX classifier with onnxruntime's own tools.

- ``int8-dynamic``: weights of the MatMuls stored as int8, activations quantized on the fly per batch.
  No data needed; it speeds up transformers (their work is MatMuls), not convolutions.
- ``int8-static``: weights and activations of Conv / MatMul / Gemm in int8 (QDQ format, per-channel
  weights, uint8 activations), activation ranges calibrated on images: the same calibration data as
  pruning (`IsomorphicPruningConfig.num_calibration_batches` x `calibration_batch_size`, seeded).

The accuracy of a quantized model is measured, not assumed: see `optimum_isoprune.export.evaluate_onnx`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from .calibration import calibration_batches
from .configuration import IsomorphicPruningConfig
from .errors import CalibrationDataError
from .export import INPUT_NAME, check_onnx_model, require

logger = logging.getLogger(__name__)

__all__ = ["QUANTIZATION_MODES", "quantized_file_name", "quantize_onnx"]

QUANTIZATION_MODES = ("int8-dynamic", "int8-static")
# Dynamic quantization of Conv becomes ConvInteger, slower than fp32 on CPUs: only MatMuls are quantized.
_DYNAMIC_OPS = ["MatMul"]
# Quantizing LayerNorm / Softmax / elementwise ops costs accuracy and little time: only the heavy ops.
_STATIC_OPS = ["Conv", "MatMul", "Gemm"]


def quantized_file_name(mode: str) -> str:
    """'int8-dynamic' -> 'model_int8_dynamic.onnx'."""
    _check_mode(mode)
    return f"model_{mode.replace('-', '_')}.onnx"


def _check_mode(mode: str) -> None:
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"Unknown quantization {mode!r}; expected one of {', '.join(QUANTIZATION_MODES)}.")


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over `calibration_batches`."""

    def __init__(self, batches: Iterator[tuple[Any, Any]], num_channels: int, image_size: int) -> None:
        self._batches = batches
        self._shape = (num_channels, image_size, image_size)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        pixels = batch[0]
        if tuple(pixels.shape[1:]) != self._shape:
            raise CalibrationDataError(
                f"Calibration pixel_values have shape {tuple(pixels.shape)}, the ONNX model takes (batch, "
                f"{', '.join(map(str, self._shape))}); prepare the images for this model (prepare_dataset(..., model=model))."
            )
        self.count += 1
        return {INPUT_NAME: np.ascontiguousarray(pixels.numpy(), dtype=np.float32)}


def _input_chw(path: str) -> tuple[int, int]:
    onnx = require("onnx")
    model = onnx.load(path, load_external_data=False)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return dims[1], dims[2]


def quantize_onnx(
    onnx_path: str | os.PathLike,
    mode: str = "int8-dynamic",
    output_path: str | os.PathLike | None = None,
    calibration_dataset: Any = None,
    num_calibration_batches: int | None = None,
    calibration_batch_size: int | None = None,
    seed: int | None = None,
) -> str:
    """Write an int8 copy of an exported model (default: beside it, `model_int8_dynamic.onnx` /
    `model_int8_static.onnx`) and return its path.

    `int8-static` needs `calibration_dataset` (a `datasets.Dataset` with `pixel_values`, a DataLoader or a
    tensor (N, C, H, W), as for pruning); batches and seed default to `IsomorphicPruningConfig`'s.
    """
    _check_mode(mode)
    quantization = require("onnxruntime.quantization")
    onnx_path = os.fspath(onnx_path)
    check_onnx_model(onnx_path)
    output_path = os.fspath(output_path or os.path.join(os.path.dirname(onnx_path), quantized_file_name(mode)))
    if mode == "int8-static" and calibration_dataset is None:
        raise CalibrationDataError(
            "int8-static quantization needs calibration images (calibration_dataset=, or --calibration-dataset): "
            "give the data used for pruning, or use int8-dynamic, which needs none."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(IsomorphicPruningConfig)}
    with tempfile.TemporaryDirectory(prefix="isoprune-quant-") as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        # shape inference and graph fusions first, as onnxruntime recommends before quantizing
        quantization.shape_inference.quant_pre_process(onnx_path, prepared, skip_symbolic_shape=False)
        if mode == "int8-dynamic":
            quantization.quantize_dynamic(
                prepared,
                output_path,
                op_types_to_quantize=_DYNAMIC_OPS,
                weight_type=quantization.QuantType.QInt8,
                per_channel=False,
            )
        else:
            channels, size = _input_chw(onnx_path)
            batches = calibration_batches(
                calibration_dataset,
                calibration_batch_size or defaults["calibration_batch_size"],
                num_calibration_batches or defaults["num_calibration_batches"],
                defaults["seed"] if seed is None else seed,
            )
            reader = _CalibrationReader(iter(batches), channels, size)
            quantization.quantize_static(
                prepared,
                output_path,
                reader,
                quant_format=quantization.QuantFormat.QDQ,
                op_types_to_quantize=_STATIC_OPS,
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )
            if reader.count == 0:
                raise CalibrationDataError("The calibration data is empty; int8-static needs at least one batch.")
            logger.info("Calibrated %s on %d batches.", output_path, reader.count)
    check_onnx_model(output_path)
    return output_path
