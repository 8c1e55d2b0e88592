"""Give an exported box-guided model's heat map its cells' probabilities instead of their ReLU, in place.

Exports used to ReLU every class activation map. A box-guided model's cells are logits of "inside a
radiologist's box", often all below zero on a pneumonia film, so its ReLU'd map was blank there
(see ``LogitAndHeatmap``). Exporting again from the checkpoint now gives sigmoid(cell logit + the
classifier's bias); this script makes the same graph from a folder whose checkpoint is gone (the
shipped v3), editing only the heat-map branch: logit and embedding are untouched.

Afterwards re-fit what reads the map (the region rule) and measure again:

    python scripts/cell_probability_heatmap.py models/pneumoscan-v3
    pneumoscan fit-operating-points --model models/pneumoscan-v3 --estimator <the card's estimator>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

from pneumoscan.files import sha256_file
from pneumoscan.learning.export import BOX_GUIDED_HEATMAP_TEXT, GRAD_CAM_TEXT

GRAPHS = {"onnx": "model.onnx", "int8": "model.int8.onnx"}


def heatmap_relu(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The ReLU feeding the heat map's upsampling (walking back from the ``heatmap`` output), or None."""
    producer = {output: node for node in graph.node for output in node.output}
    name = "heatmap"
    while name in producer:
        node = producer[name]
        if node.op_type == "Resize":
            source = producer.get(node.input[0])
            return source if source is not None and source.op_type == "Relu" else None
        name = node.input[0]
    return None


def classifier_bias(graph: onnx.GraphProto) -> str:
    """The name of the classifier's bias: the third input of the graph's one Gemm (the head's linear layer)."""
    (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
    return gemm.input[2]


def cell_probabilities(path: Path) -> bool:
    """Replace the heat map's ReLU by sigmoid(cell + bias) in one ONNX file; False when it has no ReLU (done already)."""
    model = onnx.load(path)
    relu = heatmap_relu(model.graph)
    if relu is None:
        return False
    shifted = relu.output[0] + "_plus_bias"
    at = list(model.graph.node).index(relu)
    model.graph.node.remove(relu)
    model.graph.node.insert(at, onnx.helper.make_node("Sigmoid", [shifted], [relu.output[0]], name="/cam/Sigmoid"))
    model.graph.node.insert(at, onnx.helper.make_node("Add", [relu.input[0], classifier_bias(model.graph)], [shifted], name="/cam/Add"))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an exported model folder of a box-guided run")
    args = parser.parse_args(argv)
    card_path = args.model / "model_card.json"
    card = json.loads(card_path.read_text())
    if not card.get("training", {}).get("config", {}).get("train", {}).get("box_loss_weight"):
        print(f"{args.model}: not a box-guided model; its ReLU'd Grad-CAM is kept", file=sys.stderr)
        return 2
    for key, file in GRAPHS.items():
        if key in card and (args.model / file).is_file():
            changed = cell_probabilities(args.model / file)
            card[key]["sha256"] = sha256_file(args.model / file)
            print(f"{file}: {'ReLU replaced by sigmoid(cell + bias)' if changed else 'no ReLU before the upsampling (done already)'}")
    card["output"] = card["output"].replace(GRAD_CAM_TEXT, BOX_GUIDED_HEATMAP_TEXT)
    card["heatmap_edited"] = {
        "command": f"python scripts/cell_probability_heatmap.py models/{args.model.name}",
        "what": "the ReLU before the heat map's upsampling replaced by sigmoid(cell + classifier bias) in both graphs, "
        "as export now writes a box-guided model; logit and embedding unchanged",
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
