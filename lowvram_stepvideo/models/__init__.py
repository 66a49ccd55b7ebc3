"""The released networks as pure nn.Modules (attribute names = checkpoint keys): the DiT (dit), the VAE (vae),
the two text encoders (step_llm, clip), their shared layers, and quantized linears swapped in for int8 / fp8
weights (quant). No devices, files or offloading here: that is loading/ and engines/.

May import files (configs, weight-file errors) and the root modules.
"""
