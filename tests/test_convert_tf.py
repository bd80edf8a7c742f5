"""The official MetaF2N TensorFlow checkpoint without TensorFlow: metaf2n.tf_checkpoint, metaf2n.tf1_resize,
metaf2n.convert_tf, ``python -m metaf2n.weights metaf2n-tf`` and ``infer --official-test``.

tests/fixtures/metaf2n_tf/ was written by TensorFlow's own Saver (scripts/make_tf_fixture.py, TensorFlow 2.21 in
v1 graph mode): a small MetaF2N (2 blocks, 8 features, growth 4, MaskNet 8) with an Adam optimiser's slots and a
global step beside it, and the official test step's outputs on fixed patches (TF1 bicubic of the LQ patches,
MaskNet's W, the inner loss, the whole photo's SR before and after one SGD step at 0.01)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metaf2n import infer as infer_cli
from metaf2n import weights
from metaf2n.convert_tf import convert_official
from metaf2n.inference import FacePair, adapt_to_faces, load_model, sample_official_patches, tiled_super_resolve
from metaf2n.io import read_jsonl
from metaf2n.tf1_resize import coefficient_table, resize_bicubic_tf1
from metaf2n.tf_checkpoint import CheckpointError, crc32c, read_checkpoint, unmask

FIXTURE = Path(__file__).parent / "fixtures" / "metaf2n_tf"
PREFIX = FIXTURE / "model"


@pytest.fixture(scope="module")
def official():
    return dict(np.load(FIXTURE / "official_test.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "metaf2n_official.pt"
    assert weights.main(["metaf2n-tf", str(PREFIX), "-o", str(out)]) == 0
    return out


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """NHWC (or HWC) -> NCHW float32; uint8 images are divided by 255 as imageio + the official code do."""
    array = np.asarray(array)
    scaled = array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.astype(np.float32)
    tensor = torch.from_numpy(scaled)
    return (tensor[None] if tensor.dim() == 3 else tensor).permute(0, 3, 1, 2).contiguous()


# --- the checkpoint format ---------------------------------------------------------------------------------------
def test_every_variable_of_the_saver_is_read_with_its_shape():
    tensors = read_checkpoint(PREFIX)
    # 2 blocks x 3 dense blocks x 5 convs + 6 outer convs, weight and bias each; MaskNet 8 convs; Adam's two slots of
    # one variable, its two power accumulators and the global step
    assert len(tensors) == 2 * (2 * 3 * 5 + 6) + 2 * 8 + 2 + 2 + 1
    assert tensors["MODEL/conv_first/weight"].shape == (3, 3, 3, 8)
    assert tensors["MODEL/body/1/rdb3/conv5/weight"].shape == (3, 3, 8 + 4 * 4, 8)
    assert tensors["Mask/conv1/kernel"].shape == (3, 3, 6, 8) and tensors["Mask/conv8/bias"].shape == (1,)
    assert tensors["global_step"].dtype == np.int64 and tensors["MODEL/conv_first/weight"].dtype == np.float32


def test_crc32c_is_the_castagnoli_checksum_and_the_mask_is_leveldbs():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # LevelDB's mask: rotate right by 15 and add 0xa282ead8; unmask inverts it
    crc = 0x12345678
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert unmask(masked) == crc


def test_corrupt_truncated_and_missing_files_are_named(tmp_path):
    for name in ("model.index", "model.data-00000-of-00001"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    data = bytearray((tmp_path / "model.data-00000-of-00001").read_bytes())
    original = bytes(data)
    data[100] ^= 0xFF
    (tmp_path / "model.data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"conv1/weight: its bytes fail the crc32c recorded in the index"):
        read_checkpoint(tmp_path / "model")
    (tmp_path / "model.data-00000-of-00001").write_bytes(original[:-1000])
    with pytest.raises(CheckpointError, match=r"run past the end of .*model.data-00000-of-00001 \(truncated\?\)"):
        read_checkpoint(tmp_path / "model")
    (tmp_path / "model.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match=r"model.data-00000-of-00001 is missing"):
        read_checkpoint(tmp_path / "model")
    index = bytearray((FIXTURE / "model.index").read_bytes())
    index[50] ^= 0xFF
    (tmp_path / "model.index").write_bytes(bytes(index))
    with pytest.raises(CheckpointError, match=r"fails its crc32c \(corrupt file\)"):
        read_checkpoint(tmp_path / "model")
    (tmp_path / "model.index").write_bytes(b"not a table" * 10)
    with pytest.raises(CheckpointError, match=r"not a TensorFlow checkpoint index"):
        read_checkpoint(tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"give the checkpoint prefix"):
        read_checkpoint(tmp_path / "model.index")


# --- TF1 resize_bicubic -----------------------------------------------------------------------------------------
def test_tf1_bicubic_weights_are_the_a_075_kernel_on_the_legacy_grid():
    # x4 upsampling samples input position o / 4: fractions 0, 1/4, 1/2, 3/4, i.e. table offsets 0, 256, 512, 768.
    # Keys' cubic with a = -0.75, W(t) = 1.25 t^3 - 2.25 t^2 + 1 on [0, 1] and -0.75 (t^3 - 5 t^2 + 8 t - 4) on
    # [1, 2]: W(0.25) = 0.87890625, W(1.25) = -0.10546875, W(0.75) = 0.26171875, W(1.75) = -0.03515625 (sum 1).
    table = coefficient_table()
    assert table[256].tolist() == [0.87890625, -0.10546875]
    assert table[768].tolist() == [0.26171875, -0.03515625]
    signal = torch.tensor([[[[0.0, 1.0, 0.0, 0.0, 2.0]]]])
    out = resize_bicubic_tf1(signal, (1, 20))[0, 0, 0]
    assert out[4].item() == pytest.approx(1.0)  # o = 4 sits on input 1 exactly
    # o = 5: input position 1.25, taps 0..3 weighted W(1.25), W(0.25), W(0.75), W(1.75)
    assert out[5].item() == pytest.approx(0.87890625)
    # o = 17: position 4.25, taps 3, 4, 5 -> 4, 6 -> 4 (clamped to the last pixel, no renormalisation)
    assert out[17].item() == pytest.approx(2 * (0.87890625 + 0.26171875 - 0.03515625))
    # o = 1: position 0.25, tap -1 clamped to 0: 0 * (W(1.25) + W(0.25)) + 1 * W(0.75)
    assert out[1].item() == pytest.approx(0.26171875)
    assert resize_bicubic_tf1(torch.full((1, 1, 3, 3), 2.0), (12, 12)).sub(2).abs().max() < 1e-6


def test_tf1_bicubic_equals_tensorflows_on_the_fixture_patches(official):
    lq = torch.stack([to_tensor(official["face_lq"])[0, :, t : t + 16, l : l + 16]
                      for t, l in zip(official["tops"], official["lefts"])])
    ours = resize_bicubic_tf1(lq, (64, 64))
    torch.testing.assert_close(ours, to_tensor(official["bicubic"]), atol=2e-6, rtol=0)
    # not torch's bicubic: half-pixel centres and a clamp give visibly different values
    torch_bicubic = torch.nn.functional.interpolate(lq, size=(64, 64), mode="bicubic", align_corners=False)
    assert (torch_bicubic - to_tensor(official["bicubic"])).abs().max() > 1e-2


# --- conversion and the official test step ----------------------------------------------------------------------
def test_converted_checkpoint_records_sizes_and_the_tf1_masknet_input(converted):
    checkpoint = torch.load(converted, weights_only=True)
    assert checkpoint["config"] == {"num_feat": 8, "num_block": 2, "num_grow_ch": 4, "masknet_feat": 8,
                                    "masknet_upsample": "tf1", "inner_lr": 0.01}
    assert checkpoint["ignored"] == ["MODEL/conv_first/weight/Adam", "MODEL/conv_first/weight/Adam_1", "beta1_power",
                                     "beta2_power", "global_step"]
    tensors = read_checkpoint(PREFIX)
    # HWIO -> OIHW: our weight[o, i, y, x] is TF's kernel[y, x, i, o]
    ours = checkpoint["sr"]["body.1.rdb2.conv3.weight"]
    theirs = tensors["MODEL/body/1/rdb2/conv3/weight"]
    assert ours[3, 7, 0, 2].item() == theirs[0, 2, 7, 3]
    model = load_model(converted)
    assert model.masknet.upsample == "tf1" and model.inner_lr == 0.01 and model.source == "metaf2n"


def test_the_official_test_step_is_reproduced(converted, official):
    model = load_model(converted)
    photo = to_tensor(official["photo"])
    before = tiled_super_resolve(model.sr, photo, tile=0)
    sr_before = torch.from_numpy(official["sr_before"]).permute(2, 0, 1)[None]
    # tiled_super_resolve clamps to [0, 1], as the official code does before writing the PNG
    torch.testing.assert_close(before, sr_before.clamp(0, 1), atol=1e-5, rtol=0)
    with torch.no_grad():
        raw = model.sr(photo)
    torch.testing.assert_close(raw, sr_before, atol=1e-5, rtol=0)
    pair = FacePair(to_tensor(official["face_lq"])[0], to_tensor(official["face_hq"])[0])
    coordinates = [(0, int(t), int(l)) for t, l in zip(official["tops"], official["lefts"])]
    lr_groups, hq_groups, used = sample_official_patches([pair], 16, None, coordinates=coordinates)
    assert used == coordinates
    with torch.no_grad():
        from metaf2n.maml import face_weights

        w = face_weights(model.masknet, lr_groups[0], hq_groups[0])
    # eight float32 convolutions with large weights: TF and torch accumulate in different orders (W is about 1.4)
    torch.testing.assert_close(w, to_tensor(official["weights"]), atol=2e-4, rtol=0)
    adaptation = adapt_to_faces(model, lr_groups, hq_groups, steps=1)
    assert adaptation.inner_before == pytest.approx(float(official["loss_before"]), rel=1e-4)
    after = functional_sr(model, adaptation.params, photo)
    sr_after = torch.from_numpy(official["sr_after"]).permute(2, 0, 1)[None]
    torch.testing.assert_close(after, sr_after, atol=1e-4, rtol=0)
    assert (sr_after - sr_before).abs().max() > 0.1  # the step moved the output far more than the tolerance


def functional_sr(model, params, photo):
    from torch.func import functional_call

    with torch.no_grad():
        return functional_call(model.sr, params, (photo,))


def test_torch_bicubic_masknet_input_would_miss_the_official_w(converted, official):
    """Feeding the converted MaskNet torch's bicubic instead changes W well past the tolerance: the recorded TF1
    input matters."""
    model = load_model(converted)
    pair = FacePair(to_tensor(official["face_lq"])[0], to_tensor(official["face_hq"])[0])
    coordinates = [(0, int(t), int(l)) for t, l in zip(official["tops"], official["lefts"])]
    lr_groups, hq_groups, _ = sample_official_patches([pair], 16, None, coordinates=coordinates)
    model.masknet.upsample = "torch"
    with torch.no_grad():
        from metaf2n.maml import face_weights

        w = face_weights(model.masknet, lr_groups[0], hq_groups[0])
    assert (w - to_tensor(official["weights"])).abs().max() > 1e-3


def test_official_sampling_draws_per_face_and_takes_a_small_first_face_whole():
    big = FacePair(torch.rand(3, 20, 18), torch.rand(3, 80, 72))
    small = FacePair(torch.rand(3, 16, 30), torch.rand(3, 64, 120))
    generator = torch.Generator().manual_seed(0)
    lr, hq, used = sample_official_patches([big, small, big], 5, generator)
    # the small face (height 16 <= 16) comes after patches were taken: skipped; each big face gives 5 patches
    assert [f for f, _, _ in used] == [0] * 5 + [2] * 5
    assert all(0 <= t < 4 and 0 <= l < 2 for _, t, l in used)  # [0, side - 16): 20 - 16 = 4, 18 - 16 = 2
    assert lr[0].shape == (10, 3, 16, 16) and hq[0].shape == (10, 3, 64, 64)
    f, t, l = used[3]
    torch.testing.assert_close(hq[0][3], big.hq[:, 4 * t : 4 * t + 64, 4 * l : 4 * l + 64])
    lr, hq, used = sample_official_patches([small, big], 5, generator)
    assert used == [(0, None, None)] and lr[0].shape == (1, 3, 16, 30)  # whole, and the list ends there
    replay, _, _ = sample_official_patches([small, big], 5, None, coordinates=used)
    assert torch.equal(replay[0], lr[0])
    tops = {t for _ in range(50) for _, t, _ in sample_official_patches([big], 1, generator)[2]}
    assert tops == {0, 1, 2, 3}  # every offset below side - 16 is drawn, side - 16 itself never
    with pytest.raises(ValueError, match=r"coordinates: patch \(0, 5, 0\) does not fit face 0"):
        sample_official_patches([big], 1, None, coordinates=[(0, 5, 0)])
    with pytest.raises(ValueError, match=r"coordinates: face 3 does not exist \(1 faces\)"):
        sample_official_patches([big], 1, None, coordinates=[(3, 0, 0)])


def test_infer_official_test_mode_runs_the_converted_checkpoint(converted, official, tmp_path):
    from PIL import Image

    for folder, name, array in (("LQ", "p.png", official["photo"]), ("Face_LQ", "p_0.png", official["face_lq"]),
                                ("Face_HQ", "p_0.png", official["face_hq"])):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(array).save(tmp_path / folder / name)
    out = tmp_path / "out"
    assert infer_cli.main([str(tmp_path / "LQ"), "-o", str(out), "--checkpoint", str(converted), "--official-test",
                           "--face-lq", str(tmp_path / "Face_LQ"), "--face-hq", str(tmp_path / "Face_HQ"),
                           "--tile", "8", "--quiet"]) == 0
    (record,) = read_jsonl(out / "summary.jsonl")
    assert record["adapted"] and record["patches"] == 16 and record["faces_used"] == 1
    assert Image.open(out / "p.png").size == (96, 96)  # --tile is ignored: one pass over the whole photo


def test_a_checkpoint_missing_or_with_unexpected_variables_is_refused_by_name(tmp_path):
    from metaf2n.convert_tf import split_variables

    tensors = read_checkpoint(PREFIX)
    broken = {k: v for k, v in tensors.items() if k != "Mask/conv3/bias"}
    with pytest.raises(CheckpointError, match=r"lacks 1 MaskNet variable\(s\): conv3.bias"):
        convert_from(broken)
    with pytest.raises(CheckpointError, match=r"MODEL/body/0/rdb4/conv1/weight: not a variable of MetaF2N"):
        split_variables({**tensors, "MODEL/body/0/rdb4/conv1/weight": tensors["MODEL/conv_first/weight"]})
    wrong = dict(tensors)
    wrong["MODEL/conv_hr/weight"] = np.zeros((3, 3, 8, 9), np.float32)
    with pytest.raises(CheckpointError, match=r"RRDBNet conv_hr.weight: shape \(9, 8, 3, 3\) does not fit"):
        convert_from(wrong)
    assert weights.main(["metaf2n-tf", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.pt")]) == 1


def convert_from(tensors, monkeypatch=None):
    import metaf2n.convert_tf as convert

    original = convert.read_checkpoint
    convert.read_checkpoint = lambda prefix: tensors
    try:
        return convert_official("fake")
    finally:
        convert.read_checkpoint = original


def test_training_starts_from_the_converted_checkpoint_and_keeps_tf1_masknet_inputs(converted, tmp_path,
                                                                                     monkeypatch):
    import metaf2n.tf1_resize as tf1_resize
    from metaf2n import train as train_cli

    calls = []
    original = tf1_resize.resize_bicubic_tf1
    monkeypatch.setattr(tf1_resize, "resize_bicubic_tf1", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = tmp_path / "run"
    args = ["--init", str(converted), "--tasks", "1", "--face-patches", "1", "--background-patches", "1",
            "--face-patch-size", "32", "--face-size", "64", "--background-patch-size", "32",
            "--background-crop-size", "64", "--val-tasks", "1", "--d-num-feat", "8", "--warmup-steps", "0",
            "--steps", "1", "--device", "cpu", "--quiet", "--out", str(out)]
    assert train_cli.main(args) == 0
    assert calls  # MaskNet saw TF1 bicubic inputs during the meta-step
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    start = torch.load(converted, weights_only=True)
    config = state["config"]
    assert (config["num_feat"], config["num_block"], config["num_grow_ch"], config["masknet_feat"],
            config["masknet_upsample"], config["init"]) == (8, 2, 4, 8, "tf1", str(converted))
    assert state["step"] == 1
    assert set(state["sr"]) == set(start["sr"])
    moved = [k for k in start["sr"] if not torch.equal(state["sr"][k], start["sr"][k])]
    assert len(moved) > len(start["sr"]) // 2  # the meta-step changed the converted weights
    assert any(not torch.equal(state["masknet"][k], start["masknet"][k]) for k in start["masknet"])
    assert torch.load(converted, weights_only=True)["config"]["masknet_upsample"] == "tf1"


def test_init_refuses_a_plain_rrdbnet_and_a_second_source(converted, tmp_path, capsys):
    from metaf2n import train as train_cli
    from metaf2n.models import RRDBNet

    plain = tmp_path / "plain.pth"
    torch.save({"params_ema": RRDBNet(num_feat=8, num_block=1, num_grow_ch=4).state_dict()}, plain)
    with pytest.raises(SystemExit):
        train_cli.main(["--init", str(plain), "--out", str(tmp_path / "a"), "--quiet"])
    assert "is not a metaf2n checkpoint (it has no config)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--init", str(converted), "--init-sr", str(plain), "--out", str(tmp_path / "b"), "--quiet"])
    assert "--init and --init-sr both set the SR weights" in capsys.readouterr().err


def test_a_run_started_with_init_resumes_without_the_init_file(converted, tmp_path):
    from metaf2n import train as train_cli

    start = tmp_path / "start.pt"
    shutil.copy(converted, start)
    out = tmp_path / "run"
    args = ["--tasks", "1", "--face-patches", "1", "--background-patches", "1", "--face-patch-size", "32",
            "--face-size", "64", "--background-patch-size", "32", "--background-crop-size", "64", "--val-tasks", "1",
            "--d-num-feat", "8", "--warmup-steps", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    assert train_cli.main(["--init", str(start), "--steps", "1", *args]) == 0
    start.unlink()
    assert train_cli.main(["--resume", "--steps", "2", *args]) == 0
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["masknet_upsample"] == "tf1"
