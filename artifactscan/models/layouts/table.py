"""The one table the loader dispatches through: every family's checkpoint layouts and known configurations.

``models/native.py`` reads a checkpoint file in the first :data:`FILE_LAYOUTS` entry that recognises its keys,
``models/hf.py`` converts a Hugging Face folder by the :data:`FOLDER_LAYOUTS` entry of its ``model_type``, and
``models/infer.py`` matches a bare state dict against :data:`KNOWN_CONFIGS`. None of them names a family. Adding a
family is one module in this folder (its ``FAMILY``) plus its line here and its test (``tests/test_layout_table.py``
checks that every module's layouts are in the table and that each is exercised by a fixture).
"""

from __future__ import annotations

from artifactscan.core.errors import ModelLoadError
from artifactscan.models import infer
from artifactscan.models.layouts import aimv2, beit, deit3, dinov2, dinov3, eva, hf_vit, mae, openai_clip, pe, radio
from artifactscan.models.layouts import timm_train
from artifactscan.models.layouts.base import Family, FileLayout, FolderLayout, StateDict

FAMILIES: tuple[Family, ...] = (timm_train.FAMILY, deit3.FAMILY, mae.FAMILY, dinov2.FAMILY, openai_clip.FAMILY,
                                dinov3.FAMILY, eva.FAMILY, pe.FAMILY, beit.FAMILY, aimv2.FAMILY, radio.FAMILY,
                                hf_vit.FAMILY)

#: Tried in this order; the first that recognises a file's keys reads it. Where keys overlap the more specific layout
#: comes first: ConvNeXt (refused) before all; Perception Encoder (OpenAI CLIP's key names plus its own ``ls_N``,
#: ``attn_pool``, or no ``ln_post``) before OpenAI's CLIP; Meta's DINOv3 (a 2-d ``mask_token`` too) before DINOv2;
#: timm's own keys, which need no conversion, last.
FILE_LAYOUTS: tuple[FileLayout, ...] = (
    dinov3.CONVNEXT, pe.FILES, openai_clip.OPENAI, dinov3.META_FILES, openai_clip.OPENCLIP_TIMM, mae.FILES,
    dinov2.HUB, deit3.FILES, timm_train.FILES)
TIMM = timm_train.FILES

#: Hugging Face folders, by their config's ``model_type`` (no two entries share one).
FOLDER_LAYOUTS: tuple[FolderLayout, ...] = (hf_vit.HF_FOLDERS, dinov3.HF_FOLDERS, aimv2.HF_FOLDERS, beit.HF_FOLDERS,
                                            radio.HF_FOLDERS)

#: The shape table, in matching order: among equivalent matches the family of the file's layout wins, then the
#: earlier entry (a plain timm file is read as ``vit_*``, then ``deit_*``, then MAE's: ``timm_train`` comes first).
KNOWN_CONFIGS = (*timm_train.VIT, *timm_train.DEIT, *deit3.FAMILY.known, *mae.FAMILY.known, *dinov2.FAMILY.known,
                 *openai_clip.FAMILY.known, *timm_train.SIGLIP, *timm_train.FLEXIVIT, *dinov3.FAMILY.known,
                 *eva.FAMILY.known, *pe.FAMILY.known, *beit.FAMILY.known, *aimv2.FAMILY.known, *pe.LANG_SPATIAL,
                 *radio.FAMILY.known)

infer.set_table(list(KNOWN_CONFIGS), {layout.name: layout.family for layout in FILE_LAYOUTS if layout.family})


def file_layout_of(sd: StateDict) -> FileLayout:
    """The layout a state dict (wrappers removed) is in: the first entry that recognises it."""
    return next(layout for layout in FILE_LAYOUTS if layout.recognise(sd))


def file_layout(name: str) -> FileLayout:
    """The layout named ``name`` (as ``NativeCheckpoint.layout`` records it)."""
    for layout in FILE_LAYOUTS:
        if layout.name == name:
            return layout
    raise ModelLoadError(f"no checkpoint layout named {name!r}; known: {', '.join(l.name for l in FILE_LAYOUTS)}")


def folder_layout(model_type: str) -> FolderLayout | None:
    """The layout converting Hugging Face folders of ``model_type``, or None."""
    return next((layout for layout in FOLDER_LAYOUTS if model_type in layout.model_types), None)


def folder_model_types() -> dict[str, str]:
    """``{model_type: transformers class}`` of every folder layout."""
    return {t: cls for layout in FOLDER_LAYOUTS for t, cls in layout.model_types.items()}
