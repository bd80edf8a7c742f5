"""MetaF2N training tasks: face patches with pseudo labels and background patches, one degradation each.

A task models one photo. Per task (following the official MetaF2N data generator):

1. one degradation is drawn (:func:`metaf2n.degrade.sample_degradation`);
2. ``face_patches`` whole faces (resized to ``face_size``) and ``background_patches``
   background crops (``background_crop_size``) are drawn; the backgrounds are USM-sharpened;
3. faces and sharpened backgrounds are degraded with that same draw (LR = size / 4);
4. the face restorer turns each bicubic-upsampled LR face into a pseudo label; it works on
   whole faces because face restorers expect whole aligned faces;
5. from each face one aligned (LR, pseudo, GT) patch triple is cropped, retrying up to
   ``texture_tries`` positions until the pseudo patch is textured enough
   (``log(mean squared gradient) >= texture_threshold``, else the last try is kept); from
   each background one aligned (LR, HR-USM, HR) triple is cropped;
6. each triple is mirrored horizontally with probability 1/2 (jointly).

The discriminator's "real" input is ``bg_hr`` (not sharpened), the background L1/perceptual
target is ``bg_hr_usm``. The SSL edge masks (:func:`metaf2n.ssl.edge_mask` with ``edge_threshold`` and
``edge_stride``) are computed on the whole background crop, HR and sharpened, and cut and mirrored with the patch,
as the published masks are computed on whole training images: pixels on a patch's border see their true neighbours.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from metaf2n.data.images import BackgroundFolder, FaceFolder
from metaf2n.data.restorers import FaceRestorer, as_restorer
from metaf2n.degrade import (
    REAL_ESRGAN_X4PLUS,
    DegradationConfig,
    DegradationParams,
    apply_degradation,
    sample_degradation,
    usm_sharpen,
)
from metaf2n.ssl import edge_mask


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and counts of one task; HR sizes must be multiples of the degradation scale."""

    face_patches: int = 4
    background_patches: int = 4
    face_patch_size: int = 128
    background_patch_size: int = 256
    face_size: int = 256
    background_crop_size: int = 400
    texture_threshold: float = -6.0
    texture_tries: int = 6
    hflip: bool = True
    edge_threshold: float = 20.0
    edge_stride: int = 1
    degradation: DegradationConfig = REAL_ESRGAN_X4PLUS

    def __post_init__(self) -> None:
        s = self.degradation.scale
        if isinstance(self.edge_stride, bool) or not isinstance(self.edge_stride, int) or self.edge_stride < 1:
            raise ValueError(f"edge_stride must be an int >= 1, got {self.edge_stride!r}")
        for name in ("face_patches", "background_patches", "texture_tries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("face_patch_size", "background_patch_size", "face_size", "background_crop_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < s or value % s:
                raise ValueError(f"{name} must be a positive multiple of the scale {s}, got {value!r}")
        if self.face_patch_size > self.face_size:
            raise ValueError(f"face_patch_size must be <= face_size {self.face_size}, got {self.face_patch_size}")
        if self.background_patch_size > self.background_crop_size:
            raise ValueError(
                f"background_patch_size must be <= background_crop_size {self.background_crop_size}, "
                f"got {self.background_patch_size}"
            )


@dataclass(eq=False)
class TaskBatch:
    """A batch of T tasks, all images float in [0, 1], shapes (T, patches, 3, H, W).

    ``face_lr`` (T,P,3,p/4,p/4), ``face_pseudo`` and ``face_gt`` (T,P,3,p,p) with p the face
    patch size; ``bg_lr`` (T,Q,3,q/4,q/4), ``bg_hr_usm`` and ``bg_hr`` (T,Q,3,q,q).
    ``degradations`` holds each task's :class:`DegradationParams`. ``bg_edges`` and ``bg_edges_usm`` (T,Q,q,q)
    bool are the SSL edge masks of ``bg_hr`` and ``bg_hr_usm`` cut from masks of the whole background crops
    (None in batches built by hand: the loss then computes them on the patch).
    """

    face_lr: torch.Tensor
    face_pseudo: torch.Tensor
    face_gt: torch.Tensor
    bg_lr: torch.Tensor
    bg_hr_usm: torch.Tensor
    bg_hr: torch.Tensor
    degradations: tuple[DegradationParams, ...]
    bg_edges: torch.Tensor | None = None
    bg_edges_usm: torch.Tensor | None = None

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "degradations" and getattr(self, f.name) is not None]

    @property
    def num_tasks(self) -> int:
        return self.face_lr.shape[0]

    def to(self, device: str | torch.device) -> "TaskBatch":
        """A copy with every image tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in self._tensor_fields()}
        return replace(self, **moved)

    def select(self, start: int, stop: int) -> "TaskBatch":
        """Tasks ``start:stop`` as a TaskBatch (views, no copy); e.g. one rank's shard of a meta-batch."""
        if not 0 <= start < stop <= self.num_tasks:
            raise ValueError(f"need 0 <= start < stop <= {self.num_tasks}, got start={start}, stop={stop}")
        images = {name: getattr(self, name)[start:stop] for name in self._tensor_fields()}
        return replace(self, **images, degradations=self.degradations[start:stop])


def texture_score(patch: torch.Tensor) -> float:
    """``log(mean squared gradient + 1e-10)`` of a (3, H, W) patch in [0, 1] (MetaF2N's criterion)."""
    core = patch[:, :-1, :-1]
    dy = core - patch[:, 1:, :-1]
    dx = core - patch[:, :-1, 1:]
    return math.log((dy.double() ** 2 + dx.double() ** 2).mean().item() + 1e-10)


def _random_offset(limit: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, limit + 1, (), generator=generator))


def _crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return image[..., top : top + size, left : left + size]


class TaskSampler:
    """Draws :class:`TaskBatch` es from a face folder and a background folder.

    ``faces_dir``/``backgrounds_dir`` default to the embedded demo set
    (:func:`metaf2n.data.demo.build_demo_set`, cached under ``demo_cache_dir``). ``restorer``
    makes the face pseudo labels (default: :class:`~metaf2n.data.restorers.GroundTruthRestorer`).
    Degradation, restoration and cropping run on ``device``; every random choice comes
    from the CPU generator given to :meth:`sample`, so a seed fixes the batch.
    """

    def __init__(
        self,
        faces_dir: str | os.PathLike | None = None,
        backgrounds_dir: str | os.PathLike | None = None,
        restorer: FaceRestorer | None = None,
        config: TaskConfig = TaskConfig(),
        device: str | torch.device = "cpu",
        demo_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(config, TaskConfig):
            raise TypeError(f"config must be a TaskConfig, got {type(config).__name__}")
        if faces_dir is None or backgrounds_dir is None:
            from metaf2n.data.demo import build_demo_set

            demo_faces, demo_backgrounds = build_demo_set(demo_cache_dir)
            faces_dir = demo_faces if faces_dir is None else faces_dir
            backgrounds_dir = demo_backgrounds if backgrounds_dir is None else backgrounds_dir
        self.config = config
        self.faces = FaceFolder(faces_dir, config.face_size)
        self.backgrounds = BackgroundFolder(backgrounds_dir, config.background_crop_size)
        self.restorer = as_restorer(restorer)
        self.device = torch.device(device)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` independent tasks stacked along the first dimension."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError("generator must be a CPU torch.Generator")
        tasks = [self._sample_task(generator) for _ in range(num_tasks)]
        stacked = {name: torch.stack([task[name] for task in tasks]) for name in tasks[0] if name != "params"}
        return TaskBatch(**stacked, degradations=tuple(task["params"] for task in tasks))

    def _sample_task(self, generator: torch.Generator) -> dict:
        cfg = self.config
        s = cfg.degradation.scale
        params = sample_degradation(generator, cfg.degradation)

        faces = torch.stack([self.faces.draw(generator) for _ in range(cfg.face_patches)]).to(self.device)
        backgrounds = torch.stack([self.backgrounds.draw(generator) for _ in range(cfg.background_patches)])
        backgrounds = backgrounds.to(self.device)

        face_lr = apply_degradation(params, faces, generator)
        bg_usm = usm_sharpen(backgrounds)
        bg_lr = apply_degradation(params, bg_usm, generator)

        lr_up = F.interpolate(face_lr, scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)
        pseudo = self.restorer(lr_up, gt=faces).to(device=self.device, dtype=faces.dtype)

        face_triples = [self._face_patch(face_lr[i], pseudo[i], faces[i], generator) for i in range(len(faces))]
        edges = edge_mask(backgrounds, cfg.edge_threshold, cfg.edge_stride)
        edges_usm = edge_mask(bg_usm, cfg.edge_threshold, cfg.edge_stride)
        bg_triples = [
            self._background_patch(bg_lr[j], bg_usm[j], backgrounds[j], edges[j], edges_usm[j], generator)
            for j in range(len(bg_lr))
        ]
        face_lr_p, face_pseudo_p, face_gt_p = (torch.stack(t) for t in zip(*face_triples))
        bg_lr_p, bg_usm_p, bg_hr_p, edges_p, edges_usm_p = (torch.stack(t) for t in zip(*bg_triples))
        return {
            "face_lr": face_lr_p,
            "face_pseudo": face_pseudo_p,
            "face_gt": face_gt_p,
            "bg_lr": bg_lr_p,
            "bg_hr_usm": bg_usm_p,
            "bg_hr": bg_hr_p,
            "bg_edges": edges_p,
            "bg_edges_usm": edges_usm_p,
            "params": params,
        }

    def _maybe_flip(self, triple: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        flip = torch.rand((), generator=generator).item() < 0.5
        if self.config.hflip and flip:
            return tuple(t.flip(-1) for t in triple)
        return triple

    def _face_patch(
        self, lr: torch.Tensor, pseudo: torch.Tensor, gt: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        s = cfg.degradation.scale
        lr_size = cfg.face_patch_size // s
        for _ in range(cfg.texture_tries):
            top = _random_offset(lr.shape[-2] - lr_size, generator)
            left = _random_offset(lr.shape[-1] - lr_size, generator)
            pseudo_patch = _crop(pseudo, top * s, left * s, cfg.face_patch_size)
            if texture_score(pseudo_patch) >= cfg.texture_threshold:
                break
        triple = (
            _crop(lr, top, left, lr_size),
            pseudo_patch,
            _crop(gt, top * s, left * s, cfg.face_patch_size),
        )
        return self._maybe_flip(triple, generator)

    def _background_patch(
        self,
        lr: torch.Tensor,
        hr_usm: torch.Tensor,
        hr: torch.Tensor,
        edges: torch.Tensor,
        edges_usm: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        s = cfg.degradation.scale
        lr_size = cfg.background_patch_size // s
        top = _random_offset(lr.shape[-2] - lr_size, generator)
        left = _random_offset(lr.shape[-1] - lr_size, generator)
        triple = (
            _crop(lr, top, left, lr_size),
            _crop(hr_usm, top * s, left * s, cfg.background_patch_size),
            _crop(hr, top * s, left * s, cfg.background_patch_size),
            _crop(edges, top * s, left * s, cfg.background_patch_size),
            _crop(edges_usm, top * s, left * s, cfg.background_patch_size),
        )
        return self._maybe_flip(triple, generator)
