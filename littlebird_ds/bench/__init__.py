"""``littlebird-ds bench``: LittleBird against BigBird, Longformer and full-attention BERT.

Modules:
    systems  build each system at one size and length, randomly initialised, with its input
    flops    LittleBird's analytic FLOP count (and the FlopCounterMode cross-check)
    worker   one configuration in a fresh process: step times and peak memory, as JSON
    runner   rounds over lengths and systems, interleaved, with progress
    report   medians, ratios to the peers, log-log slopes; markdown, JSON and PNG
"""
