"""Distributed execution: launcher detection (`world`), member layout, tree fusion and data-parallel fine-tuning."""
