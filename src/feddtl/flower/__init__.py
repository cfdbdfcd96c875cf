"""FedDTL on Flower: a ServerApp and a ClientApp (Message API) that drive the same Method as the
in-process simulator, for the Simulation Engine and the Deployment Engine.

Kept import-light: flwr is imported only by the modules that need it.
"""
