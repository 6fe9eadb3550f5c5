"""Shared fixtures: tiny random-init timm ViTs (built in milliseconds) and small image folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("COLUMNS", "200")  # stable rich tables in CliRunner output
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "sample_images"

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def tiny_vit(seed: int = 0, **overrides):
    import timm

    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Eight small RGB photos-like images (smooth gradients + noise), one grayscale, one non-square."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (40, 56) if i == 3 else (48, 48)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 4 + i * 20) % 256, (yy * 5) % 256, np.full_like(xx, 90 + 10 * i)], -1)
        arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if i == 5:
            img = img.convert("L")
        img.save(d / f"img{i}.png")
    return d


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    """A bare state dict of the tiny ViT (needs --arch + --arch-kwargs)."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    return path


TINY_DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                    "crop_pct": 1.0}


def save_planted_checkpoint(path: Path, positions=(), strength: float = 60.0, **overrides) -> Path:
    """A self-describing checkpoint of the tiny ViT with high-norm patches planted at ``positions``."""
    from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint

    model = tiny_vit(**overrides)
    offset = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        for p in positions:
            model.pos_embed[0, offset + p] += strength
    meta = CheckpointMeta("vit_small_patch16_224", {**TINY, **overrides}, TINY_DATA_CONFIG)
    return save_checkpoint(path, model.state_dict(), meta)


def assert_json_close(a, b, rel: float, abs_: float = 1e-12, path: str = "") -> None:
    """Two JSON reports equal, numbers within ``rel`` (sums taken in another order differ in the last bits), numbers
    printed inside strings as :func:`assert_text_close` allows."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_json_close(a[k], b[k], rel, abs_, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, rel, abs_, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=abs_), path
    elif isinstance(a, str) and isinstance(b, str):
        assert_text_close(a, b, rel, abs_, path)
    else:
        assert a == b, path


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _last_digit_unit(text: str) -> float:
    """One unit in the last printed digit of a number: 0.01 for ``"28.67"``, 10 for ``"1.22e+03"``."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def assert_text_close(a: str, b: str, rel: float, abs_: float = 1e-12, path: str = "") -> None:
    """Two texts (a headline, a CSV file) equal but for printed numbers that moved in their last bits.

    The words around the numbers must be equal. Printed integers (counts, indices) must be equal. A number printed
    with a decimal point or an exponent may differ by ``rel`` or by one unit in its last printed digit: a value that
    moved by an ulp can round the other way when it sits on a rounding boundary."""
    if a == b:
        return
    assert _NUMBER.split(a) == _NUMBER.split(b), f"{path}: {a!r} != {b!r}"
    for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
        if not any(c in x + y for c in ".eE"):
            assert x == y, f"{path}: {a!r} != {b!r}"
        else:
            step = max(_last_digit_unit(x), _last_digit_unit(y))
            assert float(x) == pytest.approx(float(y), rel=rel, abs=max(abs_, step)), f"{path}: {a!r} != {b!r}"


# A tiny calibration phantom (fix and registry tests)
PHANTOM_KW = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=2, num_classes=8)
PHANTOM_DATA = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                "crop_pct": 1.0}


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    """A 4-block phantom (outliers planted from block 1) built from a random ViT: ``(path, spec, folder)``."""
    import timm

    from artifactscan.models.checkpoint import CheckpointMeta, save_checkpoint
    from artifactscan.models.phantom import build_phantom

    d = tmp_path_factory.mktemp("phantom")
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", **PHANTOM_KW)
    meta = CheckpointMeta("vit_small_patch16_224", PHANTOM_KW, PHANTOM_DATA)
    save_checkpoint(d / "base.safetensors", base.state_dict(), meta)
    _, spec, path = build_phantom(d / "base.safetensors", d / "phantom.safetensors", onset=1, calibration_images=64)
    return path, spec, d


def randomize(model, scale: float = 0.2, seed: int = 0):
    """Every parameter drawn afresh (layer scales, position rows and biases too), so conversions are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def hooked_block_norms(blocks, forward, x, batch_first: bool = True) -> torch.Tensor:
    """``[num_blocks, B, T]`` token norms at each block's output, from any model's own forward."""
    out: list = [None] * len(blocks)

    def hook(i):
        def fn(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            out[i] = torch.linalg.vector_norm((t if batch_first else t.transpose(0, 1)).float(), dim=-1)
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out)


def loaded_block_norms(loaded, x) -> torch.Tensor:
    """``[num_blocks, B, T]`` through artifactscan's own capture."""
    from artifactscan.models.capture import NormCapture

    with NormCapture(loaded) as cap:
        return cap.run(x)[:-1]


# Two processes on one machine, no TCP port chosen in advance. A port found free and handed to torchrun
# (``--master-port``) stays unreserved until torchrun binds it, seconds later under load, and torchrun binds every
# address while the check looked at 127.0.0.1 alone: any process that takes it meanwhile, on any address, makes the
# launch fail with EADDRINUSE. ``--standalone`` lets torchrun bind a port of its own choosing (localhost:0).
TORCHRUN_TWO_RANKS = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def join_two_rank_group(rank: int, rendezvous: str) -> None:
    """In a ``torch.multiprocessing.spawn`` worker: join a 2-rank gloo group through a rendezvous file (no TCP port
    to choose, and so none to lose), and set the env a torchrun rank has (the library reads RANK/LOCAL_RANK/WORLD_SIZE
    and keeps the group it finds initialised). ``rendezvous`` must be a new path for each group."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
