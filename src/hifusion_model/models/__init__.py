"""The networks: HiFusion, the spot-only ResNet-18, their trunks, losses, configs and checkpoints.

Build one by name with :func:`hifusion_model.create_model` (see :mod:`.registry`).
"""
