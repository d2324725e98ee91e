"""Jobs: prepare run folders, launch workers (in place, torchrun or the DeepSpeed launcher), the
worker entry point and the registry of what a worker can run."""
