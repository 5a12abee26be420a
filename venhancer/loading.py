"""Checkpoint loading and weight downloads.

Two sections live here: the denoising-network checkpoint loader, and the resolution/download of
every weight file (VEnhancer checkpoints, OpenCLIP text weights, the SVD temporal VAE).
"""

# ---------------------------------------------------------------------------------------------
# Network checkpoint loading (load_unet and its helpers)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Weight sources and downloads
# ---------------------------------------------------------------------------------------------
