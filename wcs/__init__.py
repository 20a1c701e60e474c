"""Canned WCS distortion solutions of the project's optical model, one folder per focal plane."""
