"""Reading an ncnn export of Real-ESRGAN's RRDBNet (``.param`` + ``.bin``) into our parameter names.

The format, as ncnn's own loader reads it:

* ``.param``: the magic ``7767517``, a line ``layer_count blob_count``, then one line per layer:
  ``type name n_in n_out inputs... outputs... key=value...``. A key <= -23300 is an array ``n,v1,...,vn`` stored
  under ``-key - 23300``. Convolution keys: 0 num_output, 1 kernel, 2 dilation, 3 stride, 4 pad, 5 bias_term,
  6 weight_data_size, 9 activation type (2: leaky ReLU with its slope in array 10).
* ``.bin``: each Convolution's blobs in ``.param`` order. The weight blob starts with a 4-byte little-endian tag,
  ``0x01306B47`` for fp16 data padded to 4 bytes or 0 for raw fp32, in ``[out][in][kh][kw]`` order; then
  ``num_output`` fp32 biases, untagged.

The layer order is not trusted: :func:`rrdbnet_from_ncnn` matches the whole graph, from its output back to its input,
against the graph of our :class:`~metaf2n.models.RRDBNet` (the concat order, where the activations are, the
residual scalings, the trunk skip, the nearest x2 upsampling), and only then names each convolution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

PARAM_MAGIC = 7767517
FP16_TAG = 0x01306B47
FP32_TAG = 0
ARRAY_KEY_BASE = -23300
LEAKY_RELU = 2
RESIDUAL_SCALE = 0.2
LEAKY_SLOPE = 0.2


@dataclass
class Layer:
    """One ``.param`` line: ``params`` maps a key to an int, a float, or (arrays) a list of numbers."""

    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object] = field(default_factory=dict)


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str, source: str = "param") -> list[Layer]:
    """The layers of an ncnn ``.param`` file's text; a malformed line is refused with its line number."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != str(PARAM_MAGIC):
        raise ValueError(f"{source}: not an ncnn .param file (first line must be the magic {PARAM_MAGIC})")
    try:
        layer_count, _ = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise ValueError(f"{source}: line 2 must be 'layer_count blob_count'") from None
    layers = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        try:
            kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
            inputs, outputs = fields[4 : 4 + n_in], fields[4 + n_in : 4 + n_in + n_out]
            if len(outputs) != n_out:
                raise ValueError("too few blob names")
            params: dict[int, object] = {}
            for item in fields[4 + n_in + n_out :]:
                key_text, value = item.split("=", 1)
                key = int(key_text)
                if key <= ARRAY_KEY_BASE:
                    count, *values = value.split(",")
                    if int(count) != len(values):
                        raise ValueError(f"array {key} announces {count} values, has {len(values)}")
                    params[ARRAY_KEY_BASE - key] = [_number(v) for v in values]
                else:
                    params[key] = _number(value)
        except (IndexError, ValueError) as error:
            raise ValueError(f"{source}: line {number} is not an ncnn layer ({error}): {line[:80]!r}") from None
        layers.append(Layer(kind, name, inputs, outputs, params))
    if len(layers) != layer_count:
        raise ValueError(f"{source}: announces {layer_count} layers but has {len(layers)} (truncated?)")
    return layers


def read_convolutions(layers: list[Layer], data: bytes,
                      source: str = "bin") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each Convolution layer's (weight OIHW float32, bias float32), by layer name, read from the ``.bin`` bytes in
    layer order. The file must be consumed exactly, and only Convolution layers may own blobs."""
    offset = 0
    convs = {}
    for layer in layers:
        if layer.type in ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp"):
            continue
        if layer.type != "Convolution":
            raise ValueError(f"{source}: layer {layer.name} is a {layer.type}; an RRDBNet export has none")
        out_ch, kernel = int(layer.params.get(0, 0)), int(layer.params.get(1, 0))
        size = int(layer.params.get(6, 0))
        if out_ch <= 0 or kernel <= 0 or size <= 0 or size % (out_ch * kernel * kernel):
            raise ValueError(f"{source}: convolution {layer.name} has inconsistent sizes "
                             f"(num_output {out_ch}, kernel {kernel}, weight_data_size {size})")
        if offset + 4 > len(data):
            raise ValueError(f"{source}: ends before the weights of {layer.name} (truncated?)")
        tag = int.from_bytes(data[offset : offset + 4], "little")
        offset += 4
        if tag == FP16_TAG:
            nbytes, dtype = 2 * size, np.dtype("<f2")
            padded = (nbytes + 3) // 4 * 4
        elif tag == FP32_TAG:
            nbytes, dtype = 4 * size, np.dtype("<f4")
            padded = nbytes
        else:
            raise ValueError(f"{source}: the weights of {layer.name} have storage tag {tag:#010x}; only fp16 "
                             f"({FP16_TAG:#010x}) and fp32 (0) are read")
        if offset + padded > len(data):
            raise ValueError(f"{source}: ends inside the weights of {layer.name} (truncated?)")
        weight = np.frombuffer(data, dtype, size, offset).astype(np.float32)
        offset += padded
        in_ch = size // (out_ch * kernel * kernel)
        weight = weight.reshape(out_ch, in_ch, kernel, kernel)
        if int(layer.params.get(5, 0)):
            if offset + 4 * out_ch > len(data):
                raise ValueError(f"{source}: ends inside the bias of {layer.name} (truncated?)")
            bias = np.frombuffer(data, "<f4", out_ch, offset).astype(np.float32)
            offset += 4 * out_ch
        else:
            bias = np.zeros(out_ch, np.float32)
        convs[layer.name] = (weight, bias)
    if offset != len(data):
        raise ValueError(f"{source}: {len(data) - offset} bytes are left after the last layer's weights "
                         "(not the file this .param describes)")
    return convs


# --- the expected graph ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A node of the expected graph: ``op`` with its attributes, input nodes, and a name (convolutions: the
    parameter name)."""

    op: str
    inputs: tuple["Node", ...] = ()
    attrs: tuple = ()
    name: str = ""


def _conv(name: str, x: Node, out_ch: int, act: bool) -> Node:
    return Node("conv", (x,), (out_ch, act), name)


def rrdbnet_graph(num_block: int = 23, num_feat: int = 64, num_grow_ch: int = 32, out_ch: int = 3) -> Node:
    """The output node of :class:`~metaf2n.models.RRDBNet`'s forward pass, written as a graph."""
    x = Node("input")
    first = _conv("conv_first", x, num_feat, False)
    trunk = first
    for i in range(num_block):
        block_in = trunk
        y = trunk
        for j in range(1, 4):
            prefix = f"body.{i}.rdb{j}"
            features = [y]
            for k in range(1, 5):
                source = features[0] if k == 1 else Node("concat", tuple(features), name=f"{prefix}.conv{k} input")
                features.append(_conv(f"{prefix}.conv{k}", source, num_grow_ch, True))
            conv5 = _conv(f"{prefix}.conv5", Node("concat", tuple(features), name=f"{prefix}.conv5 input"),
                          num_feat, False)
            y = Node("scaled_add", (conv5, y), (RESIDUAL_SCALE, 1.0), f"{prefix} residual")
        trunk = Node("scaled_add", (y, block_in), (RESIDUAL_SCALE, 1.0), f"body.{i} residual")
    feat = Node("add", (first, _conv("conv_body", trunk, num_feat, False)), name="trunk skip")
    feat = _conv("conv_up1", Node("nearest2x", (feat,), name="upsampling 1"), num_feat, True)
    feat = _conv("conv_up2", Node("nearest2x", (feat,), name="upsampling 2"), num_feat, True)
    feat = _conv("conv_hr", feat, num_feat, True)
    return _conv("conv_last", feat, out_ch, False)


def _describe(layer: Layer, producers: dict[str, Layer]) -> tuple[str, tuple, list[Layer]]:
    """(op, attrs, input layers) of an ncnn layer in the vocabulary of :class:`Node`; Splits are looked through."""

    def source(blob: str) -> Layer:
        layer_ = producers.get(blob)
        if layer_ is None:
            raise ValueError(f"blob {blob!r} has no producer")
        while layer_.type == "Split":
            layer_ = producers[layer_.inputs[0]]
        return layer_

    inputs = [source(b) for b in layer.inputs]
    p = layer.params
    if layer.type == "Input":
        return "input", (), inputs
    if layer.type == "Convolution":
        if (int(p.get(1, 0)), int(p.get(2, 1)), int(p.get(3, 1)), int(p.get(4, 0))) != (3, 1, 1, 1) or \
                any(key in p for key in (11, 12, 13, 14, 15, 16, 18, 19)):  # per-axis kernel/dilation/stride/pads
            return "conv (not 3x3, stride 1, pad 1)", (), inputs
        act = int(p.get(9, 0))
        if act not in (0, LEAKY_RELU) or (act == LEAKY_RELU and not np.isclose(p.get(10, [0])[0], LEAKY_SLOPE)):
            return f"conv with activation {act} {p.get(10)}", (), inputs
        return "conv", (int(p[0]), act == LEAKY_RELU), inputs
    if layer.type == "Concat":
        return ("concat", (), inputs) if int(p.get(0, 0)) == 0 else ("concat (not on channels)", (), inputs)
    if layer.type == "Eltwise":
        coeffs = tuple(float(v) for v in p.get(1, []))
        if int(p.get(0, 0)) == 1 and len(coeffs) == 2:  # op 1: sum with coefficients (ncnn's default 0 is product)
            return "scaled_add", coeffs, inputs
        return f"eltwise op {p.get(0)} {coeffs}", (), inputs
    if layer.type == "BinaryOp":
        return ("add", (), inputs) if int(p.get(0, 0)) == 0 and 1 not in p else ("binaryop", (), inputs)
    if layer.type == "Interp":
        if int(p.get(0, 0)) == 1 and float(p.get(1, 0)) == 2.0 and float(p.get(2, 0)) == 2.0 and \
                not any(key in p for key in (3, 4, 5, 6)):  # no output size, align-corners or dynamic size
            return "nearest2x", (), inputs
        return f"interp {p}", (), inputs
    return layer.type, (), inputs


def _reads_input(layer: Layer, producers: dict[str, Layer]) -> bool:
    return bool(layer.inputs) and _describe(layer, producers)[2][0].type == "Input"


def match_rrdbnet(layers: list[Layer], expected: Node, output_blob: str = "output") -> dict[str, str]:
    """Match the ncnn graph to ``expected`` from the output blob back; returns {parameter name: ncnn layer name}.
    Raises ValueError naming the first layer that differs, or layers the expected graph does not use."""
    producers = {blob: layer for layer in layers for blob in layer.outputs}
    if output_blob not in producers:
        raise ValueError(f"the graph has no blob named {output_blob!r}")
    mapping: dict[str, str] = {}
    pairs: dict[int, str] = {}  # id(expected node) -> ncnn layer name, to check the match is one to one
    seen_layers: dict[str, tuple[int, str]] = {}
    stack = [(producers[output_blob], expected, "the output")]
    while stack:
        layer, node, where = stack.pop()
        if id(node) in pairs:
            if pairs[id(node)] != layer.name:
                raise ValueError(f"{where}: expected the same tensor as layer {pairs[id(node)]}, found {layer.name}")
            continue
        if layer.name in seen_layers and seen_layers[layer.name][0] != id(node):
            raise ValueError(f"layer {layer.name}, {where}: RRDBNet has another tensor here than at "
                             f"{seen_layers[layer.name][1]}, where the file uses the same layer")
        op, attrs, inputs = _describe(layer, producers)
        if op != node.op or attrs != node.attrs:
            want = f"{node.op}{'' if not node.attrs else ' ' + str(node.attrs)}"
            got = f"{op}{'' if not attrs else ' ' + str(attrs)}"
            raise ValueError(f"layer {layer.name} ({layer.type}), {where}: RRDBNet has {want} here, the file {got}")
        if op == "add" and len(inputs) == 2 and _reads_input(inputs[1], producers):
            inputs = inputs[::-1]  # addition commutes: the trunk skip's operand (conv_first) goes first
        if len(inputs) != len(node.inputs):
            raise ValueError(f"layer {layer.name}, {where}: {len(inputs)} inputs, RRDBNet has {len(node.inputs)}")
        pairs[id(node)] = layer.name
        seen_layers[layer.name] = (id(node), where)
        if op == "conv":
            mapping[node.name] = layer.name
        label = node.name or where
        for k, (child_layer, child_node) in enumerate(zip(inputs, node.inputs)):
            stack.append((child_layer, child_node, f"input {k} of {label}"))
    unused = [layer.name for layer in layers if layer.type != "Split" and layer.name not in seen_layers]
    if unused:
        raise ValueError(f"{len(unused)} layers are not part of RRDBNet's graph: {', '.join(unused[:5])}")
    return mapping


def count_rrdb_blocks(layers: list[Layer]) -> int:
    """RRDB blocks in an RRDBNet export: 15 convolutions each, plus 6 outside the body."""
    convs = sum(layer.type == "Convolution" for layer in layers)
    blocks, rest = divmod(convs - 6, 15)
    if convs < 6 or rest:
        raise ValueError(f"{convs} convolutions is no RRDBNet (15 per block + 6)")
    return blocks


def rrdbnet_from_ncnn(param_text: str, bin_data: bytes, num_block: int | None = 23,
                      source: str = "ncnn model") -> dict[str, torch.Tensor]:
    """A Real-ESRGAN RRDBNet state dict (float32, the official parameter names) from an ncnn export.

    ``num_block`` is the number of RRDB blocks required (23: x4plus); None accepts any. A file of another graph, with
    another block count, or truncated is refused with the reason."""
    layers = parse_param(param_text, f"{source} .param")
    blocks = count_rrdb_blocks(layers)
    if num_block is not None and blocks != num_block:
        raise ValueError(f"{source} is an RRDBNet with {blocks} blocks, not {num_block} (x4plus has 23; the "
                         "6-block one is realesrgan-x4plus-anime)")
    convs = read_convolutions(layers, bin_data, f"{source} .bin")
    first = next(layer for layer in layers if layer.type == "Convolution")
    num_feat = int(first.params[0])
    grow = next(int(layer.params[0]) for layer in layers if layer.type == "Convolution" and layer is not first)
    last = [layer for layer in layers if layer.type == "Convolution"][-1]
    mapping = match_rrdbnet(layers, rrdbnet_graph(blocks, num_feat, grow, int(last.params[0])))
    state = {}
    for name, layer_name in mapping.items():
        weight, bias = convs[layer_name]
        state[f"{name}.weight"] = torch.from_numpy(weight.copy())
        state[f"{name}.bias"] = torch.from_numpy(bias.copy())
    return state


def read_ncnn_rrdbnet(param: str | os.PathLike, weights: str | os.PathLike, num_block: int | None = 23):
    """:func:`rrdbnet_from_ncnn` on a ``.param`` and ``.bin`` file pair."""
    with open(param, encoding="utf-8") as f:
        text = f.read()
    with open(weights, "rb") as f:
        data = f.read()
    return rrdbnet_from_ncnn(text, data, num_block, os.fspath(param))
