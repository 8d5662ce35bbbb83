"""CLIP zero-shot classification served with BentoML: the library behind service.py."""
