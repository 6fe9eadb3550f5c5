"""One module per family of models: how artifactscan names their hook points (and, from the next release on, how
their checkpoint files are recognised and converted). Each module registers itself when imported;
``artifactscan/models/__init__.py`` imports them all."""
