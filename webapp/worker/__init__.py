"""The worker process: owns the device and the loaded models, runs every job."""
