"""Instruments: what observes the model without being part of it.

    tracing         forward hooks that record each joint block's streams, attention and modulation (Trace)
    attention_maps  word-by-word attention heatmaps over a generated image, from a Trace
    compare         stage recorders and error tables: ours against diffusers / transformers, layer by layer
    anatomy         parameter and FLOP counts per module, read off a config on the meta device

They may import every package of the library; nothing in mmditx/, encoders/, vae/, sampling/ or training/
imports them, so a reader of the model never meets them.
"""
