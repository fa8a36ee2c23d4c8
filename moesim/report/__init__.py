"""Rendering: rich tables, plots and Chrome traces. The only place rich/matplotlib are imported."""
