"""Image folders, face restorers, the task sampler and the embedded demo set."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metaf2n.data import (
    BackgroundFolder,
    FaceFolder,
    GroundTruthRestorer,
    ImageFolder,
    TaskConfig,
    TaskSampler,
    TorchScriptRestorer,
    build_demo_set,
    default_cache_dir,
    list_images,
    read_image,
    texture_score,
)
from metaf2n.data.demo import detect_faces
from metaf2n.data.images import crop_or_pad, resize_image
from metaf2n.degrade import (
    DegradationConfig,
    apply_degradation,
    sample_degradation,
    usm_sharpen,
)

SMALL = TaskConfig(
    face_patches=3,
    background_patches=2,
    face_patch_size=32,
    background_patch_size=32,
    face_size=64,
    background_crop_size=64,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def save_rgb(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def textured(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3))


def horizontal_ramp(h, w):
    """Dark on the left, bright on the right: tells mirrored patches from plain ones."""
    ramp = np.linspace(10, 245, w)[None, :, None]
    return np.broadcast_to(ramp, (h, w, 3)).round()


@pytest.fixture
def folders(tmp_path):
    faces, backgrounds = tmp_path / "faces", tmp_path / "backgrounds"
    (faces / "nested").mkdir(parents=True)
    backgrounds.mkdir()
    save_rgb(faces / "a.png", textured(96, 96, 0))
    save_rgb(faces / "nested" / "b.JPG", textured(80, 80, 1))
    Image.fromarray(textured(70, 70, 2).astype(np.uint8)).save(faces / "c.webp")
    (faces / "notes.txt").write_text("not an image")
    save_rgb(backgrounds / "ramp1.png", horizontal_ramp(90, 120))
    save_rgb(backgrounds / "ramp2.jpeg", horizontal_ramp(150, 100))
    return faces, backgrounds


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return build_demo_set(tmp_path_factory.mktemp("cache") / "demo")


# ----------------------------------------------------------------------------- folders


def test_list_and_read_images(folders):
    faces, _ = folders
    names = [p.relative_to(faces).as_posix() for p in list_images(faces)]
    assert names == ["a.png", "c.webp", "nested/b.JPG"]
    image = read_image(faces / "a.png")
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    assert torch.equal(image * 255, torch.from_numpy(textured(96, 96, 0)).permute(2, 0, 1).float())
    with pytest.raises(ValueError, match="existing directory"):
        list_images(faces / "missing")


def test_corrupt_files_are_skipped_with_one_warning_each(folders, caplog):
    faces, _ = folders
    (faces / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (faces / "empty.jpg").write_bytes(b"")
    folder = FaceFolder(faces, face_size=48)
    assert len(folder) == 5
    with caplog.at_level(logging.WARNING, logger="metaf2n.data.images"):
        draws = [folder.draw(gen(i)) for i in range(40)]
    assert all(d.shape == (3, 48, 48) and 0 <= d.min() and d.max() <= 1 for d in draws)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert sum("broken.png" in m for m in messages) == 1 and sum("empty.jpg" in m for m in messages) == 1


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg/.webp images"):
        ImageFolder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    folder = ImageFolder(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        folder.draw(gen())


def test_crop_or_pad_sizes_and_content():
    g = gen(3)
    big = torch.rand(3, 50, 70, generator=g)
    crop = crop_or_pad(big, 40, g)
    windows = big.unfold(1, 40, 1).unfold(2, 40, 1)  # (3, 11, 31, 40, 40)
    assert any(torch.equal(windows[:, i, j], crop) for i in range(11) for j in range(31))
    padded = crop_or_pad(torch.rand(3, 30, 45, generator=g), 40, g)  # reflect-padded (30 > 40 / 2)
    upscaled = crop_or_pad(torch.rand(3, 12, 60, generator=g), 40, g)  # too small to reflect: upscaled
    assert padded.shape == upscaled.shape == (3, 40, 40)
    ramp = torch.linspace(0, 1, 30).view(1, 30, 1).expand(3, 30, 45)
    column = crop_or_pad(ramp, 40, g)[0, :, 0]
    assert column.argmax() < 39  # the bottom rows are a reflection, so the ramp turns back


def test_background_folder_crops(folders):
    _, backgrounds = folders
    folder = BackgroundFolder(backgrounds, crop_size=64)
    crops = [folder.draw(gen(i)) for i in range(4)]
    assert all(c.shape == (3, 64, 64) for c in crops)


# ----------------------------------------------------------------------------- restorers


class Invert(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Shrink(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::2, ::2]


def scripted(module, tmp_path, name):
    path = tmp_path / f"{name}.pt"
    torch.jit.script(module).save(str(path))
    return path


def test_torchscript_restorer(tmp_path):
    x = torch.rand(2, 3, 16, 16, generator=gen())
    assert torch.allclose(TorchScriptRestorer(scripted(Invert(), tmp_path, "inv"))(x), 1 - x)
    doubled = TorchScriptRestorer(scripted(Double(), tmp_path, "double"))(x)
    assert torch.allclose(doubled, (2 * x).clamp(0, 1)) and doubled.max() == 1
    # value_range (-1, 1): the module sees v = 2x - 1 and returns 1 - v = 2 - 2x, read back as (3 - 2x) / 2
    symmetric = TorchScriptRestorer(scripted(Invert(), tmp_path, "inv2"), value_range=(-1.0, 1.0))
    assert torch.allclose(symmetric(x), (1.5 - x).clamp(0, 1))
    with pytest.raises(ValueError, match="output must have shape"):
        TorchScriptRestorer(scripted(Shrink(), tmp_path, "shrink"))(x)
    with pytest.raises(ValueError, match="value_range"):
        TorchScriptRestorer(scripted(Invert(), tmp_path, "inv3"), value_range=(1.0, 0.0))


def test_ground_truth_restorer_needs_gt():
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(GroundTruthRestorer()(torch.zeros_like(x), gt=x), x)
    with pytest.raises(ValueError, match="needs gt"):
        GroundTruthRestorer()(x)


# ----------------------------------------------------------------------------- task sampler


def test_task_batch_shapes_ranges_and_determinism(folders):
    faces, backgrounds = folders
    sampler = TaskSampler(faces, backgrounds, config=SMALL)
    batch = sampler.sample(2, gen(5))
    expected = {
        "face_lr": (2, 3, 3, 8, 8),
        "face_pseudo": (2, 3, 3, 32, 32),
        "face_gt": (2, 3, 3, 32, 32),
        "bg_lr": (2, 2, 3, 8, 8),
        "bg_hr_usm": (2, 2, 3, 32, 32),
        "bg_hr": (2, 2, 3, 32, 32),
    }
    for name, shape in expected.items():
        value = getattr(batch, name)
        assert value.shape == shape, name
        assert value.dtype == torch.float32 and value.min() >= 0 and value.max() <= 1, name
    assert batch.num_tasks == 2 and len(batch.degradations) == 2
    for lr in (batch.face_lr, batch.bg_lr):
        assert torch.equal(lr * 255, (lr * 255).round())
    assert torch.equal(batch.face_pseudo, batch.face_gt)  # default restorer: ground truth
    assert not torch.equal(batch.bg_hr_usm, batch.bg_hr)

    again = sampler.sample(2, gen(5))
    other = sampler.sample(2, gen(6))
    for name in expected:
        assert torch.equal(getattr(batch, name), getattr(again, name)), name
    assert not torch.equal(batch.face_lr, other.face_lr)
    assert batch.degradations[0].describe() == again.degradations[0].describe()


def test_patches_are_aligned_and_flipped_jointly(folders):
    _, backgrounds = folders
    sampler = TaskSampler(backgrounds, backgrounds, config=SMALL)  # ramps as faces too
    batch = sampler.sample(4, gen(1))
    orientations = []
    for lr, hr, usm in zip(batch.bg_lr.flatten(0, 1), batch.bg_hr.flatten(0, 1), batch.bg_hr_usm.flatten(0, 1)):
        hr_slope = (hr[..., -1] - hr[..., 0]).mean()
        assert torch.sign(hr_slope) == torch.sign((lr[..., -1] - lr[..., 0]).mean())
        assert torch.sign(hr_slope) == torch.sign((usm[..., -1] - usm[..., 0]).mean())
        orientations.append(hr_slope > 0)
    for lr, gt in zip(batch.face_lr.flatten(0, 1), batch.face_gt.flatten(0, 1)):
        assert torch.sign((gt[..., -1] - gt[..., 0]).mean()) == torch.sign((lr[..., -1] - lr[..., 0]).mean())
        orientations.append((gt[..., -1] - gt[..., 0]).mean() > 0)
    assert 0 < sum(orientations) < len(orientations)  # both plain and mirrored patches occur


def test_pseudo_labels_come_from_the_restorer_on_the_upsampled_lr_face(folders, tmp_path):
    faces, backgrounds = folders
    restorer = TorchScriptRestorer(scripted(Invert(), tmp_path, "inv"))
    config = TaskConfig(**{**SMALL.__dict__, "hflip": False})
    batch = TaskSampler(faces, backgrounds, restorer=restorer, config=config).sample(1, gen(2))
    for lr, pseudo in zip(batch.face_lr[0], batch.face_pseudo[0]):
        upsampled = F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]
        # cropping and bicubic upsampling commute away from the patch border (kernel reach: 2 LR pixels)
        assert torch.allclose(pseudo[:, 8:-8, 8:-8], 1 - upsampled[:, 8:-8, 8:-8], atol=1e-5)
    # a plain callable works as a restorer too
    plain = TaskSampler(faces, backgrounds, restorer=lambda x: 1 - x, config=config).sample(1, gen(2))
    assert torch.allclose(plain.face_pseudo, batch.face_pseudo, atol=1e-6)


def test_task_config_and_sampler_validation(folders):
    with pytest.raises(ValueError, match="face_patch_size"):
        TaskConfig(face_patch_size=30)
    with pytest.raises(ValueError, match="background_patch_size must be <="):
        TaskConfig(background_patch_size=512)
    sampler = TaskSampler(*folders, config=SMALL)
    with pytest.raises(ValueError, match="num_tasks"):
        sampler.sample(0, gen())
    with pytest.raises(TypeError, match="generator"):
        sampler.sample(1, 0)
    with pytest.raises(TypeError, match="restorer"):
        TaskSampler(*folders, restorer=3, config=SMALL)


# ----------------------------------------------------------------------------- demo set


def test_demo_set_builds_offline_with_a_detected_face(demo_dirs):
    faces_dir, backgrounds_dir = demo_dirs
    faces, backgrounds = list_images(faces_dir), list_images(backgrounds_dir)
    assert len(faces) >= 4 and len(backgrounds) >= 4
    for path in faces:
        with Image.open(path) as img:
            assert img.size == (256, 256) and img.mode == "RGB"
    with Image.open(faces[0]) as img:
        assert len(detect_faces(np.asarray(img))) >= 1
    cache = faces_dir.parent
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no staging directory left behind
    check_demo_set_contents(demo_dirs)


def test_demo_set_is_cached_and_deterministic(demo_dirs, tmp_path):
    faces_dir, _ = demo_dirs
    stamp = {p: p.stat().st_mtime_ns for p in list_images(faces_dir)}
    assert build_demo_set(faces_dir.parent) == demo_dirs
    assert {p: p.stat().st_mtime_ns for p in list_images(faces_dir)} == stamp
    rebuilt_faces, _ = build_demo_set(tmp_path / "second")
    for a, b in zip(list_images(faces_dir), list_images(rebuilt_faces)):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METAF2N_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv("METAF2N_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "metaf2n", "demo")


def test_sampler_defaults_to_the_demo_set(demo_dirs):
    sampler = TaskSampler(config=SMALL, demo_cache_dir=demo_dirs[0].parent)
    batch = sampler.sample(1, gen(0))
    assert batch.face_gt.shape == (1, 3, 3, 32, 32) and batch.bg_hr.shape == (1, 2, 3, 32, 32)


def test_background_edge_masks_are_cut_from_the_whole_crop():
    from metaf2n.ssl import edge_mask

    config = TaskConfig(face_patches=1, background_patches=3, face_patch_size=32, face_size=64,
                        background_patch_size=48, background_crop_size=96)
    batch = TaskSampler(config=config).sample(2, torch.Generator().manual_seed(4))
    assert batch.bg_edges.shape == batch.bg_edges_usm.shape == (2, 3, 48, 48)
    assert batch.bg_edges.dtype == torch.bool
    border_differs = False
    for edges, images in ((batch.bg_edges, batch.bg_hr), (batch.bg_edges_usm, batch.bg_hr_usm)):
        on_patch = edge_mask(images.flatten(0, 1)).view_as(edges)
        # away from the patch border the neighbours are the same, whatever was cropped or mirrored
        assert torch.equal(edges[..., 1:-1, 1:-1], on_patch[..., 1:-1, 1:-1])
        border_differs |= not torch.equal(edges, on_patch)
    assert border_differs  # on the border, the whole crop's true neighbours were used


def test_background_masks_equal_the_patch_mask_when_the_patch_is_the_whole_crop():
    from metaf2n.ssl import edge_mask

    config = TaskConfig(face_patches=1, background_patches=2, face_patch_size=32, face_size=64,
                        background_patch_size=64, background_crop_size=64, edge_threshold=10.0, edge_stride=2)
    batch = TaskSampler(config=config).sample(1, torch.Generator().manual_seed(2))
    hr = batch.bg_hr[0]
    expected = edge_mask(hr, 10.0, 2)
    flipped = edge_mask(hr.flip(-1), 10.0, 2).flip(-1)  # a mirrored patch keeps the stride of the unmirrored crop
    for q in range(2):
        assert torch.equal(batch.bg_edges[0, q], expected[q]) or torch.equal(batch.bg_edges[0, q], flipped[q])


# ----------------------------------------------------------------------------- what each task tensor is made from

# A degradation that only downscales (area, x1/4) and JPEG-codes at quality 100: no blur (1x1 kernels), no noise, no
# sinc. On grey images the JPEG round trip then changes a pixel by at most a level or two.
IDENTITY = DegradationConfig(
    kernel_sizes=(1,), sinc_prob=0.0, sinc_prob2=0.0, second_blur_prob=0.0, final_sinc_prob=0.0,
    resize_prob=(0.0, 0.0, 1.0), resize_prob2=(0.0, 0.0, 1.0), resize_modes=("area",),
    noise_range=(0.0, 0.0), poisson_scale_range=(0.0, 0.0), noise_range2=(0.0, 0.0), poisson_scale_range2=(0.0, 0.0),
    jpeg_range=(100.0, 100.0), jpeg_range2=(100.0, 100.0),
)


def blocky_grey(size, seed, block=4):
    """Grey texture of ``block``-pixel squares: sharpening changes it a lot, even averaged over 4x4 blocks."""
    low = np.random.default_rng(seed).integers(40, 216, (size // block, size // block))
    return np.repeat(np.repeat(low, block, 0), block, 1)[..., None].repeat(3, 2)


def area4(images):
    return F.avg_pool2d(images.flatten(0, 1), 4).view(*images.shape[:-2], images.shape[-2] // 4, -1)


@pytest.fixture
def grey_folders(tmp_path):
    faces, backgrounds = tmp_path / "grey_faces", tmp_path / "grey_backgrounds"
    faces.mkdir()
    backgrounds.mkdir()
    for i in range(2):
        save_rgb(faces / f"{i}.png", blocky_grey(64, i, block=8))
        save_rgb(backgrounds / f"{i}.png", blocky_grey(64, 10 + i, block=2))
    return faces, backgrounds


def test_identity_degradation_config_only_downscales():
    images = torch.from_numpy(blocky_grey(64, 0)).permute(2, 0, 1)[None].float() / 255
    for seed in range(3):
        lr = apply_degradation(sample_degradation(gen(seed), IDENTITY), images, gen(seed))
        assert (lr - area4(images)).abs().max() <= 2 / 255


@pytest.mark.parametrize("patch", [64, 32])
def test_background_lr_is_made_from_the_sharpened_background_and_aligned(grey_folders, patch):
    config = TaskConfig(face_patches=1, background_patches=3, face_patch_size=32, face_size=64,
                        background_patch_size=patch, background_crop_size=64, degradation=IDENTITY)
    batch = TaskSampler(*grey_folders, config=config).sample(2, gen(3))
    lr, usm, hr = (t.flatten(0, 1) for t in (batch.bg_lr, batch.bg_hr_usm, batch.bg_hr))
    # the LR patch is the (only downscaled) sharpened HR patch, pixel for pixel: same image, same place
    assert (lr - area4(usm)).abs().max() <= 3 / 255
    assert (lr - area4(hr)).abs().amax(dim=(1, 2, 3)).min() > 10 / 255  # not the unsharpened one
    if patch == 64:  # the whole crop: the L1 target is the sharpened discriminator target
        assert torch.allclose(usm, usm_sharpen(hr), atol=1e-5)
        sources = [torch.from_numpy(blocky_grey(64, 10 + i, block=2)).permute(2, 0, 1).float() / 255 for i in range(2)]
        for image in hr:  # the discriminator's real input is the unsharpened background (or its mirror)
            assert any(torch.equal(image, s) or torch.equal(image, s.flip(-1)) for s in sources)


def test_face_patches_with_a_restorer_that_is_not_the_ground_truth(grey_folders):
    config = TaskConfig(face_patches=3, background_patches=1, face_patch_size=32, face_size=64,
                        background_patch_size=32, background_crop_size=64, degradation=IDENTITY)
    batch = TaskSampler(*grey_folders, restorer=lambda x: 0.5 * x + 0.25, config=config).sample(2, gen(4))
    lr, pseudo, gt = (t.flatten(0, 1) for t in (batch.face_lr, batch.face_pseudo, batch.face_gt))
    assert (lr - area4(gt)).abs().max() <= 3 / 255  # LR and GT patches: same face, same place
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(pseudo[..., 8:-8, 8:-8], (0.5 * up + 0.25)[..., 8:-8, 8:-8], atol=1e-5)
    assert (pseudo - gt).abs().mean() > 0.05
    faces = [torch.from_numpy(blocky_grey(64, i, block=8)).permute(2, 0, 1).float() / 255 for i in range(2)]
    for patch in gt:  # the GT patch is cut from a face, at an LR-aligned offset, maybe mirrored
        assert any(torch.equal(patch, cand[:, y:y + 32, x:x + 32])
                   for face in faces for cand in (face, face.flip(-1)) for y in range(0, 33, 4) for x in range(0, 33, 4))


def test_hflip_false_never_mirrors(folders):
    _, backgrounds = folders
    config = TaskConfig(**{**SMALL.__dict__, "hflip": False})
    batch = TaskSampler(backgrounds, backgrounds, config=config).sample(3, gen(1))  # ramps: dark left, bright right
    for name in ("face_lr", "face_pseudo", "face_gt", "bg_lr", "bg_hr_usm", "bg_hr"):
        images = getattr(batch, name).flatten(0, 1)
        assert ((images[..., -1] - images[..., 0]).mean(dim=(1, 2)) > 0).all(), name


def test_the_texture_criterion_looks_at_the_pseudo_label(tmp_path):
    faces, backgrounds = tmp_path / "faces", tmp_path / "backgrounds"
    faces.mkdir()
    backgrounds.mkdir()
    save_rgb(faces / "flat.png", np.full((64, 64, 3), 128))  # the ground truth has no texture anywhere
    save_rgb(backgrounds / "bg.png", textured(64, 64, 1))
    texture = torch.from_numpy(textured(64, 16, 0)).permute(2, 0, 1).float() / 255
    assert texture_score(torch.full((3, 16, 16), 0.5)) < -20
    assert texture_score(texture[:, :16]) > -6

    def restorer(x):  # a pseudo label textured only in its left quarter
        out = torch.full_like(x, 0.5)
        out[..., :16] = texture
        return out

    def textured_fraction(tries):
        config = TaskConfig(**{**SMALL.__dict__, "face_patch_size": 16, "face_patches": 8, "texture_tries": tries})
        batch = TaskSampler(faces, backgrounds, restorer=restorer, config=config).sample(3, gen(4))
        return np.mean([texture_score(p) >= -6 for p in batch.face_pseudo.flatten(0, 1)])

    assert textured_fraction(6) >= 0.75
    assert textured_fraction(1) <= 0.5


def test_task_batch_select_and_to(folders):
    batch = TaskSampler(*folders, config=SMALL).sample(3, gen(2))
    part = batch.select(1, 3)
    assert part.num_tasks == 2 and part.degradations == batch.degradations[1:3]
    assert torch.equal(part.bg_edges, batch.bg_edges[1:3]) and torch.equal(part.face_gt, batch.face_gt[1:3])
    for start, stop in ((0, 0), (-1, 2), (2, 4), (2, 1)):
        with pytest.raises(ValueError, match="need 0 <= start < stop <= 3"):
            batch.select(start, stop)
    moved = batch.to("cpu")
    assert moved.degradations == batch.degradations
    assert all(torch.equal(getattr(moved, n), getattr(batch, n)) for n in ("face_lr", "bg_hr", "bg_edges_usm"))


def test_texture_score_of_ramps():
    # log(mean(dx^2 + dy^2) + 1e-10) with forward differences: a ramp of slope a along one axis scores log(a^2)
    ramp = torch.linspace(0, 0.9, 10)
    horizontal = ramp.view(1, 1, 10).expand(3, 10, 10)
    assert texture_score(horizontal) == pytest.approx(math.log(0.1**2 + 1e-10), rel=1e-6)
    assert texture_score(horizontal.transpose(1, 2)) == pytest.approx(math.log(0.1**2 + 1e-10), rel=1e-6)
    both = horizontal + 0.5 * horizontal.transpose(1, 2)
    assert texture_score(both) == pytest.approx(math.log(0.1**2 + 0.05**2 + 1e-10), rel=1e-6)
    assert texture_score(torch.zeros(3, 4, 4)) == pytest.approx(math.log(1e-10))


def test_restorer_errors_name_their_argument(tmp_path):
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^GroundTruthRestorer needs gt, the ground-truth faces$"):
        GroundTruthRestorer()(x)
    with pytest.raises(ValueError, match=r"^lr_up must be a \(B, 3, H, W\) tensor, got \(1, 2, 8, 8\)$"):
        GroundTruthRestorer()(x[:, :2], gt=x[:, :2])
    with pytest.raises(ValueError, match=r"^gt must have the shape of lr_up \(1, 3, 8, 8\), got \(1, 3, 4, 4\)$"):
        GroundTruthRestorer()(x, gt=x[..., :4, :4])
    restorer = TorchScriptRestorer(scripted(Invert(), tmp_path, "inv"), device="cpu")
    assert restorer.device == torch.device("cpu")
    assert next(iter(restorer.module.parameters()), torch.zeros(0)).device.type == "cpu"


# ----------------------------------------------------------------------------- crops, pads and resizes


def windows_of(image, size):
    return [image[:, y:y + size, x:x + size] for y in range(image.shape[1] - size + 1)
            for x in range(image.shape[2] - size + 1)]


def test_crop_or_pad_reflect_pads_only_a_short_side_at_the_bottom_right():
    g = gen(0)
    short = torch.rand(3, 30, 45, generator=g)
    # numpy's "reflect" mirrors without repeating the edge row, like torch's
    padded = torch.from_numpy(np.pad(short.numpy(), ((0, 0), (0, 10), (0, 0)), mode="reflect"))
    for seed in range(5):
        crop = crop_or_pad(short, 40, gen(seed))
        assert any(torch.equal(crop, w) for w in windows_of(padded, 40))
    square = torch.rand(3, 41, 41, generator=g)  # no padding: every crop is a window of the image itself
    crops = [crop_or_pad(square, 40, gen(seed)) for seed in range(30)]
    places = {next(i for i, w in enumerate(windows_of(square, 40)) if torch.equal(c, w)) for c in crops}
    assert places == {0, 1, 2, 3}  # all four offsets occur, and nothing else
    torch.manual_seed(1)
    a = crop_or_pad(square, 40, gen(7))
    torch.manual_seed(2)
    assert torch.equal(a, crop_or_pad(square, 40, gen(7)))  # only the given generator decides


def test_crop_or_pad_upscales_a_side_of_at_most_half_the_size():
    g = gen(1)
    thin = torch.rand(3, 20, 60, generator=g)  # 20 * 2 <= 40: upscaled so that the short side is 40
    crop = crop_or_pad(thin, 40, g)
    upscaled = resize_image(thin, (40, 120))
    assert any(torch.equal(crop, w) for w in windows_of(upscaled, 40))
    wider = torch.rand(3, 21, 60, generator=g)  # 21 * 2 > 40: reflect-padded instead
    crop = crop_or_pad(wider, 40, g)
    assert any(torch.equal(crop[:, :21], wider[:, :, x:x + 40]) for x in range(21))


def test_resize_image_is_antialiased_clamped_and_a_no_op_at_the_same_size():
    x = torch.rand(3, 9, 7)
    assert resize_image(x, (9, 7)) is x
    noise = torch.rand(3, 64, 64, generator=gen(2))
    plain = torch.nn.functional.interpolate(noise[None], size=(16, 16), mode="bicubic", align_corners=False)
    assert resize_image(noise, (16, 16)).std() < 0.1 and plain.std() > 0.2  # antialiasing averages the noise away
    step = torch.zeros(3, 8, 8)
    step[..., 4:] = 1
    big = resize_image(step, (32, 32))  # bicubic overshoots at the step; the result is clamped
    assert big.min() == 0 and big.max() == 1
    assert (torch.nn.functional.interpolate(step[None], size=(32, 32), mode="bicubic", align_corners=False)
            .abs().max() > 1)


def test_folder_arguments_and_warnings(folders, caplog):
    faces, backgrounds = folders
    assert BackgroundFolder(backgrounds, crop_size=1).draw(gen()).shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"^crop_size must be >= 1, got 0$"):
        BackgroundFolder(backgrounds, crop_size=0)
    with pytest.raises(ValueError, match=r"^face_size must be >= 1, got 0$"):
        FaceFolder(faces, face_size=0)
    (faces / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    folder = FaceFolder(faces, face_size=8)
    with caplog.at_level(logging.WARNING, logger="metaf2n.data.images"):
        for i in range(40):
            folder.draw(gen(i))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("skipping unreadable image ") and "broken.png: " in message
    assert len(message.split("broken.png: ", 1)[1]) > 5  # the decoder's reason follows


# ----------------------------------------------------------------------------- demo set contents


def check_demo_set_contents(demo_dirs):
    """The demo set's files against its description (called by the test that builds the set: mutmut attributes the
    building functions to the test during which the module fixture was set up)."""
    import json

    import skimage.data

    from metaf2n.faces.detect import square_around

    faces_dir, backgrounds_dir = demo_dirs
    manifest = json.loads((faces_dir.parent / "manifest.json").read_text())
    box = manifest["face_boxes"]["astronaut"]
    astronaut = skimage.data.astronaut()
    # faces: variant 0 is a square twice the box around its centre, variant 1 its mirror image
    top, left, side = square_around(box, astronaut.shape[:2], 2.0)
    expected = Image.fromarray(astronaut).crop((left, top, left + side, top + side))
    expected = np.asarray(expected.resize((256, 256), Image.Resampling.BICUBIC))
    face0, face1 = (np.asarray(Image.open(faces_dir / f"astronaut_0{i}.png")) for i in (0, 1))
    assert np.array_equal(face0, expected) and np.array_equal(face1, expected[:, ::-1])
    # backgrounds: the named photos, shrunk to a short side of at most 512 with their aspect ratio kept
    names = {p.stem for p in list_images(backgrounds_dir)}
    assert names == {"astronaut_background", "chelsea", "coffee", "rocket", "immunohistochemistry",
                     "hubble_deep_field", "retina", "motorcycle"}
    for name in names - {"astronaut_background", "motorcycle"}:
        h, w = getattr(skimage.data, name)().shape[:2]
        factor = min(1.0, 512 / min(h, w))
        with Image.open(backgrounds_dir / f"{name}.png") as img:
            assert img.size == (round(w * factor), round(h * factor)), name
    # the astronaut background is the largest band clear of 2.2 times the face box
    top, left, side = square_around(box, astronaut.shape[:2], 2.2)
    bands = [astronaut[:top], astronaut[top + side:], astronaut[:, :left], astronaut[:, left + side:]]
    largest = max(bands, key=lambda b: b.size)
    assert np.array_equal(np.asarray(Image.open(backgrounds_dir / "astronaut_background.png")), largest)


def test_demo_set_skips_unloadable_and_grey_photos(tmp_path, monkeypatch, caplog):
    from metaf2n.data import demo

    def broken():
        raise OSError("not in this build")

    photos = {"broken": broken, "grey": lambda: np.zeros((9, 9), np.uint8),
              "small": lambda: np.full((8, 8, 3), 7, np.uint8)}
    monkeypatch.setattr(demo, "_bundled_photos", lambda: photos)
    with caplog.at_level(logging.WARNING, logger="metaf2n.data.demo"):
        _, backgrounds_dir = build_demo_set(tmp_path / "demo")
    assert [p.name for p in list_images(backgrounds_dir)] == ["astronaut_background.png", "small.png"]
    assert [r.getMessage() for r in caplog.records] == ["demo set: skipping skimage photo broken: not in this build"]
    monkeypatch.setattr(demo, "detect_faces", lambda rgb: [])
    with pytest.raises(RuntimeError, match=r"^OpenCV's Haar cascade found no face in skimage.data.astronaut\(\)$"):
        build_demo_set(tmp_path / "noface")
    assert list(tmp_path.iterdir()) == [tmp_path / "demo"]  # the failed build left nothing behind


def test_sampler_takes_only_the_missing_folder_from_the_demo_set(folders, demo_dirs):
    faces, backgrounds = folders
    cache = demo_dirs[0].parent
    only_faces = TaskSampler(faces_dir=faces, config=SMALL, demo_cache_dir=cache)
    assert only_faces.faces.folder == faces and only_faces.backgrounds.folder == demo_dirs[1]
    only_backgrounds = TaskSampler(backgrounds_dir=backgrounds, config=SMALL, demo_cache_dir=cache)
    assert only_backgrounds.faces.folder == demo_dirs[0] and only_backgrounds.backgrounds.folder == backgrounds


def test_the_restorer_sees_a_clamped_upsampling_and_its_output_is_cast(folders, tmp_path):
    faces = tmp_path / "binary_faces"
    faces.mkdir()
    save_rgb(faces / "checks.png", (blocky_grey(64, 0, block=8) > 128) * 255)  # black and white 8-pixel squares
    config = TaskConfig(**{**SMALL.__dict__, "degradation": IDENTITY})
    seen = []

    def restorer(x):
        seen.append(x.clone())
        return x.double()

    batch = TaskSampler(faces, folders[1], restorer=restorer, config=config).sample(1, gen(6))
    lr_up = torch.cat(seen)
    assert lr_up.min() == 0 and lr_up.max() == 1  # bicubic overshoots at the black/white steps: clamped
    assert batch.face_pseudo.dtype == torch.float32
    with pytest.raises(ValueError, match=r"^lr_up must be a \(B, 3, H, W\) tensor, got str$"):
        TaskSampler(*folders, restorer=restorer, config=SMALL).restorer("face")


def test_both_edge_masks_keep_the_stride():
    config = TaskConfig(face_patches=1, background_patches=2, face_patch_size=32, face_size=64,
                        background_patch_size=64, background_crop_size=64, edge_threshold=5.0, edge_stride=3)
    batch = TaskSampler(config=config).sample(1, torch.Generator().manual_seed(3))
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    on_stride = (ys - xs) % 3 == 0
    for masks in (batch.bg_edges[0], batch.bg_edges_usm[0]):
        for mask in masks:  # a mirrored patch keeps the stride of the unmirrored crop
            assert mask.any() and (not (mask & ~on_stride).any() or not (mask.flip(-1) & ~on_stride).any())


def test_task_config_counts_are_validated_by_name():
    for name in ("face_patches", "background_patches", "texture_tries"):
        with pytest.raises(ValueError, match=rf"^{name} must be an int >= 1, got 0$"):
            TaskConfig(**{name: 0})
    for stride in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"^edge_stride must be an int >= 1"):
            TaskConfig(edge_stride=stride)


def test_a_stale_or_incomplete_demo_set_is_rebuilt(demo_dirs, tmp_path, caplog):
    import json
    import shutil

    cache = tmp_path / "demo"
    shutil.copytree(demo_dirs[0].parent, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert build_demo_set(cache) == (cache / "faces", cache / "backgrounds")  # a valid copy is used as it is
    for damage in ("missing face", "missing background", "old version"):
        if damage == "missing face":
            (cache / manifest["faces"][-1]).unlink()
        elif damage == "missing background":
            (cache / manifest["backgrounds"][-1]).unlink()
        else:
            (cache / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="metaf2n.data.demo"):
            build_demo_set(cache)
        assert [r.getMessage() for r in caplog.records] == [
            f"built demo set at {cache}: {len(manifest['faces'])} faces, {len(manifest['backgrounds'])} backgrounds"
        ], damage
        assert json.loads((cache / "manifest.json").read_text()) == manifest
        assert all((cache / f).is_file() for f in manifest["faces"] + manifest["backgrounds"])
