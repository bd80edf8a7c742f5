"""Training runs (metaf2n.train / metaf2n.trainer / metaf2n.config): the command line, the output layout, exact
resume, skipped non-finite steps, bf16/fp16, and torch.distributed equivalence."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from metaf2n import train as train_cli
from metaf2n.config import PRESETS, TrainConfig, flag, resolve
from metaf2n.io import read_jsonl
from metaf2n.trainer import MetaTrainer, NonFiniteLossError, RunFiles

TINY = {
    "num_feat": 8, "num_block": 1, "num_grow_ch": 8, "masknet_feat": 8, "d_num_feat": 8,
    "tasks": 2, "face_patches": 1, "background_patches": 1, "face_patch_size": 32, "face_size": 64,
    "background_patch_size": 32, "background_crop_size": 64, "val_tasks": 1, "warmup_steps": 1, "device": "cpu",
}
TINY_FLAGS = [item for name, value in TINY.items() for item in (flag(name), str(value))] + ["--quiet"]
STEP_KEYS = {"step", "total", "l1", "lpips", "gan", "reg", "ssl", "inner", "d_loss", "w_mean", "grad_norm_sr",
             "grad_norm_masknet", "step_time_s", "skipped"}
VAL_KEYS = {"val_l1_before", "val_l1_after", "val_psnr_before", "val_psnr_after"}


def run_cli(*args: str) -> int:
    return train_cli.main([*TINY_FLAGS, *args])


def checkpoint(out, name="latest.pt") -> dict:
    return torch.load(RunFiles(out).checkpoints / name, map_location="cpu", weights_only=True)


# --- config and command line -------------------------------------------------------------------------------------
def test_every_config_field_is_a_flag():
    parser = train_cli.build_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    for field in TrainConfig.__dataclass_fields__:
        assert flag(field) in options, field


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: paper\nw-ssl: 0.5\ninner_lr: 0.02\n")
    config = resolve({"config": str(yaml_file), "inner_lr": 0.03})
    assert config.preset == "paper" and config.num_block == PRESETS["paper"]["num_block"] == 23
    assert config.w_ssl == 0.5 and config.inner_lr == 0.03
    assert resolve({}).num_block == PRESETS["demo"]["num_block"]


@pytest.mark.parametrize("argv,needle", [
    (["--mode", "third"], "--mode"),
    (["--precision", "fp8"], "--precision"),
    (["--tasks", "0"], "--tasks"),
    (["--w-ssl", "-1"], "--w-ssl"),
    (["--preset", "huge"], "--preset"),
    (["--faces", "/nonexistent/faces", "--backgrounds", "/nonexistent/bg"], "--faces"),
    (["--steps", "two"], "--steps"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--out", str(tmp_path / "run"), *argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_yaml_key_is_an_error(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("inner_learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="inner_learning_rate"):
        resolve({"config": str(yaml_file)})


# --- a whole run -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_run")
    assert run_cli("--out", str(out), "--steps", "3", "--val-every", "2", "--ckpt-every", "2") == 0
    return out


def test_a_run_writes_the_fixed_layout(demo_run):
    files = RunFiles(demo_run)
    for path in (files.config, files.log, files.latest, files.loss_curve, files.numbered(2), files.numbered(3),
                 files.sample(2), files.sample(3)):
        assert path.is_file(), path
    assert any(files.tb.iterdir())
    assert not list(demo_run.rglob("*.tmp"))
    records = read_jsonl(files.log)
    meta = [r for r in records if r["phase"] == "meta"]
    assert [r["step"] for r in meta] == [1, 2, 3]
    for record in meta:
        assert STEP_KEYS <= set(record)
        assert all(math.isfinite(record[k]) for k in STEP_KEYS)
    val = [r for r in records if r["phase"] == "val"]
    assert [r["step"] for r in val] == [0, 0, 2, 3]  # before and after the warm-up, then every 2 and at the end
    assert all(VAL_KEYS <= set(r) for r in val)
    assert [r["warmup_step"] for r in records if r["phase"] == "warmup"] == [1]
    config = TrainConfig(**__import__("yaml").safe_load(files.config.read_text()))
    assert config.steps == 3 and config.num_feat == 8


def test_checkpoints_load_with_weights_only_and_hold_the_whole_state(demo_run):
    state = checkpoint(demo_run)
    for key in ("sr", "masknet", "disc", "opt_g", "opt_d", "scaler", "rng", "step", "config"):
        assert key in state, key
    assert state["step"] == 3 and state["warmup_step"] == 1
    assert len(state["rng"]["task_generators"]) == 1
    from metaf2n.models import RRDBNet

    RRDBNet(num_feat=8, num_block=1, num_grow_ch=8).load_state_dict(state["sr"])


def test_an_existing_run_is_not_overwritten_without_resume(demo_run, capsys):
    with pytest.raises(SystemExit):
        run_cli("--out", str(demo_run), "--steps", "3")
    assert "--resume" in capsys.readouterr().err


def test_resume_continues_bitwise_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--val-every", "2", "--ckpt-every", "2"]
    assert run_cli("--out", str(straight), "--steps", "4", *common) == 0
    assert run_cli("--out", str(split), "--steps", "2", *common) == 0
    assert train_cli.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    a, b = checkpoint(straight), checkpoint(split)
    assert a["step"] == b["step"] == 4
    for part in ("sr", "masknet", "disc"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"
    for part in ("opt_g", "opt_d"):
        for index, moments in a[part]["state"].items():
            for name, tensor in moments.items():
                assert torch.equal(tensor, b[part]["state"][index][name]), f"{part}[{index}].{name}"
    assert torch.equal(a["rng"]["task_generators"][0], b["rng"]["task_generators"][0])
    # the log of the resumed run reads like the straight one's (same steps, same losses)
    losses = lambda out: [(r["step"], r["total"]) for r in read_jsonl(RunFiles(out).log) if r["phase"] == "meta"]  # noqa: E731
    assert losses(straight) == losses(split)


def test_resume_drops_log_records_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "2", "--val-every", "5", "--ckpt-every", "5") == 0
    log = RunFiles(out).log
    with open(log, "a") as file:  # as if the run had crashed after logging a step beyond its checkpoint
        file.write(json.dumps({"phase": "meta", "step": 3, "total": 123.0}) + "\n")
    assert train_cli.main(["--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0
    meta = [r for r in read_jsonl(log) if r["phase"] == "meta"]
    assert [r["step"] for r in meta] == [1, 2, 3] and meta[-1]["total"] != 123.0


# --- single updates ----------------------------------------------------------------------------------------------
def tiny_config(tmp_path, **overrides) -> TrainConfig:
    return resolve({**TINY, "out": str(tmp_path / "run"), **overrides})


@pytest.fixture(scope="module")
def shared_trainer_parts(lpips_model):
    return {"perceptual": lpips_model}


def test_non_finite_steps_are_skipped_without_touching_the_weights(tmp_path, lpips_model):
    trainer = MetaTrainer(tiny_config(tmp_path, max_skips=3), perceptual=lpips_model)
    batch = trainer.sample_tasks()
    batch.bg_hr_usm[0, 0, 0, 0, 0] = math.nan
    before = {k: v.clone() for part in (trainer.sr, trainer.masknet, trainer.disc)
              for k, v in part.state_dict().items()}
    for expected_skips in (1, 2):
        record = trainer.meta_update(batch)
        assert record["skipped"] == 1 and trainer.consecutive_skips == expected_skips
    after = {k: v for part in (trainer.sr, trainer.masknet, trainer.disc) for k, v in part.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.step == 2 and trainer.skipped_total == 2
    with pytest.raises(NonFiniteLossError, match="3 meta-steps in a row"):
        trainer.meta_update(batch)
    good = trainer.sample_tasks()
    trainer.consecutive_skips = 0
    assert trainer.meta_update(good)["skipped"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_updates_run_and_keep_float32_state(tmp_path, lpips_model, precision):
    trainer = MetaTrainer(tiny_config(tmp_path, precision=precision), perceptual=lpips_model)
    start = [p.detach().clone() for p in trainer.sr.parameters()]
    records = [trainer.meta_update(trainer.sample_tasks()) for _ in range(2)]
    assert all(math.isfinite(r["total"]) for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.sr.parameters())
    moved = any(not torch.equal(a, b) for a, b in zip(start, trainer.sr.parameters()))
    assert moved or all(r["skipped"] for r in records)
    if precision == "fp16":
        assert trainer.scaler.is_enabled()


# --- torch.distributed -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: TrainConfig, batch_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from metaf2n.distributed import init_from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_from_env("cpu")
    try:
        trainer = MetaTrainer(config, info)
        batch = torch.load(batch_path, weights_only=False)
        share = batch.num_tasks // world
        trainer.meta_update(batch.select(rank * share, (rank + 1) * share))
        if rank == 0:
            torch.save(_update_result(trainer), out_path)
        state = trainer.state_dict()  # gathers the per-rank task generators
        if rank == 0:
            assert len(state["rng"]["task_generators"]) == world
    finally:
        dist.destroy_process_group()


def _update_result(trainer: MetaTrainer) -> dict:
    return {
        "params": {f"{name}.{k}": v.detach().clone() for name, m in (("sr", trainer.sr), ("masknet", trainer.masknet),
                                                                    ("disc", trainer.disc))
                   for k, v in m.state_dict().items()},
        "grads": {f"{name}.{k}": p.grad.detach().clone() for name, m in (("sr", trainer.sr),
                                                                          ("masknet", trainer.masknet),
                                                                          ("disc", trainer.disc))
                  for k, p in m.named_parameters() if p.grad is not None},
    }


@pytest.mark.slow
def test_two_ranks_of_two_tasks_equal_one_process_of_four(tmp_path):
    config = tiny_config(tmp_path, tasks=4)
    single = MetaTrainer(config)
    batch = single.sampler.sample(4, torch.Generator().manual_seed(11))
    batch_path, out_path = tmp_path / "batch.pt", tmp_path / "ddp.pt"
    torch.save(batch, batch_path)
    torch.set_num_threads(1)
    try:
        single.meta_update(batch)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    expected = _update_result(single)
    mp.spawn(_ddp_worker, args=(2, _free_port(), config, str(batch_path), str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path, weights_only=True)
    assert set(got["grads"]) == set(expected["grads"]) and len(expected["grads"]) > 0
    for key, value in expected["grads"].items():
        torch.testing.assert_close(got["grads"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for key, value in expected["params"].items():
        torch.testing.assert_close(got["params"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_ema_follows_the_weights_by_its_decay(tmp_path, lpips_model):
    trainer = MetaTrainer(tiny_config(tmp_path, ema_decay=0.75), perceptual=lpips_model)
    before = {k: v.clone() for k, v in trainer.sr.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in trainer.sr_ema.state_dict().items())
    trainer.meta_update(trainer.sample_tasks())
    after = trainer.sr.state_dict()
    for name, ema in trainer.sr_ema.state_dict().items():
        torch.testing.assert_close(ema, 0.75 * before[name] + 0.25 * after[name])
    assert "sr_ema" in trainer.state_dict() and trainer.state_dict()["sr_ema"]


def test_training_takes_a_released_style_restorer_for_pseudo_labels(tmp_path):
    from metaf2n.faces.gpen import GPEN
    from metaf2n.trainer import make_sampler

    torch.manual_seed(0)
    path = tmp_path / "gpen.pth"
    torch.save({"params_ema": GPEN(64, style_dim=32, channel_multiplier=1, narrow=0.25).state_dict()}, path)
    config = tiny_config(tmp_path, restorer=f"gpen:{path}")
    batch = make_sampler(config, torch.device("cpu")).sample(1, torch.Generator().manual_seed(0))
    assert batch.face_pseudo.shape == batch.face_gt.shape
    assert not torch.allclose(batch.face_pseudo, batch.face_gt, atol=0.05)  # not the ground-truth oracle
    with pytest.raises(ValueError, match="not a GFPGANv1Clean checkpoint"):
        make_sampler(tiny_config(tmp_path, restorer=f"gfpgan:{path}"), torch.device("cpu"))
