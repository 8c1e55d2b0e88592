"""Static int8 quantisation of an exported model with ONNX Runtime.

Four choices, each measured on the *validation* split (mean |logit change|
against fp32, 517 images; ``docs`` in the v1 closing note):

- weights per output channel: per-tensor int8 dropped the test AUROC to 0.78,
  because the depthwise convolutions' channels differ by orders of magnitude;
- ``reduce_range`` (7-bit weights): x86 CPUs with AVX2 but without VNNI add
  pairs of u8×s8 products in 16 bits, which saturates with full 8-bit weights
  (mean |Δlogit| 2.7 → 2.0);
- activations as uint8 (u8×s8, the product x86's integer kernels are built
  for): with int8 activations ONNX Runtime left the depthwise convolutions in
  float, wrapped in quantise/dequantise pairs, and the model ran slower than
  fp32 (15.3 ms → 10.0 ms per image on one thread with uint8, 7.2 ms on two;
  the error was the same, 0.97 → 0.96);
- the first convolution (it sees the raw image) and the last layers (the
  1×1 head convolution, the heat-map branch, the classifier) stay in
  float: they are a small share of the compute and most of the error
  (2.0 → 0.97; logits have a standard deviation of 8.8).

Activation ranges are calibrated (MinMax) on images of the training split only.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pneumoscan.inputs.preprocessing import preprocess_file
from pneumoscan.learning.data import Record

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_IMAGES = 256


def calibration_sample(records: list[Record], n: int = DEFAULT_CALIBRATION_IMAGES) -> list[Record]:
    """An evenly spread, deterministic sample of both classes."""
    by_class = [[r for r in records if r.label == label] for label in (0, 1)]
    sample: list[Record] = []
    for group in by_class:
        take = min(len(group), n // 2)
        if take:
            sample += [group[i] for i in np.linspace(0, len(group) - 1, take).round().astype(int)]
    return sample


class _ImageReader:
    """Feeds calibration images to ONNX Runtime one batch at a time."""

    def __init__(self, records: list[Record], input_name: str, image_size: int, intensity: str = "none", batch_size: int = 16):
        self.batches = iter(
            np.stack([preprocess_file(r.path, image_size, intensity) for r in records[i : i + batch_size]])
            for i in range(0, len(records), batch_size)
        )
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # pragma: no cover - required by newer ORT versions
        pass


def float_nodes(model_path: Path) -> list[str]:
    """Nodes kept in float: the first convolution, the head convolution, the classifier and the heat-map branch.

    The heat-map branch (everything only the ``heatmap`` output depends on:
    CAM convolution, upsampling, min-max normalisation) must stay float: with
    its ``+ 1e-7`` quantised to zero, a confidently normal image, whose CAM is
    zero everywhere, gave 0/0 = NaN maps (24 of the 624 test images).
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    out_channels = {init.name: init.dims[0] for init in graph.initializer if len(init.dims) == 4}
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    # a finer map's refinement (learning.model.FineCam): a 1×1 convolution to one channel, read by logit and map alike
    to_one_channel = [n.name for n in graph.node if n.op_type == "Conv" and out_channels.get(n.input[1]) == 1]
    heatmap_only = only_feeding(graph, "heatmap")
    classifier = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    head = [name for name in convs if name not in heatmap_only and name not in to_one_channel][-1]
    return [convs[0], head, *classifier, *to_one_channel, *(n.name for n in graph.node if n.name in heatmap_only)]


def only_feeding(graph, output: str) -> set[str]:
    """Names of the nodes that the given graph output depends on and no other output does."""
    producer = {name: node for node in graph.node for name in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack += list(node.input)
        return seen

    others = set().union(*(ancestors(o.name) for o in graph.output if o.name != output))
    return ancestors(output) - others


def quantize_int8(fp32_path: Path, int8_path: Path, records: list[Record], image_size: int, intensity: str = "none",
                  input_name: str = "image") -> Path:  # fmt: skip
    """Write a QDQ int8 model calibrated on ``records`` (training images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_ImageReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(records, input_name, image_size, intensity),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes(prepared),
        )
    log.info("int8 model written to %s from %d calibration images", int8_path, len(records))
    return int8_path
