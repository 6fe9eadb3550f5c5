"""The README's three monitor usages (a plain loop, Lightning, the Hugging Face Trainer) run as written: each Python
block of "Watching artifacts emerge during training" is executed verbatim, in a new folder holding `val_subset/`,
after a few lines that make what the block takes from the user's own script (`model`, `loader`, `module`, `args`,
`ds`, `cfg`: tiny CPU models and data), and writes the monitor.jsonl its comment promises."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from artifactscan.monitor import read_monitor

from .conftest import REPO, SAMPLE_IMAGES, TINY, tiny_vit

SECTION = "## Watching artifacts emerge during training"
TINY_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) == 3, f"{SECTION} should show three usages: a plain loop, Lightning, the HF Trainer"
    return blocks


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder with a probe set of a few images, where the README's code runs."""
    (tmp_path / "val_subset").mkdir()
    for image in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4]:
        shutil.copy(image, tmp_path / "val_subset")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, TINY["num_classes"], (4,), generator=g))
            for _ in range(3)]


def test_plain_loop(user_folder):
    model, loader = tiny_vit(), _batches()  # the user's model and data
    exec(readme_blocks()[0], {"model": model, "loader": loader})
    assert read_monitor(user_folder / "runs" / "my-vit" / "artifacts").steps == [0]


def test_lightning(user_folder, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch")
    # the block leaves the length of training to the user; Lightning reads Trainer defaults from PL_TRAINER_*
    monkeypatch.setenv("PL_TRAINER_MAX_STEPS", "3")
    monkeypatch.setenv("PL_TRAINER_ACCELERATOR", "cpu")

    class Classifier(pl.LightningModule):  # the user's module: a ViT inside
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit().train()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.vit(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = map(torch.cat, zip(*_batches()))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    exec(readme_blocks()[1], {"module": Classifier(), "loader": loader})
    assert read_monitor(user_folder / "artifacts").steps == [0]


def test_hugging_face_trainer(user_folder):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    user = {"model": transformers.ViTForImageClassification(config), "cfg": TINY_CONFIG,
            "args": transformers.TrainingArguments(output_dir="hf-run", max_steps=2, per_device_train_batch_size=4,
                                                   report_to=[], use_cpu=True, save_strategy="no",
                                                   disable_tqdm=True),
            "ds": [{"pixel_values": x[i], "labels": int(y[i])} for x, y in _batches() for i in range(4)]}
    exec(readme_blocks()[2], user)
    assert read_monitor(user_folder / "hf-run" / "artifacts").steps == [0]
    assert list((user_folder / "hf-run" / "artifacts" / "tensorboard").glob("events.out.tfevents.*"))
