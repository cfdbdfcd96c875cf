"""The engine-neutral server: the round loop (``loop``), one whole experiment (``experiment``), the
robust round, the opt-in fault harness, accounting, checkpoints and the run directory.

Import what you need from the modules (``feddtl.server.experiment.run_experiment``, ...): this file
imports nothing, so a Flower ClientApp that needs ``server.clients.client_seed`` stays light.
"""
