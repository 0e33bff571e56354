"""Training: run options (one dataclass -> the command line), the loop top to bottom (``unet_trainer``), one
step, the EMA, telemetry, checkpoints, startup (folder policy, lock, signals), the Hub, the VAE stage, and
classifier training (``classifier/``). Nothing is imported here: import the module you need."""
