"""The known-configuration table against timm's own model names (issue 22, item 3).

Every DINOv3 (all sizes, ``_qkvb`` too), EVA02, PE core, SigLIP / SigLIP2 fixed-resolution, AIMv2, RoPE ViT and BEiT
architecture that the installed timm lists is built on the meta device (shapes only, no memory), and its own
``state_dict()`` goes through the same inference a bare state dict without ``--arch`` goes through. It must come out
as a configuration that computes the same function (the same keys and shapes, heads, activation and RoPE settings),
or be refused naming the candidates, itself among them. Names come from ``timm.list_models``, so a size timm adds
later is checked without editing this file.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

from artifactscan.core.errors import ModelLoadError
from artifactscan.models import infer, loading, native

assert loading  # imported for its side effect: the family modules add their sizes to the table

FAMILIES = {
    "DINOv3": "vit_*_dinov3*",
    "EVA02": "eva02_*",
    "PE core": "vit_pe_core_*",
    "SigLIP and SigLIP2 (fixed resolution)": "vit_*_siglip_*",
    "AIMv2": "aimv2_*",
    "RoPE ViT": "vit_*_rope_*",
    "BEiT v1, v2, 3": "beit*",
}
NAMES = sorted({name for pattern in FAMILIES.values() for name in timm.list_models(pattern)})

# Exactly the keys and shapes of DeiT-III's original files (gamma_N, a position embedding without the CLS row): left
# out of the table on purpose, so that those files keep loading without --arch (docs/loading.md). A timm file of one
# of these reads as DeiT-III; the RoPE model needs --arch.
READ_AS_DEIT3 = re.compile(r"^vit_(small|base|large)_patch16_rope_ape_224$")


def own_state_dict(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in infer._meta_shapes(name).items()}


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_every_family_is_listed_by_timm():
    for family, pattern in FAMILIES.items():
        assert timm.list_models(pattern), f"timm lists no {family} model ({pattern}): renamed?"
    assert {"vit_7b_patch16_dinov3", "vit_tiny_patch16_dinov3_qkvb", "vit_giantopt_patch16_siglip_256"} <= set(NAMES)


def test_every_table_entry_has_the_width_and_patch_it_claims():
    """The table's width and patch pre-select candidates: a wrong number would hide an entry from every file."""
    for arch, _, width, patch in infer.known_configs():
        sd = infer._meta_shapes(arch)
        assert sd["patch_embed.proj.weight"][0] == width and sd["patch_embed.proj.weight"][2] == patch, arch


@pytest.mark.parametrize("name", NAMES)
def test_timms_own_state_dict_finds_a_configuration_computing_the_same(name):
    sd = own_state_dict(name)
    layout = native.detect_layout(sd)
    converted = sd if layout == "timm" else native.to_timm(sd, layout)
    try:
        match, read_as = infer.infer_from_file(sd, converted, layout, name)
    except ModelLoadError as exc:  # allowed only when the shapes fit several configurations, this one among them
        message = str(exc)
        assert "fits" in message and name in message and "match no known" not in message, message
        assert "\n" not in message
        return
    read = shapes(sd if read_as == "timm" else converted)
    assert infer._meta_shapes(match.arch, tuple(sorted(match.kwargs.items()))) == read
    if READ_AS_DEIT3.match(name):
        assert match.arch == name.replace("vit_", "deit3_").replace("_rope_ape", "") and read_as == "deit3"
        return
    assert read_as == "timm"  # timm's own file: no converter
    built = infer._behaviour(match.arch, tuple(sorted(match.kwargs.items())))
    own = infer._behaviour(name, tuple(sorted({"num_classes": match.kwargs["num_classes"]}.items())))
    assert built == own, f"{name} read as {match.arch} {match.kwargs}: {built} != {own}"


def test_a_grid_that_no_configuration_owns_is_refused_naming_both_activations():
    """timm's SigLIP-L/16 is GELU at 256 and 384 and GELUTanh at 512, with the same shapes at any grid: a 28x28 file
    (448 px) is none of their own sizes, so its shapes cannot tell the activation."""
    sd = {k: torch.empty(s, device="meta")
          for k, s in infer._meta_shapes("vit_large_patch16_siglip_256", (("img_size", 448),)).items()}
    with pytest.raises(ModelLoadError, match=r"siglip-l-448 .*fits several known architectures.*: "
                                             r"vit_large_patch16_siglip_256, vit_large_patch16_siglip_384 \(16 heads, "
                                             r"GELU\); vit_large_patch16_siglip_512 \(16 heads, GELUTanh\)\. Pass "):
        infer.infer_architecture(sd, "timm", "siglip-l-448")
    at_512 = {k: torch.empty(s, device="meta") for k, s in infer._meta_shapes("vit_large_patch16_siglip_512").items()}
    assert infer.infer_architecture(at_512, "timm", "siglip-l-512").act == "GELUTanh"
