"""NaFlex models (transformers' SigLIP2 ``siglip2`` folders, timm's ``naflexvit_*`` incl. RADIO v3/v4): inputs as the
families' own processors make them, norms as their own forwards give them, padding out of every statistic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artifactscan.inputs.naflex import NaFlexTransform, pack, unpack
from artifactscan.models.hooks import capture
from artifactscan.models.capture import token_norms

transformers = pytest.importorskip("transformers")

SIZES = [(40, 100), (120, 36), (64, 64), (17, 150)]  # (height, width): landscape, portrait, square, extreme


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def siglip2_folder(tmp_path: Path) -> Path:
    """A tiny random SigLIP2 NaFlex vision tower, saved by transformers itself, with its processor's config."""
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 patch_size=8, num_patches=16)
    folder = tmp_path / "siglip2"
    Siglip2VisionModel(config).eval().save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=24).save_pretrained(folder)
    return folder


def _pil(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def test_inputs_match_siglip2_processor():
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=24)
    ours = NaFlexTransform(8, 24, processor.image_mean, processor.image_std)
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        theirs = processor(images=[image], return_tensors="pt")
        batch = unpack(ours(image)[None])
        assert batch.grids.tolist() == theirs["spatial_shapes"].tolist()
        assert torch.equal(batch.valid, theirs["pixel_attention_mask"].bool())
        torch.testing.assert_close(batch.patches, theirs["pixel_values"], atol=1e-6, rtol=0)


def test_inputs_match_timm_naflex_transform():
    import timm.data

    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    theirs = timm.data.create_transform(input_size=(3, 128, 128), is_training=False, naflex=True, patch_size=16,
                                        max_seq_len=24, interpolation="bicubic", mean=mean, std=std, patchify=True)
    ours = NaFlexTransform(16, 24, mean, std, "bicubic", "pil")
    rng = np.random.default_rng(2)
    for h, w in SIZES:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        expected, batch = theirs(image), unpack(ours(image)[None])
        own = int(batch.valid.sum())
        assert own == len(expected["patches"])
        torch.testing.assert_close(batch.patches[0, :own], expected["patches"], atol=1e-6, rtol=0)
        assert torch.equal(batch.coords()[0, :own], expected["patch_coord"])


def test_siglip2_norms_match_transformers_on_valid_tokens(siglip2_folder, tmp_path):
    from transformers import Siglip2ImageProcessor, Siglip2VisionModel
    from artifactscan import load_model

    loaded = load_model(siglip2_folder)
    assert loaded.num_prefix_tokens == 0 and loaded.layout == "hf:siglip2"
    reference = Siglip2VisionModel.from_pretrained(siglip2_folder).eval()
    processor = Siglip2ImageProcessor.from_pretrained(siglip2_folder)
    images = [_pil(p) for p in sorted(_images(tmp_path / "imgs").iterdir())]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**inputs, output_hidden_states=True).hidden_states[1:]
    packed = torch.stack([NaFlexTransform(8, 24, processor.image_mean, processor.image_std)(im) for im in images])
    with torch.no_grad(), capture(loaded, ["blocks.*.resid_post"], reduce=token_norms, masks_padding=True) as cap:
        cap.forward(packed)
    valid = inputs["pixel_attention_mask"].bool()
    for i, states in enumerate(hidden):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"][valid], states.norm(dim=-1)[valid], rtol=1e-4,
                                   atol=1e-5)


def _timm_naflex(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**dict(embed_dim=32, depth=3, num_heads=2), **kwargs}).eval()


def test_timm_naflex_radio_norms_match_timm(tmp_path):
    from artifactscan import load_model

    model = _timm_naflex("naflexvit_base_patch16_radio_v3")
    loaded = load_model(model)
    assert (loaded.num_cls_tokens, loaded.num_register_tokens) == (1, 7)  # RADIO v3: 8 prefix tokens
    transform = NaFlexTransform(16, 12, loaded.data_config["mean"], loaded.data_config["std"], "bicubic", "pil")
    packed = torch.stack([transform(_pil(p)) for p in sorted(_images(tmp_path / "imgs").iterdir())])
    batch = unpack(packed)
    with torch.no_grad():
        theirs = model.forward_intermediates(
            {"patches": batch.patches, "patch_coord": batch.coords(), "patch_valid": batch.valid},
            norm=False, output_fmt="NLC", intermediates_only=True)
    with torch.no_grad(), capture(loaded, ["blocks.*.resid_post"], reduce=token_norms, masks_padding=True) as cap:
        cap.forward(packed)
    for i, tokens in enumerate(theirs):
        ours = cap[f"blocks.{i}.resid_post"][:, 8:]
        torch.testing.assert_close(ours[batch.valid], tokens.norm(dim=-1)[batch.valid], rtol=1e-4, atol=1e-5)


def _scan(model, images, tmp_path):
    from artifactscan import scan

    return scan(model, images, num_workers=0, batch_size=2, num_maps=4, threshold=1.0)


def test_padding_never_counts(siglip2_folder, tmp_path):
    """The same images padded more (a larger budget does not change them: the padding does) leave every statistic
    as it was; and per-image outliers are in each image's own grid."""
    from artifactscan import load_model

    folder = _images(tmp_path / "imgs")
    base = _scan(load_model(siglip2_folder), folder, tmp_path)
    padded_model = load_model(siglip2_folder)
    # Same images, same grids, more padding: each image's own patches packed into a longer sequence
    transform = NaFlexTransform(8, 24, padded_model.data_config["mean"], padded_model.data_config["std"])
    packed = torch.stack([transform(_pil(p)) for p in sorted(folder.iterdir())])
    longer = torch.stack([pack(b.patches[0][b.valid[0]], *b.grids[0].tolist(), 40)
                          for b in (unpack(p[None]) for p in packed)])
    huge = longer.clone()
    huge[:, 25:] = 1e4  # padding made huge: still padding
    assert torch.equal(unpack(huge).valid, unpack(longer).valid)
    counts, sums = _stats_of(padded_model, packed)
    for tensor in (longer, huge):
        more_counts, more_sums = _stats_of(padded_model, tensor)
        assert more_counts == counts  # histograms, exceedances, token and image counts: exactly
        torch.testing.assert_close(more_sums, sums, rtol=1e-5, atol=0)  # the kernel sums a longer row
    grids = {i: tuple(unpack(p[None]).grids[0].tolist()) for i, p in enumerate(packed)}
    assert base.outliers and all(o.row < grids[o.image_index][0] and o.col < grids[o.image_index][1]
                                 for o in base.outliers)
    assert {m.image_index: (len(m.norms), len(m.norms[0])) for m in base.maps} == grids
    assert base.layers[0].num_outliers <= sum(h * w for h, w in grids.values())


def _stats_of(loaded, packed: torch.Tensor):
    """Every statistic of a scan of ``packed`` (through the pass runner's masked path)."""
    from artifactscan.core.stats import NormStatistics

    stats = NormStatistics(len(loaded.blocks) + 1, loaded.prefix_names, (1.0,))
    with torch.no_grad(), capture(loaded, {**{f"blocks.{i}.resid_post": token_norms
                                              for i in range(len(loaded.blocks))}, "final_norm": token_norms}, masks_padding=True) as cap:
        cap.forward(packed)
        norms = torch.stack([cap[f"blocks.{i}.resid_post"] for i in range(len(loaded.blocks))] + [cap["final_norm"]])
    stats.update(norms, unpack(packed).valid)
    counts = (stats.patch_counts.tolist(), stats.image_max_counts.tolist(), stats.num_patch_tokens,
              stats.fixed_token_hits.tolist(), stats.fixed_image_hits.tolist(), stats.nonfinite.tolist())
    return counts, torch.stack([stats.patch_sum, stats.patch_max])


def test_norms_cli_runs_on_siglip2_folder(siglip2_folder, tmp_path):
    from typer.testing import CliRunner
    from artifactscan.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["norms", str(siglip2_folder), str(_images(tmp_path / "imgs")), "--out",
                                      str(out), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["num_scanned"] == len(SIZES)


def test_all_padding_image_is_refused_by_name(siglip2_folder, tmp_path):
    from artifactscan import load_model
    from artifactscan.analysis.passes import PassSettings, open_pass
    from artifactscan.analysis.scan import measure_norms
    from artifactscan.core.errors import InputError
    from artifactscan.core.thresholds import AutoRule

    loaded = load_model(siglip2_folder)
    transform = NaFlexTransform(8, 24, loaded.data_config["mean"], loaded.data_config["std"])
    packed = transform(Image.new("RGB", (30, 30)))
    packed[0, :2] = 0  # a grid of 0 x 0: nothing but padding
    with open_pass(loaded, _images(tmp_path / "imgs"), settings=PassSettings(num_workers=0)) as opened:
        opened.source.dataset.transform = lambda image: packed
        with pytest.raises(InputError, match=r"img0\.png is all padding"):
            measure_norms(opened, 1.0, AutoRule(), 0)


# ----------------------------------------------------------------------------------------------- hook names
def test_naflex_and_live_radio_families_have_every_name():
    from transformers import RadioConfig, RadioModel, Siglip2VisionConfig, Siglip2VisionModel
    from artifactscan.models.hooks import family_of, hook_names, hook_points
    from tests.test_hooks import expected_names

    siglip2 = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, patch_size=8)).eval()
    radio = RadioModel(RadioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                   patch_size=16, max_img_size=128)).eval()
    timm_naflex = _timm_naflex("naflexvit_base_patch16_radio_v3", depth=2)
    for model, family in ((siglip2, "hf-siglip2"), (radio, "hf-radio"), (timm_naflex, "timm-naflex")):
        assert family_of(model).name == family
        assert hook_names(model) == expected_names(2)
    assert hook_points(radio)["final_norm"].module == "encoder"  # RADIO has no final norm
    assert hook_points(timm_naflex)["patch_embed.post"].module == "embeds.proj"


def test_live_radio_model_norms_match_transformers_and_prefix_tokens():
    """transformers 5's RadioModel, hooked live by its in-memory names: 3 summary tokens + 7 registers are the 10
    prefix tokens (1 CLS + 9 registers in timm's count)."""
    from transformers import RadioConfig, RadioModel
    from artifactscan.models.hooks import family_of

    torch.manual_seed(0)
    model = RadioModel(RadioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                   patch_size=16, max_img_size=128)).eval()
    assert family_of(model).prefix_tokens(model) == (1, 9)
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        with capture(model, ["blocks.*.resid_post", "final_norm"], reduce=token_norms) as cap:
            cap.forward(x)
    assert cap["blocks.0.resid_post"].shape == (2, 10 + 4 * 5)
    for i, states in enumerate(hidden):
        torch.testing.assert_close(cap[f"blocks.{i}.resid_post"], states.norm(dim=-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cap["final_norm"], hidden[-1].norm(dim=-1), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- loading, commands
def test_timm_naflex_file_scans_with_arch_and_img_size_sets_the_budget(tmp_path):
    from safetensors.torch import save_file
    from artifactscan import load_model, scan

    model = _timm_naflex("naflexvit_so400m_patch16_radio_v4", depth=2)
    path = tmp_path / "radio_v4.safetensors"
    save_file(model.state_dict(), path)
    kwargs = dict(embed_dim=32, depth=2, num_heads=2)
    loaded = load_model(path, arch="naflexvit_so400m_patch16_radio_v4", arch_kwargs=kwargs, img_size=64)
    assert loaded.num_prefix_tokens == 10 and loaded.data_config["naflex"]["max_num_patches"] == 16
    assert [n for n in loaded.notes if n.startswith("NaFlex:")] == [  # the budget said once, as it is now
        n for n in loaded.notes if "within 16 patches" in n]
    report = scan(loaded, _images(tmp_path / "imgs"), num_workers=0, threshold=1.0, num_maps=4)
    assert report.images.num_scanned == len(SIZES)
    assert [p.name for p in report.layers[0].prefix] == ["cls"] + [f"reg{i}" for i in range(9)]
    assert all(len(m.norms) * len(m.norms[0]) <= 16 for m in report.maps)
    synthetic = scan(loaded, "synthetic:3", num_workers=0, threshold=1.0)  # tensors take the same path
    assert synthetic.images.num_scanned == 3


@pytest.mark.parametrize("command", ["attention", "probe", "discover"])
def test_commands_that_need_one_grid_refuse_naflex_in_one_line(siglip2_folder, tmp_path, command):
    from typer.testing import CliRunner
    from artifactscan.cli import app

    result = CliRunner().invoke(app, [command, str(siglip2_folder), str(_images(tmp_path / "imgs")), "--workers",
                                      "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "is a NaFlex model" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_folder_whose_pieces_disagree_is_refused_naming_it(siglip2_folder):
    from artifactscan import load_model
    from artifactscan.core.errors import ModelLoadError

    processor = siglip2_folder / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    processor.write_text(json.dumps({**settings, "patch_size": 16}))
    with pytest.raises(ModelLoadError, match=r"preprocessor_config.json cuts 16-pixel patches .* 8-pixel"):
        load_model(siglip2_folder)
    processor.write_text(json.dumps(settings))
    config = json.loads((siglip2_folder / "config.json").read_text())
    (siglip2_folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ModelLoadError, match=r"siglip2: its weights do not fit its config.json") as err:
        load_model(siglip2_folder)
    assert "\n" not in str(err.value)
