"""The MetaF2N + SSL training run: models, optimisers, one meta-update, validation, checkpoints, the loop.

One meta-update (:meth:`MetaTrainer.meta_update`):

1. generator side: :func:`metaf2n.maml.meta_forward` on this rank's tasks (the discriminator frozen and in eval
   mode, its spectral norms settled by 15 power iterations when it is built),
   ``backward`` of ``total``, gradients of SR and MaskNet averaged across ranks, Adam (lr ``lr_g``);
2. discriminator: ``BCE(D(bg_hr), 1) + BCE(D(SR.detach()), 0)`` (real input un-sharpened), gradients averaged
   across ranks, Adam (lr ``lr_d``);
3. a step whose loss or gradients are not finite (on any rank) is skipped whole: no weight, optimiser state or
   discriminator buffer changes; ``max_skips`` in a row stop the run.

Every random choice of the run comes from the per-rank task generator (saved in checkpoints), so a run resumed
from a checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from metaf2n.checks import check_folders
from metaf2n.config import TrainConfig, dump_yaml
from metaf2n.data import TaskBatch, TaskConfig, TaskSampler
from metaf2n.degrade import DegradationConfig
from metaf2n.distributed import DistInfo, average_gradients, average_scalars, gather_tensors
from metaf2n.io import (
    TEMP_SUFFIX,
    append_jsonl,
    atomic_torch_save,
    atomic_write_text,
    is_temp_file,
    load_torch_file,
    read_jsonl,
    temp_prefix,
)
from metaf2n.losses import gan_loss, lpips_alex
from metaf2n.maml import evaluate_adaptation, meta_forward, timed
from metaf2n.models import MaskNet, RRDBNet, UNetDiscriminatorSN, load_pretrained
from metaf2n.precision import autocast
from metaf2n.visualize import sample_grid, save_loss_curve, save_png

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
VAL_SEED_OFFSET = 7919
LOG_LOSS_KEYS = ("total", "l1", "lpips", "gan", "reg", "ssl", "inner")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_skips`` meta-steps in a row had a non-finite loss or gradient."""


def resolve_device(name: str, dist_info: DistInfo = DistInfo()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        if dist_info.enabled:
            device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device


@torch.no_grad()
def settle_spectral_norm(disc: torch.nn.Module, iterations: int = 15) -> None:
    """Run spectral norm's power iteration ``iterations`` times (a forward in train mode runs one), so that its
    ``u``/``v`` estimate the largest singular value before the discriminator is first used in eval mode."""
    disc.train()
    probe = torch.zeros(1, disc.conv0.in_channels, 8, 8, device=disc.conv0.weight.device)
    for _ in range(iterations):
        disc(probe)


def _grad_norm(parameters) -> float:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def task_config(config: TrainConfig) -> TaskConfig:
    return TaskConfig(
        face_patches=config.face_patches,
        background_patches=config.background_patches,
        face_patch_size=config.face_patch_size,
        background_patch_size=config.background_patch_size,
        face_size=config.face_size,
        background_crop_size=config.background_crop_size,
        edge_threshold=config.threshold,
        edge_stride=config.stride,
        degradation=DegradationConfig(),
    )


def make_sampler(config: TrainConfig, device: torch.device) -> TaskSampler:
    check_folders(config, ("faces", "backgrounds"))  # neither means the embedded demo set
    restorer = None
    if config.restorer is not None:  # gfpgan:PATH | gpen:PATH | torchscript:PATH | PATH (TorchScript)
        from metaf2n.faces.restorers import load_restorer

        restorer = load_restorer(config.restorer, device, config.restorer_value_range())
    return TaskSampler(config.faces, config.backgrounds, restorer, task_config(config), device)


class MetaTrainer:
    """Models, optimisers and state of a run; ``perceptual`` and ``sampler`` may be given (tests, benchmarks)."""

    def __init__(
        self,
        config: TrainConfig,
        dist_info: DistInfo = DistInfo(),
        perceptual: torch.nn.Module | None = None,
        sampler: TaskSampler | None = None,
    ) -> None:
        if config.tasks % dist_info.world_size:
            raise ValueError(f"--tasks {config.tasks} must be divisible by the number of ranks {dist_info.world_size}")
        self.config = config
        self.meta = config.meta()
        self.dist = dist_info
        self.device = resolve_device(config.device, dist_info)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.sr = RRDBNet(num_feat=config.num_feat, num_block=config.num_block, num_grow_ch=config.num_grow_ch)
        self.masknet = MaskNet(num_feat=config.masknet_feat, upsample=config.masknet_upsample)
        self.disc = UNetDiscriminatorSN(num_feat=config.d_num_feat) if config.w_gan > 0 else None
        if config.init:
            load_init(self.sr, self.masknet, config.init)
        if config.init_sr:
            load_pretrained(self.sr, config.init_sr)
        if config.init_d:
            if self.disc is None:
                raise ValueError("--init-d was given but the discriminator is off (--w-gan 0)")
            load_pretrained(self.disc, config.init_d)
        self.sr.to(self.device)
        self.masknet.to(self.device)
        if self.disc is not None:
            self.disc.to(self.device)
            settle_spectral_norm(self.disc)
        if perceptual is None and config.w_lpips > 0:
            perceptual = lpips_alex(config.lpips_weights, self.device)
        self.perceptual = perceptual
        betas = (0.9, 0.99)
        self.opt_g = torch.optim.Adam([*self.sr.parameters(), *self.masknet.parameters()], lr=config.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr_d, betas=betas) if self.disc else None
        self.opt_warmup = torch.optim.Adam(self.sr.parameters(), lr=config.warmup_lr, betas=betas)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.sr_ema = copy.deepcopy(self.sr).requires_grad_(False) if config.ema_decay > 0 else None
        self.sampler = sampler if sampler is not None else make_sampler(config, self.device)
        self.task_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + dist_info.rank)
        self.step = 0
        self.warmup_step = 0
        self.consecutive_skips = 0
        self.skipped_total = 0

    # --- one update -------------------------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.config.precision)

    @property
    def local_tasks(self) -> int:
        return self.config.tasks // self.dist.world_size

    def sample_tasks(self, num_tasks: int | None = None) -> TaskBatch:
        return self.sampler.sample(num_tasks or self.local_tasks, self.task_generator)

    def _all_finite(self, value: bool) -> bool:
        return average_scalars({"finite": 1.0 if value else 0.0}, self.dist, self.device)["finite"] == 1.0

    def _skip(self, record: dict) -> dict:
        self.opt_g.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        self.consecutive_skips += 1
        self.skipped_total += 1
        record["skipped"] = 1
        logger.warning("meta-step %d skipped: non-finite loss or gradient (%d in a row)", self.step + 1,
                       self.consecutive_skips)
        if self.consecutive_skips >= self.config.max_skips:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} meta-steps in a row had a non-finite loss or gradient; stopping. "
                "Try a smaller --inner-lr or --lr-g, or --precision fp32."
            )
        return record

    def meta_update(self, batch: TaskBatch, timings: dict[str, float] | None = None) -> dict:
        """One meta-update on this rank's ``batch``; returns the step's log record (terms averaged over ranks).

        ``timings`` (benchmarks) accumulates the seconds of :func:`~metaf2n.maml.meta_forward`'s phases plus
        ``outer_backward``, ``optimizer`` (all-reduce, norms, Adam) and ``discriminator``."""
        start = time.perf_counter()
        self.sr.train()
        self.masknet.train()
        grad_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.disc is not None:
            # Frozen and in eval mode: the generator step runs no spectral-norm power iteration, so the number of
            # iterations per step does not depend on how many tasks a rank holds, and a skipped step changes nothing.
            self.disc.eval().requires_grad_(False)
        with self.autocast():
            outputs = meta_forward(self.sr, self.masknet, self.disc, self.perceptual, batch, self.meta, grad_scale,
                                   timings)
        total = outputs.losses["total"]
        self.opt_g.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(total))
        if finite:
            with timed(timings, "outer_backward", self.device):
                self.scaler.scale(total).backward()
        forward_backward = time.perf_counter()
        values = {key: float(outputs.losses[key].detach()) if finite else math.nan for key in LOG_LOSS_KEYS}
        values["w_mean"] = float(outputs.face_weights.float().mean())
        record = {"phase": "meta", "step": self.step + 1}
        if not self._all_finite(finite):
            record.update(**values, d_loss=math.nan, grad_norm_sr=math.nan, grad_norm_masknet=math.nan, skipped=1)
            return self._finish(self._skip(record), start)
        with timed(timings, "optimizer", self.device):
            values = average_scalars(values, self.dist, self.device)
            average_gradients([*self.sr.parameters(), *self.masknet.parameters()], self.dist)
            self.scaler.unscale_(self.opt_g)
            norms = {"grad_norm_sr": _grad_norm(self.sr.parameters()),
                     "grad_norm_masknet": _grad_norm(self.masknet.parameters())}
            if not self.scaler.is_enabled() and not all(math.isfinite(v) for v in norms.values()):
                record.update(**values, **norms, d_loss=math.nan)
                return self._finish(self._skip(record), start)
            self.scaler.step(self.opt_g)
        d_loss = 0.0
        if self.disc is not None:
            with timed(timings, "discriminator", self.device):
                d_loss = self._discriminator_step(batch, outputs.sr_backgrounds)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.update()
        overflow = scale_before is not None and self.scaler.get_scale() < scale_before
        self._update_ema()
        self.consecutive_skips = 0
        record.update(**values, **norms, d_loss=d_loss, skipped=int(overflow))
        record["time_generator_s"] = forward_backward - start
        return self._finish(record, start)

    def _finish(self, record: dict, start: float) -> dict:
        self.step += 1  # a skipped step still counts as a step of the run
        record["step_time_s"] = time.perf_counter() - start
        return record

    def _discriminator_step(self, batch: TaskBatch, sr_backgrounds: torch.Tensor) -> float:
        self.disc.train().requires_grad_(True)
        real = batch.bg_hr.flatten(0, 1)
        fake = sr_backgrounds.flatten(0, 1).detach()
        with self.autocast():
            d_loss = gan_loss(self.disc(real), real=True) + gan_loss(self.disc(fake), real=False)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        average_gradients(self.disc.parameters(), self.dist)
        self.scaler.step(self.opt_d)
        return average_scalars({"d": float(d_loss.detach())}, self.dist, self.device)["d"]

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.sr_ema is None:
            return
        decay = self.config.ema_decay
        for ema, live in zip(self.sr_ema.parameters(), self.sr.parameters()):
            ema.lerp_(live.detach(), 1 - decay)

    def warmup_update(self, batch: TaskBatch) -> dict:
        """One supervised L1 step of the SR network on background patches (``bg_lr`` -> ``bg_hr_usm``)."""
        start = time.perf_counter()
        self.sr.train()
        lr = batch.bg_lr.flatten(0, 1)
        target = batch.bg_hr_usm.flatten(0, 1)
        with self.autocast():
            loss = F.l1_loss(self.sr(lr).float(), target.float())
        self.opt_warmup.zero_grad(set_to_none=True)
        finite = self._all_finite(bool(torch.isfinite(loss)))
        if finite:
            self.scaler.scale(loss).backward()
            average_gradients(self.sr.parameters(), self.dist)
            self.scaler.step(self.opt_warmup)
            self.scaler.update()
        self.warmup_step += 1
        l1 = average_scalars({"l1": float(loss.detach())}, self.dist, self.device)["l1"]
        return {"phase": "warmup", "warmup_step": self.warmup_step, "l1": l1, "skipped": int(not finite),
                "step_time_s": time.perf_counter() - start}

    # --- validation --------------------------------------------------------------------------------------------
    def validate(self, batch: TaskBatch) -> tuple[dict, dict]:
        """Background L1/PSNR before and after adaptation on a fixed batch (fp32), and images for a sample PNG."""
        self.sr.eval()
        self.masknet.eval()
        metrics, images = evaluate_adaptation(self.sr, self.masknet, batch, self.meta)
        return {"phase": "val", "step": self.step, "warmup_step": self.warmup_step, **metrics}, images

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly; tensors and plain containers only (``weights_only`` loads it)."""
        generator_states = gather_tensors(self.task_generator.get_state().to(self.device), self.dist)
        rng = {
            "torch": torch.get_rng_state(),
            "task_generators": [state.cpu() for state in generator_states],
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "warmup_step": self.warmup_step,
            "consecutive_skips": self.consecutive_skips,
            "skipped_total": self.skipped_total,
            "world_size": self.dist.world_size,
            "sr": self.sr.state_dict(),
            "masknet": self.masknet.state_dict(),
            "disc": self.disc.state_dict() if self.disc is not None else {},
            "sr_ema": self.sr_ema.state_dict() if self.sr_ema is not None else {},
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else {},
            "opt_warmup": self.opt_warmup.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        self.sr.load_state_dict(state["sr"])
        self.masknet.load_state_dict(state["masknet"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.sr_ema is not None and state["sr_ema"]:
            self.sr_ema.load_state_dict(state["sr_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_warmup.load_state_dict(state["opt_warmup"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.warmup_step = int(state["warmup_step"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skipped_total = int(state["skipped_total"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        generators = rng["task_generators"]
        if len(generators) == self.dist.world_size:
            self.task_generator.set_state(generators[self.dist.rank])
        else:
            logger.warning(
                "checkpoint was written by %d ranks, this run has %d: task generators are reseeded from the step, "
                "so the task stream differs from an uninterrupted run", len(generators), self.dist.world_size,
            )
            self.task_generator.manual_seed((self.config.seed * 1_000_003 + self.dist.rank) ^ (self.step << 20))


# --- the run ---------------------------------------------------------------------------------------------------
LOCK_NAME = "run.lock"
FAULT_ENV = "METAF2N_TEST_KILL_AT_SAVE"


def _fault_hook(step: int, path: Path) -> None:
    """Tests only: with ``$METAF2N_TEST_KILL_AT_SAVE`` = the step, half-write the checkpoint's temporary file and
    SIGKILL this process, as a kill in the middle of a save would."""
    if os.environ.get(FAULT_ENV) == str(step):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f"{temp_prefix(path)}interrupted{TEMP_SUFFIX}", "wb") as file:
            file.write(b"\0" * 4096)
            file.flush()
            os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


class RunFiles:
    """The fixed output layout of a run (tools read it)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out)
        self.config = self.root / "config.yaml"
        self.log = self.root / "log.jsonl"
        self.tb = self.root / "tb"
        self.samples = self.root / "samples"
        self.checkpoints = self.root / "checkpoints"
        self.latest = self.checkpoints / "latest.pt"
        self.loss_curve = self.root / "loss_curve.png"

    def numbered(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def sample(self, step: int) -> Path:
        return self.samples / f"step_{step:08d}.png"


def load_init(sr: torch.nn.Module, masknet: torch.nn.Module, path: str | os.PathLike) -> None:
    """SR and MaskNet weights from a metaf2n checkpoint (a run's, or a converted official one) for ``--init``."""
    state = load_checkpoint(path, "--init")
    if not {"sr", "masknet"} <= set(state):
        raise ValueError(f"--init {os.fspath(path)!r} is not a metaf2n checkpoint (no sr, masknet and config; for a "
                         "plain RRDBNet use --init-sr)")
    for name, module in (("sr", sr), ("masknet", masknet)):
        try:
            module.load_state_dict(state[name], strict=True)
        except RuntimeError as error:
            raise ValueError(f"--init {os.fspath(path)!r}: its {name} does not fit this run's sizes "
                             f"({str(error).splitlines()[0]})") from None
    logger.info("SR and MaskNet start from %s (fresh optimisers)", os.fspath(path))


def load_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> dict:
    if not os.path.exists(path):
        raise ValueError(f"{flag}: no checkpoint at {os.fspath(path)!r}")
    state = load_torch_file(path, flag)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{flag} {os.fspath(path)!r} is not a metaf2n checkpoint (it has no config)")
    return state


def _truncate_log(files: RunFiles, step: int, warmup_step: int) -> None:
    """Drop log records written after the checkpoint being resumed (a crash may have left some)."""
    if not files.log.is_file():
        return

    def keep(record: dict) -> bool:
        if record.get("phase") == "warmup":
            return record.get("warmup_step", 0) <= warmup_step
        return record.get("step", 0) <= step

    records = [r for r in read_jsonl(files.log) if keep(r)]
    atomic_write_text(files.log, "".join(json.dumps(r) + "\n" for r in records))


class _Logger:
    """log.jsonl and TensorBoard on rank 0; nothing elsewhere."""

    def __init__(self, files: RunFiles, enabled: bool, purge_step: int | None) -> None:
        self.files = files
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; without it the run still logs to log.jsonl
                logger.warning("tensorboard is not installed: no TensorBoard events are written")
            else:
                self.tb = SummaryWriter(log_dir=os.fspath(files.tb), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.files.log, record)
        if self.tb is not None:
            phase = record["phase"]
            step = record["step"] if phase != "warmup" else record["warmup_step"]
            for key, value in record.items():
                if key not in ("phase", "step", "warmup_step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{phase}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


RUN_ENTRIES = {"config.yaml", "log.jsonl", "tb", "samples", "checkpoints", "loss_curve.png", LOCK_NAME}


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a final checkpoint of the last finished step was written."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: stopped after meta-step {step}; checkpoint {checkpoint} (continue with "
                         "--resume)")
        self.signal_name = signal_name


def check_out_folder(files: RunFiles, resume, checkpoint: dict | None, force: bool) -> None:
    """Refuse an ``--out`` that is not this run's: a folder of other files, another run's folder when resuming from
    elsewhere, or a run that should be resumed. ``force`` accepts the first two."""
    root = files.root
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {os.fspath(root)!r} is a file, not a folder")
    if checkpoint is None and files.latest.exists():
        raise ValueError(f"--out {os.fspath(root)!r} already holds a run: pass --resume to continue it, or another "
                         "--out")
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in RUN_ENTRIES and not is_temp_file(p))
        if foreign and not force:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(f"--out {os.fspath(root)!r} holds files that are not a metaf2n run ({listed}): choose an "
                             "empty folder, or pass --force")
    if checkpoint is not None and files.latest.exists() and not force and \
            Path(resume).resolve().parent != files.checkpoints.resolve():
        raise ValueError(f"--resume {os.fspath(resume)!r} is not a checkpoint of --out {os.fspath(root)!r}, which "
                         "holds another run: resuming there would overwrite its checkpoints and mix both logs; choose "
                         "another --out, or pass --force")


def remove_orphan_temp_files(files: RunFiles) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.NAME.xxxx.tmp``): nothing else removes them."""
    orphans = [p for folder in (files.root, files.checkpoints) if folder.is_dir() for p in folder.iterdir()
               if p.is_file() and is_temp_file(p)]
    if orphans:
        size = sum(p.stat().st_size for p in orphans)
        for path in orphans:
            path.unlink()
        logger.warning("removed %d temporary files (%.1f MB) left by an interrupted write", len(orphans), size / 1e6)


class RunLock:
    """An exclusive lock on a run folder: ``run.lock`` holding the PID; a lock whose process is gone is taken over."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ValueError(f"--out {os.fspath(self.path.parent)!r} is in use by another training run (PID "
                                     f"{pid}; lock {self.path})") from None
                logger.warning("taking over the stale lock %s of PID %s, which is no longer running", self.path,
                               pid or "?")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as file:
                file.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopSignals:
    """SIGINT and SIGTERM set a flag that the loop checks after each step (a final checkpoint, then a clean stop); a
    second signal stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopping at once")
        self.received = signal.Signals(number).name
        logger.warning("%s received: stopping after this step with a final checkpoint (again to stop at once)",
                       self.received)

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def train(config: TrainConfig, resume: str | os.PathLike | None = None, dist_info: DistInfo = DistInfo(),
          show_progress: bool = True, force: bool = False) -> MetaTrainer:
    """Run (or resume) training as ``config`` says; returns the trainer at the end. Raises
    :class:`TrainingInterrupted` after SIGINT/SIGTERM, once the final checkpoint is written."""
    files = RunFiles(config.out)
    checkpoint = load_checkpoint(resume) if resume is not None else None
    check_out_folder(files, resume, checkpoint, force)
    lock = RunLock(files.root)
    if dist_info.is_main:
        files.root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        return _train(config, files, resume, checkpoint, dist_info, show_progress)
    finally:
        lock.release()


def _train(config: TrainConfig, files: RunFiles, resume, checkpoint, dist_info: DistInfo,
           show_progress: bool) -> MetaTrainer:
    if dist_info.is_main:
        remove_orphan_temp_files(files)
        if checkpoint is None and files.log.exists():
            logger.warning("%s is the log of a run that stopped before its first checkpoint: starting it over",
                           files.log)
            files.log.unlink()
    # on resume the checkpoint holds every weight: --init's file is not read again (it may have moved)
    trainer = MetaTrainer(dataclasses.replace(config, init=None) if checkpoint is not None else config, dist_info)
    trainer.config = config
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        logger.info("resumed from %s at meta-step %d (warm-up %d)", resume, trainer.step, trainer.warmup_step)
    main = dist_info.is_main
    if main:
        files.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(files.config, dump_yaml(config))
        if checkpoint is not None:
            _truncate_log(files, trainer.step, trainer.warmup_step)
    log = _Logger(files, main, purge_step=trainer.step + 1 if checkpoint is not None else None)
    val_batch = trainer.sampler.sample(config.val_tasks, torch.Generator().manual_seed(config.seed + VAL_SEED_OFFSET))

    def validate_and_sample() -> None:
        if not main:
            return
        record, images = trainer.validate(val_batch)
        log.write(record)
        grid = sample_grid(val_batch.bg_lr[0, 0], images["sr_before"][0], images["sr_after"][0],
                           val_batch.bg_hr[0, 0], val_batch.face_lr[0, 0], val_batch.face_pseudo[0, 0],
                           images["weights"][0])
        save_png(files.sample(trainer.step), grid)

    def save() -> None:
        state = trainer.state_dict()  # every rank takes part (the task generators are gathered)
        if main:
            # the numbered file first: a kill between the two then never leaves latest.pt without its step_N.pt
            _fault_hook(trainer.step, files.numbered(trainer.step))
            atomic_torch_save(files.numbered(trainer.step), state)
            atomic_torch_save(files.latest, state)

    def stop_if_asked(signals: StopSignals) -> None:
        if signals.received is not None:
            save()
            raise TrainingInterrupted(signals.received, trainer.step, files.latest)

    signals = StopSignals().__enter__()
    try:
        if checkpoint is None:
            validate_and_sample()
        if trainer.warmup_step < config.warmup_steps:
            bar = tqdm(range(trainer.warmup_step, config.warmup_steps), desc="warm-up (L1)", unit="step",
                       disable=not (main and show_progress))
            for _ in bar:
                record = trainer.warmup_update(trainer.sample_tasks())
                log.write(record)
                bar.set_postfix(l1=f"{record['l1']:.4f}")
                stop_if_asked(signals)
            if trainer.step == 0:
                validate_and_sample()  # before the checkpoint: a kill in between would lose this record for good
            save()
        bar = tqdm(range(trainer.step, config.steps), desc="meta-training", unit="step",
                   disable=not (main and show_progress))
        for _ in bar:
            sample_start = time.perf_counter()
            batch = trainer.sample_tasks()
            sample_time = time.perf_counter() - sample_start
            record = trainer.meta_update(batch)
            record["time_sample_s"] = sample_time
            log.write(record)
            bar.set_postfix(total=f"{record['total']:.4f}", l1=f"{record['l1']:.4f}", ssl=f"{record['ssl']:.4f}")
            if trainer.step % config.val_every == 0 or trainer.step == config.steps:
                validate_and_sample()
            if trainer.step % config.ckpt_every == 0 or trainer.step == config.steps:
                save()
            stop_if_asked(signals)
    finally:
        signals.__exit__()
        log.close()
    if main and files.log.is_file():
        save_loss_curve(files.loss_curve, read_jsonl(files.log))
    return trainer
