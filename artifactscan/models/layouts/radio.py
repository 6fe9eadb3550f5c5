"""C-RADIO v3 / v4 (NVIDIA, 2025) as timm's fixed-grid ``vit_*_patch16_radio_v3/v4`` ``VisionTransformer``.

timm's own ``state_dict()`` files load as they are; this module adds their configurations to the table a bare
state dict is matched against, so they load without ``--arch``. RADIO has 1 CLS and 7 (v3) or 9 (v4) registers
before the patches: 8 or 10 prefix tokens, which the capture layer counts from the model (``num_prefix_tokens``,
``num_reg_tokens``) and keeps out of every patch statistic. timm's ``naflexvit_*_radio_*`` (RADIO's own behaviour at
any resolution, patches padded) are refused by name until padded tokens are kept out of the statistics.
"""

from __future__ import annotations

from artifactscan.models import infer

#: (size, width) of timm's fixed-grid RADIO towers, per version
TIMM_SIZES = {"v3": {"base": 768, "large": 1024, "huge": 1280, "giant": 1536}, "v4": {"so400m": 1152, "huge": 1280}}
for _version, _sizes in TIMM_SIZES.items():
    for _size, _width in _sizes.items():
        infer.register_known_config(f"vit_{_size}_patch16_radio_{_version}", "radio", _width, 16)
