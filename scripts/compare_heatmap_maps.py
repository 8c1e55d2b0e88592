"""Which map of a box-guided model's cells to show, judged on the adult validation part only (docs/ablations.md).

    python scripts/compare_heatmap_maps.py --model models/pneumoscan-v3

Reads the 7×7 cell logits of the exported graph (the class activation map's convolution, before anything
is applied to it), maps them each way, upsamples and min-max scales them as the graph does, and prints for
each the pointing game on the boxed pneumonias and the best region rule's RSNA mAP (normals included).
For models whose map is the plain class activation map (not the finer FineCam map).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from pneumoscan.learning.evaluation import ModelUnderTest, boxes_of, films_of, records_of
from pneumoscan.learning.localisation import box_mask, fit_region_rule, pointing_hit

CELLS = "/Conv_output_0"  # the class activation map's 1×1 convolution in an exported graph


def sigmoid(cells: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-cells))


MAPS = {
    "ReLU": lambda c: np.maximum(c, 0),
    "ReLU, raw where no cell is positive": lambda c: np.maximum(c, 0) if c.max() > 0 else c,
    "raw": lambda c: c,
    "exp(cell - max)": lambda c: np.exp(c - c.max()),
    "sigmoid": sigmoid,
}


def cell_logits(model_dir: Path, inputs: np.ndarray) -> np.ndarray:
    graph = onnx.load(model_dir / "model.onnx")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(CELLS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([CELLS], {"image": inputs[i : i + 16]})[0][:, 0] for i in range(0, len(inputs), 16)])


def as_graph_shows(cells: np.ndarray, size: int) -> np.ndarray:
    """Upsampled (bilinear, half-pixel centres, as the graph's Resize) and min-max scaled."""
    big = np.asarray(Image.fromarray(cells.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    big = big - big.min()
    return big / (big.max() + 1e-7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/pneumoscan-v3"))
    args = parser.parse_args()
    subject = ModelUnderTest(args.model)
    boxes = boxes_of(subject.sources)
    records = [r for r in records_of(subject.sources, "val", subject.seed, subject.val_fraction)
               if r.population == "adult" and (r.label == 0 or r.path.resolve() in boxes)]  # fmt: skip
    films = films_of(subject.onnx, records, boxes)
    cells = cell_logits(args.model, np.stack([subject.onnx.preprocess(f.record.path) for f in films]))
    size = subject.onnx.image_size
    blank = sum(1 for f, c in zip(films, cells) if f.truth and c.max() <= 0)
    print(f"{len(films)} adult validation films, {sum(1 for f in films if f.truth)} with boxes; "
          f"{blank} of these have no positive cell (a ReLU'd map is blank)\n")  # fmt: skip
    print("| map of the cells | pointing game | best region rule's mAP |\n|---|---|---|")
    for name, transform in MAPS.items():
        shown = [dataclasses.replace(f, heatmap=as_graph_shows(transform(c), size)) for f, c in zip(films, cells)]
        pointing = np.mean([pointing_hit(f.heatmap, box_mask(f.truth, f.size, size)) for f in shown if f.truth])
        _, region_map = fit_region_rule(shown)
        print(f"| {name} | {pointing:.3f} | {region_map:.3f} |")


if __name__ == "__main__":
    main()
