"""Test-time adaptation and evaluation: metaf2n.inference, metaf2n.infer, metaf2n.evaluate, metaf2n.metrics and
metaf2n.data.make_testset, end to end on the demo data."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import degraded, photo
from metaf2n import evaluate as evaluate_cli
from metaf2n import infer as infer_cli
from metaf2n.data.make_testset import make_testset
from metaf2n.data.restorers import TorchScriptRestorer
from metaf2n.faces import HaarFaceDetector
from metaf2n.inference import (
    FacePair,
    SRModel,
    adapt_to_faces,
    faces_from_photo,
    load_model,
    sample_face_patches,
    tiled_super_resolve,
)
from metaf2n.io import read_jsonl
from metaf2n.metrics import psnr_y, ssim_y, to_y
from metaf2n.models import MaskNet, RRDBNet


def save_rgb(path: Path, image: torch.Tensor) -> Path:
    Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def testset(tmp_path_factory) -> Path:
    return make_testset(tmp_path_factory.mktemp("sets") / "iid", "iid", count=3, seed=0, progress=False)


def tiny_model(seed: int = 0) -> SRModel:
    torch.manual_seed(seed)
    return SRModel(RRDBNet(num_feat=8, num_block=1, num_grow_ch=8).eval(), MaskNet(num_feat=8).eval(), 1e-2, "test")


# --- tiling ------------------------------------------------------------------------------------------------------
def test_tiled_sr_equals_the_whole_photo_when_the_overlap_covers_the_receptive_field():
    model = tiny_model().sr
    lr = photo("astronaut", 100, 150, 90)[:, :, :70, :]
    whole = tiled_super_resolve(model, lr, tile=0)
    tiled = tiled_super_resolve(model, lr, tile=32, overlap=24)
    assert tiled.shape == (1, 3, 280, 360)
    assert (tiled - whole).abs().max() < 1e-4
    seams = tiled_super_resolve(model, lr, tile=32, overlap=0)
    assert (seams - whole).abs().max() > 1e-3  # the test can see a tiling error


def test_tiled_sr_uses_the_given_fast_weights():
    model = tiny_model().sr
    lr = photo("coffee", 100, 100, 24)
    params = {n: p.detach() * 1.1 for n, p in model.named_parameters()}
    shifted = tiled_super_resolve(model, lr, params, tile=16, overlap=8)
    assert not torch.allclose(shifted, tiled_super_resolve(model, lr, tile=16, overlap=8))


# --- adaptation --------------------------------------------------------------------------------------------------
def test_patches_are_aligned_pairs_and_small_faces_are_used_whole():
    big_hq = photo("astronaut", 0, 0, 128)[0]
    big_lr = F.interpolate(big_hq[None], scale_factor=0.25, mode="area")[0]
    small_hq = photo("coffee", 0, 0, 48)[0]
    small_lr = F.interpolate(small_hq[None], scale_factor=0.25, mode="area")[0]
    lrs, hqs = sample_face_patches([FacePair(big_lr, big_hq), FacePair(small_lr, small_hq)], 5,
                                   torch.Generator().manual_seed(0))
    assert [g.shape for g in lrs] == [(5, 3, 16, 16), (1, 3, 12, 12)]
    assert [g.shape for g in hqs] == [(5, 3, 64, 64), (1, 3, 48, 48)]
    # each LR patch is the area-downscaled HQ patch: the crops are aligned
    torch.testing.assert_close(F.interpolate(hqs[0], scale_factor=0.25, mode="area"), lrs[0], atol=1e-6, rtol=0)


def test_adaptation_lowers_the_face_patch_loss_and_leaves_the_model_alone():
    model = tiny_model()
    hq = photo("astronaut", 0, 150, 128)[0]
    lr = F.interpolate(hq[None], scale_factor=0.25, mode="area")[0]
    before = {k: v.clone() for k, v in model.sr.state_dict().items()}
    lrs, hqs = sample_face_patches([FacePair(lr, hq)], 16, torch.Generator().manual_seed(1))
    result = adapt_to_faces(model, lrs, hqs, steps=3, inner_lr=0.05)
    assert result.inner_after < result.inner_before
    assert all(torch.equal(before[k], v) for k, v in model.sr.state_dict().items())
    assert any(not torch.equal(result.params[k], before[k]) for k in result.params)


def test_without_masknet_the_weights_are_one():
    model = tiny_model()
    hq = photo("astronaut", 0, 150, 64)[0]
    lr = F.interpolate(hq[None], scale_factor=0.25, mode="area")[0]
    lrs, hqs = sample_face_patches([FacePair(lr, hq)], 4, torch.Generator().manual_seed(1))
    plain = adapt_to_faces(SRModel(model.sr, None, 1e-2, "rrdbnet"), lrs, hqs, steps=1)
    expected = (model.sr(lrs[0]) - hqs[0]).abs().mean()
    assert plain.inner_before == pytest.approx(float(expected), rel=1e-5)


def test_faces_from_photo_detects_and_restores_at_the_restorers_size(restorer_file):
    hr = photo("astronaut", 0, 0, 512)[0]
    lr = F.interpolate(hr[None], scale_factor=0.25, mode="area")[0]
    calls = []
    restorer = TorchScriptRestorer(restorer_file, value_range=(-1.0, 1.0))

    def spy(x, gt=None):
        calls.append(tuple(x.shape))
        return restorer(x)

    pairs, found = faces_from_photo(lr, HaarFaceDetector(), spy, restorer_size=96, margin=1.5)
    assert found == len(pairs) == 1 and calls == [(1, 3, 96, 96)]
    top, left, side = pairs[0].box
    assert pairs[0].lr.shape == (3, side, side) and pairs[0].hq.shape == (3, 4 * side, 4 * side)
    torch.testing.assert_close(pairs[0].lr, lr[:, top : top + side, left : left + side])


# --- the infer command -------------------------------------------------------------------------------------------
def test_every_command_has_help():
    for module in ("metaf2n.train", "metaf2n.infer", "metaf2n.evaluate", "metaf2n.data.make_testset",
                   "metaf2n.weights"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage" in result.stdout, module


def test_infer_with_precomputed_faces_adapts_every_photo(testset, checkpoint, tmp_path):
    out = tmp_path / "out"
    code = infer_cli.main([str(testset / "LQ"), "-o", str(out), "--checkpoint", str(checkpoint), "--face-lq",
                           str(testset / "Face_LQ"), "--face-hq", str(testset / "Face_HQ"), "--quiet"])
    assert code == 0
    records = read_jsonl(out / "summary.jsonl")
    assert [r["image"] for r in records] == ["0000.png", "0001.png", "0002.png"]
    for record in records:
        assert record["adapted"] and record["faces_used"] == 1 and record["patches"] == 16
        assert record["inner_after"] < record["inner_before"]
        assert Image.open(out / record["output"]).size == (512, 512)


def test_infer_is_reproducible_and_never_leaks_weights_between_photos(testset, checkpoint, tmp_path):
    common = ["--checkpoint", str(checkpoint), "--face-lq", str(testset / "Face_LQ"), "--face-hq",
              str(testset / "Face_HQ"), "--quiet"]
    both, single = tmp_path / "both", tmp_path / "single"
    assert infer_cli.main([str(testset / "LQ" / "0000.png"), str(testset / "LQ" / "0001.png"), "-o", str(both),
                           *common]) == 0
    assert infer_cli.main([str(testset / "LQ" / "0001.png"), "-o", str(single), *common]) == 0
    a = np.asarray(Image.open(both / "0001.png"))
    b = np.asarray(Image.open(single / "0001.png"))
    assert np.array_equal(a, b)


def test_a_photo_without_a_face_falls_back_to_the_unadapted_model(checkpoint, restorer_file, tmp_path):
    lr = F.interpolate(photo("coffee", 0, 0, 256), scale_factor=0.25, mode="area")[0]
    path = save_rgb(tmp_path / "coffee.png", lr)
    out = tmp_path / "out"
    code = infer_cli.main([str(path), "-o", str(out), "--checkpoint", str(checkpoint), "--restorer",
                           str(restorer_file), "--restorer-range", "-1,1", "--quiet"])
    assert code == 0
    (record,) = read_jsonl(out / "summary.jsonl")
    assert record["adapted"] is False and record["reason"] == "no face detected" and record["faces_found"] == 0
    model = load_model(checkpoint)
    saved = infer_cli.read_rgb_photo(path)  # the 8-bit photo the command read
    expected = tiled_super_resolve(model.sr, saved[None], None, tile=256, overlap=32)[0]
    got = torch.from_numpy(np.asarray(Image.open(out / "coffee.png")).copy()).permute(2, 0, 1).float() / 255
    assert (got - expected).abs().max() <= 0.5 / 255 + 1e-6


def test_detection_with_a_torchscript_restorer_adapts_end_to_end(testset, checkpoint, restorer_file, tmp_path):
    out = tmp_path / "out"
    assert infer_cli.main([str(testset / "LQ"), "-o", str(out), "--checkpoint", str(checkpoint), "--restorer",
                           str(restorer_file), "--restorer-range", "-1,1", "--restorer-size", "128",
                           "--detector", "haar", "--quiet"]) == 0
    records = read_jsonl(out / "summary.jsonl")
    detected = [r for r in records if r["faces_found"] > 0]
    assert detected, records
    assert all(r["adapted"] for r in detected)
    assert all(not r["adapted"] and r["reason"] == "no face detected" for r in records if r["faces_found"] == 0)
    assert evaluate_cli.main(["--results", str(out), "--gt", str(testset / "GT"), "--out", str(tmp_path / "eval"),
                              "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert [r["image"] for r in rows] == ["0000", "0001", "0002"]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("psnr_y", "ssim_y", "lpips"))


def test_bad_files_are_reported_and_the_others_processed(checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = photo("astronaut", 0, 0, 40)[0]
    save_rgb(folder / "good.png", good)
    (folder / "broken.png").write_bytes(b"not a png")
    Image.fromarray((good[0].numpy() * 255).astype(np.uint8)).save(folder / "grey.png")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(folder / "rgba.png")
    out = tmp_path / "out"
    code = infer_cli.main([str(folder), "-o", str(out), "--checkpoint", str(checkpoint), "--tile", "64", "--quiet"])
    assert code == 1
    records = {r["image"]: r for r in read_jsonl(out / "summary.jsonl")}
    assert "cannot be read" in records["broken.png"]["error"]
    assert "L image" in records["grey.png"]["error"] and "RGBA image" in records["rgba.png"]["error"]
    assert records["good.png"]["output"] == "good.png"  # smaller than a tile: processed whole
    assert Image.open(out / "good.png").size == (160, 160)


def test_a_plain_rrdbnet_checkpoint_works_without_masknet(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": RRDBNet().state_dict()}, path)
    model = load_model(path)
    assert model.masknet is None and model.source == "rrdbnet"


@pytest.mark.parametrize("argv,needle", [
    (["--face-lq", "/nonexistent"], "--face-lq and --face-hq"),
    (["--patches", "0"], "--patches"),
    (["--restorer", "/nonexistent.pt"], "--restorer"),
    (["--restorer-range", "1,0"], "--restorer-range"),
    (["--engine", "winograd"], "--engine winograd needs"),  # the fixture's network has 8 channels
])
def test_bad_infer_flags_name_the_flag(argv, needle, checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer_cli.main([str(tmp_path), "-o", str(tmp_path / "o"), "--checkpoint", str(checkpoint), *argv])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


# --- metrics and evaluate ----------------------------------------------------------------------------------------
def test_psnr_of_a_known_uniform_error():
    gt = torch.full((3, 32, 32), 100 / 255, dtype=torch.float64)
    result = torch.full((3, 32, 32), 110 / 255, dtype=torch.float64)
    # every channel is off by 10/255, so Y is off by (65.481 + 128.553 + 24.966) * 10 / 255 on the 0..255 scale
    dy = (65.481 + 128.553 + 24.966) * 10 / 255
    assert psnr_y(result, gt) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-9)
    assert psnr_y(gt, gt) == math.inf


def test_luma_weights_are_not_swapped():
    red, blue = torch.zeros(3, 1, 1), torch.zeros(3, 1, 1)
    red[0], blue[2] = 1.0, 1.0
    assert float(to_y(red)) == pytest.approx(16 + 65.481) and float(to_y(blue)) == pytest.approx(16 + 24.966)


def test_ssim_matches_scikit_image_on_the_same_luma():
    from skimage.metrics import structural_similarity

    gt = photo("astronaut", 0, 0, 96)[0]
    result = degraded(gt[None])[0]
    expected = structural_similarity(to_y(result)[4:-4, 4:-4].numpy(), to_y(gt)[4:-4, 4:-4].numpy(),
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert ssim_y(result, gt) == pytest.approx(expected, abs=1e-9)
    assert ssim_y(gt, gt) == pytest.approx(1.0)


def test_lpips_matches_the_lpips_package_with_the_same_weights(lpips_model):
    import lpips

    from metaf2n.weights import find_lpips_alexnet

    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    state = torch.load(find_lpips_alexnet(), map_location="cpu", weights_only=True)
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    reference.net.load_state_dict({f"slice{slices[i]}.{i}.{kind}": state[f"features.{i}.{kind}"]
                                   for i in slices for kind in ("weight", "bias")})
    gt = torch.cat([photo("astronaut", 0, 0, 64), photo("coffee", 50, 50, 64)])
    result = degraded(gt)
    expected = reference(result, gt, normalize=True).flatten()
    torch.testing.assert_close(lpips_model(result, gt), expected)


def test_evaluate_reports_missing_and_mismatched_pairs(tmp_path, capsys):
    results, gt = tmp_path / "results", tmp_path / "gt"
    results.mkdir()
    gt.mkdir()
    image = photo("astronaut", 0, 0, 48)[0]
    for name in ("a", "b"):
        save_rgb(results / f"{name}.png", degraded(image[None])[0])
        save_rgb(gt / f"{name}.png", image)
    save_rgb(results / "only_result.png", image)
    save_rgb(gt / "only_gt.png", image)
    save_rgb(results / "sized.png", image)
    save_rgb(gt / "sized.png", photo("astronaut", 0, 0, 40)[0])
    code = evaluate_cli.main(["--results", str(results), "--gt", str(gt), "--out", str(tmp_path / "o"), "--strips",
                              "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "only_result.png" in err and "only_gt.png" in err and "sized.png" in err
    rows = list(csv.DictReader(open(tmp_path / "o" / "metrics.csv")))
    assert [r["image"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == ["method", "image", "psnr_y", "ssim_y", "lpips"] and rows[0]["method"] == "results"
    assert float(rows[0]["psnr_y"]) == pytest.approx(psnr_y(degraded(image[None])[0], image), abs=1e-3)
    assert (tmp_path / "o" / "strips" / "a.png").is_file()
    assert "3 problem(s)" in (tmp_path / "o" / "summary.md").read_text()


def test_evaluate_compares_several_methods_and_bicubic_in_one_table(tmp_path):
    gt_dir, lq_dir, a_dir, b_dir = (tmp_path / n for n in ("gt", "lq", "a", "b"))
    for folder in (gt_dir, lq_dir, a_dir, b_dir):
        folder.mkdir()
    images = {"p": photo("astronaut", 100, 150, 64)[0], "q": photo("coffee", 50, 200, 64)[0]}
    for name, image in images.items():
        save_rgb(gt_dir / f"{name}.png", image)
        lq = F.interpolate(image[None], scale_factor=0.25, mode="area")
        save_rgb(lq_dir / f"{name}.png", lq[0])
        save_rgb(a_dir / f"{name}.png", degraded(image[None])[0])
        save_rgb(b_dir / f"{name}.png", image.flip(-1))
    out = tmp_path / "eval"
    assert evaluate_cli.main(["--results", f"first={a_dir}", "--results", str(b_dir), "--bicubic", str(lq_dir),
                              "--gt", str(gt_dir), "--out", str(out), "--strips", "--no-lpips", "--quiet",
                              "--note", "a note for the reader"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [(r["method"], r["image"]) for r in rows] == [
        ("bicubic", "p"), ("bicubic", "q"), ("first", "p"), ("first", "q"), ("b", "p"), ("b", "q")]
    gt = read_image_8bit(gt_dir / "p.png")
    lq = read_image_8bit(lq_dir / "p.png")
    bicubic = F.interpolate(lq[None], scale_factor=4, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    bicubic = (bicubic * 255 + 0.5).floor() / 255  # written as an 8-bit PNG
    assert float(rows[0]["psnr_y"]) == pytest.approx(psnr_y(bicubic, gt), abs=1e-5)
    assert float(rows[4]["psnr_y"]) == pytest.approx(psnr_y(read_image_8bit(b_dir / "p.png"), gt), abs=1e-5)
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| bicubic", "| first", "| b"]
    mean_b = np.mean([float(r["psnr_y"]) for r in rows if r["method"] == "b"])
    assert f"| b | {mean_b:.3f} |" in summary and "a note for the reader" in summary
    # one strip per image: bicubic | first | b | ground truth, 64 px each with 8 px gaps, under a 14 px label band
    assert Image.open(out / "strips" / "p.png").size == (4 * 64 + 3 * 8, 64 + 14)


def test_evaluate_refuses_duplicate_labels(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--results", f"x={tmp_path}", "--results", f"x={tmp_path}", "--gt", str(tmp_path),
                           "--out", str(tmp_path / "o")])
    assert "two methods labelled 'x'" in capsys.readouterr().err


def read_image_8bit(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float64)).permute(2, 0, 1).float() / 255


# --- the synthetic test set --------------------------------------------------------------------------------------
def test_testset_layout_is_seeded_and_aligned(testset, tmp_path):
    assert sorted(p.name for p in testset.iterdir()) == ["Face_HQ", "Face_LQ", "GT", "LQ", "faces.json",
                                                         "manifest.json"]
    boxes = json.loads((testset / "faces.json").read_text())
    top, left, side = boxes["0000"][0]
    gt = np.asarray(Image.open(testset / "GT" / "0000.png"))
    face_hq = np.asarray(Image.open(testset / "Face_HQ" / "0000.png"))
    assert np.array_equal(face_hq, gt[4 * top : 4 * (top + side), 4 * left : 4 * (left + side)])
    lq = np.asarray(Image.open(testset / "LQ" / "0000.png"))
    assert lq.shape == (128, 128, 3)
    assert np.array_equal(np.asarray(Image.open(testset / "Face_LQ" / "0000.png")),
                          lq[top : top + side, left : left + side])
    again = make_testset(tmp_path / "again", "iid", count=1, seed=0, progress=False)
    assert np.array_equal(np.asarray(Image.open(again / "LQ" / "0000.png")), lq)


def test_ood_draws_lie_outside_the_training_ranges():
    from metaf2n.data.make_testset import OOD_DEGRADATION
    from metaf2n.degrade import sample_degradation

    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        params = sample_degradation(generator, OOD_DEGRADATION)
        first, second = params.first, params.second
        assert first.jpeg_quality <= 30 and second.jpeg_quality <= 30  # training: 30..95
        assert first.noise.kind == "gaussian" and first.noise.level >= 30  # training: 1..30


# --- no silent overwrite or loss ------------------------------------------------------------------------------------
def test_infer_never_writes_over_its_inputs_or_an_earlier_run(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    original = save_rgb(folder / "p.png", photo("astronaut", 0, 0, 24)[0]).read_bytes()
    common = ["--checkpoint", str(checkpoint), "--steps", "0", "--quiet"]
    with pytest.raises(SystemExit):
        infer_cli.main([str(folder), "-o", str(folder), *common])
    assert "the result p.png would overwrite the input photo" in capsys.readouterr().err
    assert (folder / "p.png").read_bytes() == original and not (folder / "summary.jsonl").exists()
    out = tmp_path / "out"
    assert infer_cli.main([str(folder), "-o", str(out), *common]) == 0
    with pytest.raises(SystemExit):
        infer_cli.main([str(folder), "-o", str(out), *common])
    assert "already holds results (p.png, summary.jsonl); pass --overwrite" in capsys.readouterr().err
    assert infer_cli.main([str(folder), "-o", str(out), "--overwrite", *common]) == 0
    assert [r["image"] for r in read_jsonl(out / "summary.jsonl")] == ["p.png", "p.png"]  # both runs' records


def test_inputs_sharing_a_name_get_distinct_results(checkpoint, tmp_path):
    for folder, size in (("a", 24), ("b", 28)):
        (tmp_path / folder).mkdir()
        save_rgb(tmp_path / folder / "photo.png", photo("astronaut", 0, 0, size)[0])
    Image.open(tmp_path / "a" / "photo.png").save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    assert infer_cli.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "photo.jpg"), "-o", str(out),
                           "--checkpoint", str(checkpoint), "--steps", "0", "--quiet"]) == 0
    records = read_jsonl(out / "summary.jsonl")
    assert [r["output"] for r in records] == ["photo.png", "photo-2.png", "photo-3.png"]
    assert [Image.open(out / r["output"]).size for r in records] == [(96, 96), (112, 112), (96, 96)]
