"""The command-line application above the pipeline: the flags (settings), each command wired step by step
(commands), the pages and model card (report), site calibration, ONNX export and scoring archives in chunks
(streaming). main.py is its only caller; nothing in lib/ or the pipeline files imports it."""
