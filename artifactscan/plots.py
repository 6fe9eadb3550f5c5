"""``artifactscan.plots``: every figure as a matplotlib ``Figure`` (never shown), re-exported from
:mod:`artifactscan.render`."""

from artifactscan.render.plots import (
    histogram_quantiles,
    plot_image_map,
    plot_layer_distributions,
    plot_norm_histogram,
    save_scan_figures,
)
from artifactscan.render.plots_attention import (
    plot_attention_heads,
    plot_attention_image,
    plot_attention_mass,
    save_attention_figures,
)
from artifactscan.render.plots_compare import (
    plot_compare,
    plot_emergence,
    plot_register_ablation,
    save_compare_figure,
    save_emergence_figure,
    save_register_ablation_figure,
)
from artifactscan.render.plots_probe import plot_neighbour_similarity, plot_probe_bars, save_probe_figures
from artifactscan.render.style import PAPER_THRESHOLD, PHANTOM_TAG

__all__ = ["PAPER_THRESHOLD", "PHANTOM_TAG", "histogram_quantiles", "plot_attention_heads", "plot_attention_image",
           "plot_attention_mass", "plot_compare", "plot_emergence", "plot_image_map", "plot_layer_distributions",
           "plot_neighbour_similarity", "plot_norm_histogram", "plot_probe_bars", "plot_register_ablation",
           "save_attention_figures", "save_compare_figure", "save_emergence_figure", "save_probe_figures",
           "save_register_ablation_figure", "save_scan_figures"]
