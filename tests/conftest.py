import os

# Spawned ranks inherit this: keeps transformers' import-time notices (no torchvision) out of test logs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
