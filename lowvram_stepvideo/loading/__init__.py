"""Model folders: validating a release or quantized folder (model_folder), building each network from
its config and weight files (loaders), and the built-in tiny demo folder (demo).

May import models, files and the root modules.
"""
