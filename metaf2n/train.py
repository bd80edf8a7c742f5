"""``python -m metaf2n.train``: meta-train MetaF2N + SSL (see the README's training section).

    python -m metaf2n.train                              # the demo preset on the embedded demo set
    python -m metaf2n.train --preset paper --faces FFHQ --backgrounds DF2K --init-sr RealESRGAN_x4plus.pth
    python -m metaf2n.train --out runs/demo --resume      # continue runs/demo/checkpoints/latest.pt
    python -m metaf2n.train --preset paper --init metaf2n_official.pt --faces FFHQ --backgrounds DF2K ...
    torchrun --nproc_per_node 8 -m metaf2n.train --preset paper ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from metaf2n.checks import join_range_flags
from metaf2n.config import add_config_flags, resolve
from metaf2n.distributed import init_from_env
from metaf2n.trainer import NonFiniteLossError, RunFiles, TrainingInterrupted, load_checkpoint, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metaf2n.train",
        description="Meta-train MetaF2N (RRDBNet + MaskNet, first- or second-order MAML) with the self-similarity loss.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="YAML", help="a YAML file of config fields (flags given here win)")
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH",
                        help="continue from PATH, or from OUT/checkpoints/latest.pt when no PATH is given")
    parser.add_argument("--force", action="store_true",
                        help="write into an --out that holds other files, or resume another run's checkpoint into it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(join_range_flags(sys.argv[1:] if argv is None else argv)))
    resume = args.pop("resume", None)
    quiet = args.pop("quiet", False)
    force = args.pop("force", False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        checkpoint_config = None
        if resume is not None:
            if resume == "":
                out = args.get("out") or resolve({k: v for k, v in args.items() if k in ("config", "preset", "out")}).out
                resume = RunFiles(out).latest
            checkpoint_config = load_checkpoint(resume)["config"]
        init_config = None
        if checkpoint_config is None and args.get("init"):
            init_config = load_checkpoint(args["init"], "--init").get("config")
        config = resolve(args, checkpoint_config, init_config)
        dist_info = init_from_env("cuda" if config.device.startswith("cuda") or (
            config.device == "auto" and __import__("torch").cuda.is_available()) else "cpu")
        train(config, resume=resume, dist_info=dist_info, show_progress=not quiet, force=force)
    except ValueError as error:
        parser.error(str(error))
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 143 if stop.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt as error:
        print(f"stopped at once ({error or 'interrupt'}); the last periodic checkpoint stands", file=sys.stderr)
        return 130
    except (OSError, NonFiniteLossError) as error:  # a missing file, a read-only or full disk
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
