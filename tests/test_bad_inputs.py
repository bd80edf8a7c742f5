"""One line, naming the file or flag, for every unreadable or wrong input; and images read as a person sees them
(EXIF orientation, 16-bit grey)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from metaf2n import evaluate as evaluate_cli
from metaf2n import infer as infer_cli
from metaf2n import train as train_cli
from metaf2n.data.images import read_image


def bad_files(tmp_path):
    """Files that are not checkpoints: empty, random bytes, a truncated torch file, an unsafe pickle, a folder."""
    good = tmp_path / "good.pt"
    torch.save({"x": torch.zeros(100)}, good)
    files = {
        "empty": (tmp_path / "empty.pt", "is empty"),
        "random": (tmp_path / "random.pt", "cannot be read"),
        "truncated": (tmp_path / "truncated.pt", "cannot be read: truncated, corrupt or not a torch file"),
        "unsafe": (tmp_path / "unsafe.pt", "is refused: an unsafe pickle (it would run posix.system)"),
        "folder": (tmp_path / "folder.pt", "is a folder, not a file"),
    }
    files["empty"][0].write_bytes(b"")
    files["random"][0].write_bytes(os.urandom(2048))
    files["truncated"][0].write_bytes(good.read_bytes()[:200])
    torch.save({"hook": os.system}, files["unsafe"][0])
    files["folder"][0].mkdir()
    return files


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "unsafe", "folder"])
def test_bad_checkpoint_files_get_one_line(kind, tmp_path, capsys):
    path, message = bad_files(tmp_path)[kind]
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "p.png")
    with pytest.raises(SystemExit):
        infer_cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and f"--checkpoint {str(path)!r}" in err
    with pytest.raises(SystemExit):
        train_cli.main(["--resume", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert message in err and "--resume" in err


def test_resume_of_a_tensor_or_a_discriminator_file_is_named(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"params": {"conv0.weight": torch.zeros(1)}}, tmp_path / "disc.pt")
    for name in ("tensor.pt", "disc.pt"):
        with pytest.raises(SystemExit):
            train_cli.main(["--resume", str(tmp_path / name), "--out", str(tmp_path / "run"), "--quiet"])
        assert f"{name}' is not a metaf2n checkpoint (it has no config)" in capsys.readouterr().err


def test_a_checkpoint_whose_config_disagrees_with_its_weights(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["num_block"] = 3
    torch.save(state, tmp_path / "liar.pt")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "p.png")
    with pytest.raises(SystemExit):
        infer_cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "liar.pt")])
    assert "liar.pt': its config does not match its weights" in capsys.readouterr().err


def test_invalid_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: [1, 2\nlr: 3\n")
    with pytest.raises(SystemExit):
        train_cli.main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")])
    assert "c.yaml' is not valid YAML at line" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "nan", "1e9"])
def test_face_margin_out_of_range_is_refused(value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        infer_cli.main([str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", "c.pt", "--face-margin", value])
    assert "--face-margin must be in [0.5, 10]" in capsys.readouterr().err


def test_exif_orientation_is_applied(tmp_path):
    image = photo("astronaut", 0, 0, 40)[0, :, :24, :]  # 24 rows x 40 columns
    rgb = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = read_image(tmp_path / "rotated.jpg")
    assert upright.shape == (3, 40, 24)
    expected = torch.from_numpy(np.rot90(rgb, k=-1).copy()).permute(2, 0, 1).float() / 255
    assert (upright - expected).abs().mean() < 0.02  # JPEG noise only
    assert infer_cli.read_rgb_photo(tmp_path / "rotated.jpg").shape == (3, 40, 24)


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # a 16-bit grey PNG
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (3, 1, 4)
    np.testing.assert_allclose(image[0, 0].numpy(), values[0] / 65535, atol=1e-7)


def test_evaluate_names_unreadable_and_too_small_images(tmp_path, capsys):
    results, gt = tmp_path / "r", tmp_path / "g"
    results.mkdir()
    gt.mkdir()
    good = (photo("astronaut", 0, 0, 48)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    for folder in (results, gt):
        Image.fromarray(good).save(folder / "ok.png")
        Image.fromarray(good[:12, :12]).save(folder / "tiny.png")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    code = evaluate_cli.main(["--results", str(results), "--gt", str(gt), "--out", str(tmp_path / "o"), "--no-lpips",
                              "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "broken.png / broken.png: cannot be read as an image" in err
    assert "tiny.png: 12x12 is too small for SSIM's 11x11 window after a crop border of 4" in err
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--results", str(results), "--gt", str(gt), "--out", str(tmp_path / "o2"), "--device",
                           "cuda:7", "--no-lpips"])
    assert "--device" in capsys.readouterr().err


def test_output_paths_that_are_files_or_read_only_get_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "p.png")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        infer_cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "a_file"), "--checkpoint", str(checkpoint)])
    assert "a_file' cannot be written" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--out", str(tmp_path / "a_file"), "--quiet"])
    assert "a_file' is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere: the read-only case only means something for other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            infer_cli.main([str(tmp_path / "in"), "-o", str(locked / "o"), "--checkpoint", str(checkpoint)])
        assert "cannot be written" in capsys.readouterr().err
