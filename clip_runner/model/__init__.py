"""The model side: the store, the encoders, the runner service, its batching and device decode.

It never imports the layers above it (images, answers, web); tests/test_layers.py holds that.
"""
