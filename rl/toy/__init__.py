"""The CPU demonstration wing: a toy world and model small enough for two CPU cores.

Why a package of its own: the product (the nodes, the loop, the trainer, the export) must never load
it (tests/test_house.py checks the import graph); it exists to show the product working end to end
and to test it. ``world`` (the toy world: prompts, QR codes at the toy's size, the base art),
``model`` (the toy UNet, ControlNet, text encoder and CLIP: build, pretrain, calibrate, sample),
``backend`` (a :class:`rl.collect.Backend` that samples it in-process), ``demo`` (``qr-rl demo``:
rounds of :mod:`rl.rounds` through that backend, and the report), ``assets/`` (the shipped weights).
"""
