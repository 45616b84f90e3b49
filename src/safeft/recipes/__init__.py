"""Recipes: align, fine-tune, evaluate, bench and demo. Each reads and writes a directory and calls the library's
components; the CLI calls one recipe per command."""
